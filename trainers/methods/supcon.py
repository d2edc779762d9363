"""SupCon (Khosla et al., 2020, "Supervised Contrastive Learning") and SimCLR (Chen et al., 2020,
"A Simple Framework for Contrastive Learning of Visual Representations") = SupCon without labels.

Encoder + MLP head (Linear -> ReLU -> Linear to 128, as HobbitLong/SupContrast), L2-normalised
features of every view, ``trainers.losses.supcon_loss`` over the global batch. Defaults: temperature
0.1 and base temperature 0.07 for SupCon; SimCLR uses temperature 0.5 with base = temperature
(the plain NT-Xent scale), as in the SupContrast CIFAR recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from trainers.heads import ProjectionHead
from trainers.losses import supcon_loss
from trainers.methods.base import Method, MethodContext, encode_views, require

LABEL_SOURCES = ("dataset", "none")


@dataclass
class SupConConfig:
    labels: str = "dataset"  # dataset: supervised contrastive; none: SimCLR
    temperature: float = 0.1
    base_temperature: float = 0.07
    out_dim: int = 128
    hidden_dim: int | None = None  # None: the backbone width


@dataclass
class SimCLRConfig(SupConConfig):
    labels: str = "none"
    temperature: float = 0.5
    base_temperature: float = 0.5


class ContrastiveNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, o: SupConConfig):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(feature_dim, o.hidden_dim or feature_dim, o.out_dim, batch_norm=False)

    def forward(self, views):
        return F.normalize(self.head(encode_views(self.backbone, views)), dim=1)


class SupCon(Method):
    name = "supcon"
    config_class = SupConConfig
    crop_preset = "supcon"

    @classmethod
    def check(cls, o: SupConConfig, ctx: MethodContext) -> None:
        super().check(o, ctx)
        require(o.labels in LABEL_SOURCES, f"method.labels '{o.labels}' must be one of {', '.join(LABEL_SOURCES)}")
        require(o.temperature > 0 and o.base_temperature > 0,
                f"method.temperature and base_temperature must be > 0, got {o.temperature}, {o.base_temperature}")
        require(ctx.num_views >= 2 or o.labels == "dataset",
                "SimCLR needs at least 2 views per image (e.g. crops 2x32): one view has no positive")

    def __init__(self, options: SupConConfig, ctx: MethodContext, backbone: nn.Module):
        super().__init__(options, ctx)
        self.check(options, ctx)
        self.student = ContrastiveNet(backbone, ctx.feature_dim, options)

    def training_step(self, views, labels, step):
        o = self.options
        batch = views[0].shape[0]
        features = self.run_student(views).view(len(views), batch, -1).transpose(0, 1)  # [B, V, D]
        loss = supcon_loss(features, labels if o.labels == "dataset" else None, o.temperature, o.base_temperature)
        return loss, {}

    def describe(self) -> str:
        kind = "SupCon" if self.options.labels == "dataset" else "SimCLR"
        return f"{kind}: T={self.options.temperature}, base T={self.options.base_temperature}"


class SimCLR(SupCon):
    name = "simclr"
    config_class = SimCLRConfig
    crop_preset = "simclr"



