"""SDMP (Ren et al., 2022, "A Simple Data Mixing Prior for Improving Self-Supervised Learning").

A data-mixing prior on top of a base method. Per batch one of Mixup / CutMix / ResizeMix is picked
uniformly (same pick on every rank: drawn from (seed, step)); the first global crop of every image
is mixed with its flip partner in the *global* batch (index G - 1 - i, fetched from another rank
when needed) with lam ~ Beta(1, 1) per sample, recomputed as the visible share for box mixes.
The mixed images get soft targets (``trainers.losses.sdmp_targets``): against the clean images
("source": lam on itself, 1 - lam on the partner) and against the other mixed images ("mixed").

- ``base: moco_v3`` (default; Chen et al., 2021, "An Empirical Study of Training Self-Supervised
  Vision Transformers"): query encoder = backbone + 3-layer projector + 2-layer predictor,
  momentum encoder = backbone + projector (momentum 0.99 -> 1, cosine), InfoNCE at temperature 0.2
  scaled by 2T, symmetrised over the two views. Mixed queries are scored against the momentum keys
  of the clean second view (source targets) and of the mixed images (mixed targets).
- ``base: dino``: L = L_DINO + L_source + L_mixed, where the targets are the teacher's centred,
  sharpened distributions mixed with the same soft weights (clean second view for source, teacher
  on the mixed images for mixed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.distributed import all_gather_cat_no_grad, flip_partner_rows, rank
from trainers.heads import ProjectionHead
from trainers.losses import dino_loss, sdmp_targets, soft_cross_entropy
from trainers.methods.base import Method, MethodContext, ema_update, encode_views, make_teacher, require
from trainers.methods.dino import DINOConfig, DINONet, check_dino_options, teacher_temperature_schedule, update_center
from trainers.methods.mixing import MIX_MODES, mix
from trainers.optim import cosine_schedule

BASES = ("moco_v3", "dino")


@dataclass
class SDMPConfig(DINOConfig):
    base: str = "moco_v3"  # moco_v3 or dino
    mix_modes: list[str] = field(default_factory=lambda: list(MIX_MODES))  # picked uniformly per batch
    mix_alpha: float = 1.0  # lam ~ Beta(alpha, alpha)
    resizemix_scale: list[float] = field(default_factory=lambda: [0.1, 0.8])  # side of the pasted image
    mix_weight: float = 1.0  # weight of the source and mixed terms
    moco_temperature: float = 0.2
    moco_hidden_dim: int = 4096
    moco_out_dim: int = 256
    moco_predictor_hidden_dim: int = 4096
    moco_momentum: float = 0.99  # raised to 1 along a cosine over all steps


class MoCoEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, o: SDMPConfig):
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionHead(feature_dim, o.moco_hidden_dim, o.moco_out_dim, layers=3, last_bn=True)

    def forward(self, views):
        return self.projector(encode_views(self.backbone, views))


class MoCoStudent(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, o: SDMPConfig):
        super().__init__()
        self.encoder = MoCoEncoder(backbone, feature_dim, o)
        self.predictor = ProjectionHead(o.moco_out_dim, o.moco_predictor_hidden_dim, o.moco_out_dim, layers=2,
                                        last_bn=True)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, views):
        return self.predictor(self.encoder(views))


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss: each query against every key of the global batch, its own key the
    positive; cross-entropy times 2T."""
    queries, keys = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
    everyone = all_gather_cat_no_grad(keys)
    logits = queries @ everyone.t() / temperature
    targets = torch.arange(queries.shape[0], device=queries.device) + rank() * queries.shape[0]
    return F.cross_entropy(logits, targets) * (2 * temperature)


