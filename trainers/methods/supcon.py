"""SupCon (Khosla et al., 2020, "Supervised Contrastive Learning") and SimCLR (Chen et al., 2020,
"A Simple Framework for Contrastive Learning of Visual Representations") = SupCon without labels.

Encoder + MLP head (Linear -> ReLU -> Linear, hidden = backbone width and out 128 by default, as
HobbitLong/SupContrast), L2-normalised features of every view, ``trainers.losses.supcon_loss`` over
the global batch. The loss is scaled by temperature / base_temperature:

- SupCon defaults: temperature 0.1, base temperature 0.07 (factor 0.1 / 0.07), the L_out form,
  as SupContrast's SupConLoss;
- SimCLR defaults: temperature 0.5 and base_temperature null, which means "= temperature" (at any
  temperature), so the factor is 1 and the loss is plain NT-Xent (Chen et al.; solo-learn's
  solo/losses/simclr.py). SupContrast's own SimCLR runs (main_supcon.py --method SimCLR --temp 0.5)
  keep SupConLoss's base temperature 0.07, i.e. NT-Xent times 0.5 / 0.07: set
  method.base_temperature=0.07 for that.

``loss_form: in`` gives Khosla's L_in (Eq. 3: the mean over the positives inside the log), the form of
solo-learn's SupCon; with one positive per anchor (SimCLR) both forms are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from trainers.heads import ProjectionHead
from trainers.losses import supcon_loss
from trainers.methods.base import Method, MethodContext, encode_views, require

LABEL_SOURCES = ("dataset", "none")
LOSS_FORMS = ("out", "in")


@dataclass
class SupConConfig:
    labels: str = "dataset"  # dataset: supervised contrastive; none: SimCLR
    temperature: float = 0.1
    base_temperature: float | None = 0.07  # the loss is scaled by temperature / base_temperature; null: = temperature
    out_dim: int = 128
    hidden_dim: int | None = None  # None: the backbone width
    loss_form: str = "out"  # out: Khosla et al. Eq. 2 (SupContrast); in: Eq. 3 (solo-learn's SupCon)


@dataclass
class SimCLRConfig(SupConConfig):
    labels: str = "none"
    temperature: float = 0.5
    base_temperature: float | None = None  # = temperature: factor 1, plain NT-Xent


class ContrastiveNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, o: SupConConfig, forward_views: str = "by_size"):
        super().__init__()
        self.backbone, self.forward_views = backbone, forward_views
        self.head = ProjectionHead(feature_dim, o.hidden_dim or feature_dim, o.out_dim, batch_norm=False)

    def forward(self, views):
        return F.normalize(encode_views(self.backbone, views, self.forward_views, self.head), dim=1)


class SupCon(Method):
    name = "supcon"
    config_class = SupConConfig
    crop_preset = "supcon"

    @classmethod
    def check(cls, o: SupConConfig, ctx: MethodContext) -> None:
        super().check(o, ctx)
        require(o.labels in LABEL_SOURCES, f"method.labels '{o.labels}' must be one of {', '.join(LABEL_SOURCES)}")
        require(o.loss_form in LOSS_FORMS, f"method.loss_form '{o.loss_form}' must be out (Khosla et al. Eq. 2) "
                                           f"or in (Eq. 3, solo-learn's SupCon)")
        require(o.temperature > 0 and (o.base_temperature is None or o.base_temperature > 0),
                f"method.temperature and base_temperature must be > 0, got {o.temperature}, {o.base_temperature}")
        require(ctx.num_views >= 2 or o.labels == "dataset",
                "SimCLR needs at least 2 views per image (e.g. crops 2x32): one view has no positive")

    def __init__(self, options: SupConConfig, ctx: MethodContext, backbone: nn.Module):
        super().__init__(options, ctx)
        self.check(options, ctx)
        self.student = ContrastiveNet(backbone, ctx.feature_dim, options, ctx.forward_views)
        # null base temperature: the loss factor temperature / base_temperature is 1 (plain NT-Xent for SimCLR)
        self.base_temperature = options.temperature if options.base_temperature is None else options.base_temperature

    def training_step(self, views, labels, step):
        o = self.options
        batch = views[0].shape[0]
        features = self.run_student(views).view(len(views), batch, -1).transpose(0, 1)  # [B, V, D]
        loss = supcon_loss(features, labels if o.labels == "dataset" else None, o.temperature,
                           self.base_temperature, o.loss_form)
        return loss, {}

    def describe(self) -> str:
        kind = "SupCon" if self.options.labels == "dataset" else "SimCLR"
        return (f"{kind}: T={self.options.temperature}, base T={self.base_temperature}, "
                f"L_{self.options.loss_form}")


class SimCLR(SupCon):
    name = "simclr"
    config_class = SimCLRConfig
    crop_preset = "simclr"



