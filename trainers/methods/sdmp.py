"""SDMP (Ren et al., 2022, "A Simple Data Mixing Prior for Improving Self-Supervised Learning").

A data-mixing prior on top of a base method, after the released code (OliverRensu/SDMP,
moco/moco/builder.py ``MoCo.forward``, commit cd26a51, unchanged in its terms at 8615686). Per
step (same draws on every rank, from (seed, step) alone) one of ``mix_modes`` (default Mixup /
CutMix / ResizeMix) is picked uniformly and the two global crops are randomly assigned the roles
a and b. lam ~ Beta(1, 1) per sample; *both* views are mixed with their flip partners in the
*global* batch (index G - 1 - i, fetched from another rank when needed) with that same lam (box
places drawn independently per view, the visible share recomputed for box mixes):

- the mixed view b is the query (student);
- source term: its keys are the teacher's clean view a, soft targets lam on i, 1 - lam on the
  partner;
- mixed term: its keys are the teacher's *mixed view a* (the other view, same partners, same lam),
  soft targets 1/(1+c) on i and c/(1+c) on the partner, c the content the two mixes share
  (``trainers.losses.sdmp_targets``). Never the query's own mixed image (a trivial positive).

Both terms are soft cross-entropies (the paper's pseudo-code and commit cd26a51; the last commit
scores -log(lam p_i + (1 - lam) p_partner) instead), each weighted by ``mix_weight`` = 0.5 (the
released code halves both).

Two classes, one per base, each with its own options (``method.base`` picks one; both share the
mixing in ``DataMixingPrior``):

- ``base: moco_v3`` (default, ``SDMPMoCo`` / ``SDMPMoCoConfig``; Chen et al., 2021, "An Empirical Study of Training Self-Supervised
  Vision Transformers"): L = InfoNCE(q(a), k(b)) + 0.5 (L_source + L_mixed), as the released code:
  the clean query is view a only (the mixed view b takes the place of MoCo v3's second query).
  Query encoder = backbone + projector + predictor, momentum encoder = backbone + projector
  (momentum 0.99 -> 1, cosine), InfoNCE at temperature 0.2 scaled by 2T. Heads by backbone as in
  facebookresearch/moco-v3 moco/builder.py (337f3c9): ResNets a 2-layer projector and a 2-layer
  predictor without its final BN (``MoCo_ResNet``), ViTs a 3-layer projector and a 2-layer
  predictor with it (``MoCo_ViT``); no biases, BN after every hidden layer.
- ``base: dino`` (``SDMPDINO`` / ``SDMPDINOConfig``: DINO and its options plus the mixing): L = L_DINO (all crops) + 0.5 (L_source + L_mixed); the student sees the mixed
  view b, the targets are the teacher's centred, sharpened distributions of the clean view a
  (source) and of the mixed view a (mixed), combined with the same soft weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.backbones import VITS
from trainers.distributed import all_gather_cat_no_grad, flip_partner_rows, rank
from trainers.heads import ProjectionHead
from trainers.losses import info_nce, sdmp_targets, soft_cross_entropy
from trainers.methods.base import MethodContext, MomentumMethod, encode_views, require
from trainers.methods.dino import DINO, DINOConfig
from trainers.methods.mixing import MIX_MODES, mix

BASES = ("moco_v3", "dino")


@dataclass
class MixingOptions:
    """What both SDMP variants mix and how much it weighs."""

    base: str = "moco_v3"  # moco_v3 or dino: picks the class (SDMPMoCo or SDMPDINO)
    mix_modes: list[str] = field(default_factory=lambda: list(MIX_MODES))  # picked uniformly per step
    mix_alpha: float = 1.0  # lam ~ Beta(alpha, alpha)
    resizemix_lam: list[float] = field(default_factory=lambda: [0.1, 0.9])  # lam mapped onto this (SDMP code)
    mix_weight: float = 0.5  # weight of the source and of the mixed term (the released code's / 2)


@dataclass
class SDMPMoCoConfig(MixingOptions):
    moco_temperature: float = 0.2
    moco_hidden_dim: int = 4096
    moco_out_dim: int = 256
    moco_predictor_hidden_dim: int = 4096
    moco_momentum: float = 0.99  # raised to 1 along a cosine over all steps


@dataclass
class SDMPDINOConfig(DINOConfig, MixingOptions):
    base: str = "dino"


def sdmp_config(base: str = "moco_v3", **options) -> SDMPMoCoConfig | SDMPDINOConfig:
    """The options dataclass of ``base`` (TypeError for an option of the other base)."""
    return {"moco_v3": SDMPMoCoConfig, "dino": SDMPDINOConfig}[base](base=base, **options)


def is_vit(backbone_name: str) -> bool:
    return backbone_name in VITS


class MoCoEncoder(nn.Module):
    """Backbone + projector: 3 layers for a ViT, 2 for a ResNet (MoCo v3), BN without affine last."""

    def __init__(self, backbone: nn.Module, feature_dim: int, o: SDMPMoCoConfig, vit: bool,
                 forward_views: str = "by_size"):
        super().__init__()
        self.backbone, self.forward_views = backbone, forward_views
        self.projector = ProjectionHead(feature_dim, o.moco_hidden_dim, o.moco_out_dim, layers=3 if vit else 2,
                                        last_bn=True, last_bias=False)

    def forward(self, views, after: nn.Module | None = None):
        """Projections of ``views`` (then ``after``, the student's predictor, per forward call)."""
        head = self.projector if after is None else (lambda features: after(self.projector(features)))
        return encode_views(self.backbone, views, self.forward_views, head)


class MoCoStudent(nn.Module):
    """Query encoder: MoCoEncoder + 2-layer predictor, with the final BN for a ViT only (MoCo v3)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, o: SDMPMoCoConfig, vit: bool,
                 forward_views: str = "by_size"):
        super().__init__()
        self.encoder = MoCoEncoder(backbone, feature_dim, o, vit, forward_views)
        self.predictor = ProjectionHead(o.moco_out_dim, o.moco_predictor_hidden_dim, o.moco_out_dim, layers=2,
                                        last_bn=vit, last_bias=False)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, views):
        return self.encoder(views, after=self.predictor)


class DataMixingPrior:
    """SDMP's mixing, shared by both bases: per step a mix mode and the two global crops' roles drawn from
    (seed, step) alone, both views mixed with their global flip partners with the same lam, and the soft
    targets of the source and the mixed term. Mixed into a Method subclass (``SDMPMoCo``, ``SDMPDINO``)."""

    name = "sdmp"
    crop_preset = "sdmp"
    min_global_crops = 2

    @staticmethod
    def check_mixing(o: MixingOptions) -> None:
        require(len(o.mix_modes) >= 1 and all(m in MIX_MODES for m in o.mix_modes),
                f"method.mix_modes {o.mix_modes} must be a non-empty list from {', '.join(MIX_MODES)}")
        require(o.mix_alpha > 0, f"method.mix_alpha must be > 0 (Beta(alpha, alpha); SDMP uses 1), got {o.mix_alpha}")
        lo, hi = (list(o.resizemix_lam) + [-1, -1])[:2]
        require(len(o.resizemix_lam) == 2 and 0 <= lo <= hi <= 1,
                f"method.resizemix_lam {o.resizemix_lam} must be [min, max] with 0 <= min <= max <= 1 "
                f"(SDMP: [0.1, 0.9])")
        require(o.mix_weight >= 0, f"method.mix_weight must be >= 0, got {o.mix_weight}")

    def draws(self, step: int) -> tuple[str, bool]:
        """(mix mode, whether the views swap roles): the same on every rank, from (seed, step) alone."""
        modes = self.options.mix_modes
        rng = np.random.default_rng([self.ctx.seed, step])
        return modes[int(rng.integers(len(modes)))], bool(rng.random() < 0.5)

    def mix_mode(self, step: int) -> str:
        return self.draws(step)[0]

    def roles(self, step: int) -> tuple[int, int]:
        """Indices (a, b) of the two global crops: b is mixed into the query, a is the key side."""
        return (1, 0) if self.draws(step)[1] else (0, 1)

    def mixed_views(self, query_images: torch.Tensor, key_images: torch.Tensor, mode: str):
        """Both views mixed with their global flip partners with the same lam: (mixed query [B, ...],
        mixed key [B, ...], source targets [B, G], mixed targets [B, G]), the targets this rank's rows."""
        o = self.options
        batch = query_images.shape[0]
        alpha = torch.tensor(o.mix_alpha, device=query_images.device)
        # validate_args=False: the argument checks read values back from the device (a host sync per
        # check, every step); mix_alpha > 0 is checked once in check()
        lam = torch.distributions.Beta(alpha, alpha, validate_args=False).sample((batch,))
        scale = tuple(o.resizemix_lam)
        mixed_query, lam_query = mix(query_images, flip_partner_rows(query_images), lam, mode, scale)
        mixed_key, lam_key = mix(key_images, flip_partner_rows(key_images), lam, mode, scale)
        source, mixed_targets = sdmp_targets(all_gather_cat_no_grad(lam_query), all_gather_cat_no_grad(lam_key))
        rows = slice(rank() * batch, (rank() + 1) * batch)
        return mixed_query, mixed_key, source[rows], mixed_targets[rows]

    def mix_step(self, views, step: int):
        """This step's roles and mixes: (a, b, mixed b, mixed a, source targets, mixed targets)."""
        a, b = self.roles(step)
        return (a, b, *self.mixed_views(views[b], views[a], self.mix_mode(step)))

    def describe(self) -> str:
        return f"SDMP on {self.options.base}: mixes {'/'.join(self.options.mix_modes)}, weight {self.options.mix_weight}"


class SDMPMoCo(DataMixingPrior, MomentumMethod):
    """SDMP on MoCo v3: L = InfoNCE(q(a), k(b)) + w (L_source + L_mixed)."""

    config_class = SDMPMoCoConfig

    @classmethod
    def check(cls, o: SDMPMoCoConfig, ctx: MethodContext) -> None:
        super().check(o, ctx)
        cls.check_mixing(o)
        require(o.moco_temperature > 0, f"method.moco_temperature must be > 0 (MoCo v3: 0.2), got {o.moco_temperature}")
        require(0 <= o.moco_momentum <= 1, f"method.moco_momentum must lie in [0, 1], got {o.moco_momentum}")
        require(ctx.num_views == 2, f"SDMP with base moco_v3 uses exactly 2 global crops, the crop spec gives "
                                    f"{ctx.num_views} views: use e.g. crops 2x32, or base dino for local crops")

    def __init__(self, options: SDMPMoCoConfig, ctx: MethodContext, backbone: nn.Module):
        super().__init__(options, ctx)
        self.check(options, ctx)
        self.student = MoCoStudent(backbone, ctx.feature_dim, options, is_vit(ctx.backbone), ctx.forward_views)
        self.init_teacher(self.student.encoder, options.moco_momentum)

    def ema_source(self) -> nn.Module:
        return self.student.encoder  # the momentum encoder mirrors backbone + projector, not the predictor

    def training_step(self, views, labels, step):
        o = self.options
        t = o.moco_temperature
        a, b, mixed_b, mixed_a, source_targets, mixed_targets = self.mix_step(views, step)
        q_a, q_mix = self.run_student([views[a], mixed_b]).chunk(2)
        with torch.no_grad():
            k_a, k_b, k_mix = self.teacher([views[a], views[b], mixed_a]).chunk(3)
        contrastive = info_nce(q_a, k_b, t)
        q_mix = F.normalize(q_mix.float(), dim=1)
        keys_clean = all_gather_cat_no_grad(F.normalize(k_a.float(), dim=1))
        keys_mixed = all_gather_cat_no_grad(F.normalize(k_mix.float(), dim=1))
        source = soft_cross_entropy(q_mix @ keys_clean.t(), source_targets, t) * (2 * t)
        mixed_term = soft_cross_entropy(q_mix @ keys_mixed.t(), mixed_targets, t) * (2 * t)
        loss = contrastive + o.mix_weight * (source + mixed_term)
        return loss, {"loss_base": contrastive.detach(), "loss_source": source.detach(),
                      "loss_mixed": mixed_term.detach()}

    def eval_backbone(self) -> nn.Module:
        return self.student.backbone  # MoCo v3 evaluates the query encoder's backbone

    def describe(self) -> str:
        heads = "ViT" if is_vit(self.ctx.backbone) else "ResNet"
        return f"{super().describe()}, MoCo v3 {heads} heads"


class SDMPDINO(DataMixingPrior, DINO):
    """SDMP on DINO: DINO (its heads, teacher, criterion, frozen last layer) plus w (L_source + L_mixed)."""

    config_class = SDMPDINOConfig

    @classmethod
    def check(cls, o: SDMPDINOConfig, ctx: MethodContext) -> None:
        super().check(o, ctx)  # DINO's checks
        cls.check_mixing(o)

    def training_step(self, views, labels, step):
        o = self.options
        epoch = self.epoch_of(step)
        globals_ = self.ctx.num_global
        a, _, mixed_b, mixed_a, source_targets, mixed_targets = self.mix_step(views, step)
        with torch.no_grad():
            teacher_all = self.teacher(list(views[:globals_]) + [mixed_a]).chunk(globals_ + 1)
        teacher, teacher_mixed = list(teacher_all[:globals_]), teacher_all[globals_]
        # the mixed view right after the globals: one backbone call for all global-size inputs
        student_all = self.run_student(list(views[:globals_]) + [mixed_b] + list(views[globals_:])).chunk(len(views) + 1)
        student = list(student_all[:globals_]) + list(student_all[globals_ + 1:])
        student_mixed = student_all[globals_]
        base = self.criterion.loss(student, teacher, epoch)
        source_probs = all_gather_cat_no_grad(self.criterion.targets(teacher[a], epoch))
        mixed_probs = all_gather_cat_no_grad(self.criterion.targets(teacher_mixed, epoch))
        source = soft_cross_entropy(student_mixed, source_targets @ source_probs, o.student_temperature)
        mixed_term = soft_cross_entropy(student_mixed, mixed_targets @ mixed_probs, o.student_temperature)
        self.criterion.update_center(teacher)
        loss = base + o.mix_weight * (source + mixed_term)
        return loss, {"loss_base": base.detach(), "loss_source": source.detach(), "loss_mixed": mixed_term.detach()}