class SDMP(Method):
    name = "sdmp"
    config_class = SDMPConfig
    crop_preset = "sdmp"
    min_global_crops = 2

    @classmethod
    def check(cls, o: SDMPConfig, ctx: MethodContext) -> None:
        super().check(o, ctx)
        require(o.base in BASES, f"method.base '{o.base}' must be one of {', '.join(BASES)}")
        require(len(o.mix_modes) >= 1 and all(m in MIX_MODES for m in o.mix_modes),
                f"method.mix_modes {o.mix_modes} must be a non-empty list from {', '.join(MIX_MODES)}")
        require(o.mix_alpha > 0, f"method.mix_alpha must be > 0 (Beta(alpha, alpha); SDMP uses 1), got {o.mix_alpha}")
        lo, hi = (list(o.resizemix_scale) + [0, 0])[:2]
        require(len(o.resizemix_scale) == 2 and 0 < lo <= hi <= 1,
                f"method.resizemix_scale {o.resizemix_scale} must be [min, max] with 0 < min <= max <= 1")
        require(o.mix_weight >= 0, f"method.mix_weight must be >= 0, got {o.mix_weight}")
        if o.base == "moco_v3":
            require(o.moco_temperature > 0, f"method.moco_temperature must be > 0 (MoCo v3: 0.2), got {o.moco_temperature}")
            require(0 <= o.moco_momentum <= 1, f"method.moco_momentum must lie in [0, 1], got {o.moco_momentum}")
            require(ctx.num_views == 2, f"SDMP with base moco_v3 uses exactly 2 global crops, the crop spec gives "
                                        f"{ctx.num_views} views: use e.g. crops 2x32, or base dino for local crops")
        else:
            check_dino_options(o, ctx)

    def __init__(self, options: SDMPConfig, ctx: MethodContext, backbone: nn.Module):
        super().__init__(options, ctx)
        self.check(options, ctx)
        if options.base == "moco_v3":
            self.student = MoCoStudent(backbone, ctx.feature_dim, options)
            self.teacher = make_teacher(self.student.encoder)
            self.momenta = cosine_schedule(options.moco_momentum, 1.0, ctx.total_steps)
        else:
            self.student = DINONet(backbone, ctx.feature_dim, options)
            self.teacher = make_teacher(self.student)
            self.register_buffer("center", torch.zeros(options.out_dim))
            self.teacher_temperatures = teacher_temperature_schedule(options, ctx.epochs)
            self.momenta = cosine_schedule(options.teacher_momentum, 1.0, ctx.total_steps)

    # ------------------------------------------------------------------ mixing
    def mix_mode(self, step: int) -> str:
        """The same pick on every rank, reproducible from (seed, step) alone."""
        modes = self.options.mix_modes
        return modes[int(np.random.default_rng([self.ctx.seed, step]).integers(len(modes)))]

    def mixed_batch(self, images: torch.Tensor, step: int):
        """Images mixed with their global flip partners; the global source / mixed targets of this
        rank's rows."""
        o = self.options
        batch = images.shape[0]
        alpha = torch.tensor(o.mix_alpha, device=images.device)
        # validate_args=False: the argument checks read values back from the device (a host sync per
        # check, every step); mix_alpha > 0 is checked once in check()
        lam = torch.distributions.Beta(alpha, alpha, validate_args=False).sample((batch,))
        partners = flip_partner_rows(images)
        mixed, lam = mix(images, partners, lam, self.mix_mode(step), tuple(o.resizemix_scale))
        source, mixed_targets = sdmp_targets(all_gather_cat_no_grad(lam))
        rows = slice(rank() * batch, (rank() + 1) * batch)
        return mixed, source[rows], mixed_targets[rows]

    # ------------------------------------------------------------------ steps
    def training_step(self, views, labels, step):
        mixed, source_targets, mixed_targets = self.mixed_batch(views[0], step)
        if self.options.base == "moco_v3":
            return self._moco_step(views, mixed, source_targets, mixed_targets)
        return self._dino_step(views, mixed, source_targets, mixed_targets, step)

    def _moco_step(self, views, mixed, source_targets, mixed_targets):
        o = self.options
        t = o.moco_temperature
        q1, q2, q_mix = self.run_student([views[0], views[1], mixed]).chunk(3)
        with torch.no_grad():
            k1, k2, k_mix = self.teacher([views[0], views[1], mixed]).chunk(3)
        contrastive = info_nce(q1, k2, t) + info_nce(q2, k1, t)
        q_mix = F.normalize(q_mix.float(), dim=1)
        keys_clean = all_gather_cat_no_grad(F.normalize(k2.float(), dim=1))
        keys_mixed = all_gather_cat_no_grad(F.normalize(k_mix.float(), dim=1))
        source = soft_cross_entropy(q_mix @ keys_clean.t(), source_targets, t) * (2 * t)
        mixed_term = soft_cross_entropy(q_mix @ keys_mixed.t(), mixed_targets, t) * (2 * t)
        loss = contrastive + o.mix_weight * (source + mixed_term)
        return loss, {"loss_base": contrastive.detach(), "loss_source": source.detach(),
                      "loss_mixed": mixed_term.detach()}

    def _dino_step(self, views, mixed, source_targets, mixed_targets, step):
        o = self.options
        globals_ = self.ctx.num_global
        tau_t = float(self.teacher_temperatures[min(self.epoch_of(step), len(self.teacher_temperatures) - 1)])
        with torch.no_grad():
            teacher_all = self.teacher(list(views[:globals_]) + [mixed]).chunk(globals_ + 1)
        teacher, teacher_mixed = list(teacher_all[:globals_]), teacher_all[globals_]
        # mixed image right after the globals: one backbone call for all global-size inputs
        student_all = self.run_student(list(views[:globals_]) + [mixed] + list(views[globals_:])).chunk(len(views) + 1)
        student = list(student_all[:globals_]) + list(student_all[globals_ + 1:])
        student_mixed = student_all[globals_]
        base = dino_loss(student, teacher, self.center, o.student_temperature, tau_t)
        with torch.no_grad():
            def sharpened(logits):
                return F.softmax((logits.float() - self.center) / tau_t, dim=-1)
            source_probs = all_gather_cat_no_grad(sharpened(teacher[1]))
            mixed_probs = all_gather_cat_no_grad(sharpened(teacher_mixed))
        source = soft_cross_entropy(student_mixed, source_targets @ source_probs, o.student_temperature)
        mixed_term = soft_cross_entropy(student_mixed, mixed_targets @ mixed_probs, o.student_temperature)
        update_center(self.center, teacher, o.center_momentum)
        loss = base + o.mix_weight * (source + mixed_term)
        return loss, {"loss_base": base.detach(), "loss_source": source.detach(), "loss_mixed": mixed_term.detach()}

    def before_optimizer_step(self, step: int) -> None:
        if self.options.base == "dino" and self.epoch_of(step) < self.options.freeze_last_layer_epochs:
            for param in self.student.head.last_layer_parameters():
                param.grad = None

    def after_optimizer_step(self, step: int) -> None:
        student = self.student.encoder if self.options.base == "moco_v3" else self.student
        ema_update(self.teacher, student, float(self.momenta[min(step, len(self.momenta) - 1)]))

    def eval_backbone(self) -> nn.Module:
        # MoCo v3 evaluates the query encoder's backbone, DINO the teacher's
        return self.student.backbone if self.options.base == "moco_v3" else self.teacher.backbone

    def describe(self) -> str:
        return f"SDMP on {self.options.base}: mixes {'/'.join(self.options.mix_modes)}, weight {self.options.mix_weight}"



