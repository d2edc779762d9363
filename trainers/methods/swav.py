"""SwAV (Caron et al., 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments"). Defaults from the reference code (facebookresearch/swav): 3000 prototypes, embedding
128, temperature 0.1, epsilon 0.05, 3 Sinkhorn iterations, codes from the 2 global crops,
prototypes frozen for the first epoch (``freeze_prototypes_epochs`` / ``freeze_prototypes_steps``), no
queue (batch-4096 recipe; the batch-256 recipe uses a 3840-long queue from epoch 15).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainers.heads import ProjectionHead, Prototypes
from trainers.losses import swav_loss
from trainers.methods.base import Method, MethodContext, encode_views, require


@dataclass
class SwAVConfig:
    prototypes: int = 3000  # K
    out_dim: int = 128  # embedding size
    hidden_dim: int | None = None  # projection hidden size; None: the backbone width (2048 RN50, 512 RN18)
    temperature: float = 0.1
    epsilon: float = 0.05  # Sinkhorn entropy regularisation
    sinkhorn_iterations: int = 3
    assign_crops: list[int] = field(default_factory=lambda: [0, 1])  # crops whose codes are predicted
    freeze_prototypes_steps: int | None = None  # prototype gradients dropped for this many steps
    freeze_prototypes_epochs: int | None = None  # ... or for this many epochs; both None: 1 epoch
    queue_length: int = 0  # stored embeddings per assign crop (global); 0: no queue
    queue_start_epoch: int = 15  # the queue is filled from this epoch and used once full


class SwAVNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, options: SwAVConfig, forward_views: str = "by_size"):
        super().__init__()
        self.backbone, self.forward_views = backbone, forward_views
        self.projector = ProjectionHead(feature_dim, options.hidden_dim or feature_dim, options.out_dim)
        self.prototypes = Prototypes(options.out_dim, options.prototypes)

    def forward(self, views):
        embeddings = F.normalize(encode_views(self.backbone, views, self.forward_views, self.projector), dim=1)
        return embeddings, self.prototypes(embeddings, normalized=True)


class SwAV(Method):
    name = "swav"
    config_class = SwAVConfig
    crop_preset = "swav"

    @classmethod
    def check(cls, o: SwAVConfig, ctx: MethodContext) -> None:
        super().check(o, ctx)
        require(o.temperature > 0, f"method.temperature must be > 0 (SwAV uses 0.1), got {o.temperature}")
        require(o.epsilon > 0, f"method.epsilon must be > 0 (SwAV uses 0.05; try 0.03 if codes collapse), "
                               f"got {o.epsilon}")
        require(o.sinkhorn_iterations >= 1, f"method.sinkhorn_iterations must be >= 1 (SwAV uses 3), "
                                            f"got {o.sinkhorn_iterations}")
        require(o.prototypes >= 2, f"method.prototypes must be >= 2, got {o.prototypes}")
        require(len(o.assign_crops) >= 1 and len(set(o.assign_crops)) == len(o.assign_crops),
                f"method.assign_crops {o.assign_crops} must list distinct crop indices")
        require(all(0 <= c < ctx.num_views for c in o.assign_crops),
                f"method.assign_crops {o.assign_crops} refers to crops that do not exist "
                f"(the crop spec gives {ctx.num_views} views, indices 0..{ctx.num_views - 1})")
        require(ctx.num_views >= 2, "SwAV needs at least 2 views (e.g. crops 2x32)")
        if o.queue_length:
            require(o.queue_length >= ctx.global_batch,
                    f"method.queue_length {o.queue_length} is smaller than the global batch {ctx.global_batch}: "
                    f"use 0 (no queue) or at least {ctx.global_batch}")
            lower, upper = o.queue_length // ctx.global_batch * ctx.global_batch, \
                -(-o.queue_length // ctx.global_batch) * ctx.global_batch
            require(o.queue_length % ctx.global_batch == 0,
                    f"method.queue_length {o.queue_length} is not a multiple of the global batch {ctx.global_batch} "
                    f"(the queue holds whole batches): use {lower} or {upper}")
            require(0 <= o.queue_start_epoch < ctx.epochs,
                    f"method.queue_start_epoch {o.queue_start_epoch} is beyond the last epoch ({ctx.epochs - 1}): "
                    "the queue would never be used; lower it or set method.queue_length=0")
        require(o.queue_length >= 0, f"method.queue_length must be >= 0, got {o.queue_length}")
        require(o.freeze_prototypes_steps is None or o.freeze_prototypes_steps >= 0,
                f"method.freeze_prototypes_steps must be >= 0 or null (one epoch), got {o.freeze_prototypes_steps}")
        require(o.freeze_prototypes_epochs is None or o.freeze_prototypes_epochs >= 0,
                f"method.freeze_prototypes_epochs must be >= 0 or null (one epoch), got {o.freeze_prototypes_epochs}")
        require(o.freeze_prototypes_steps is None or o.freeze_prototypes_epochs is None,
                "method.freeze_prototypes_steps and method.freeze_prototypes_epochs are both set: keep one, "
                "set the other to null")
        if o.prototypes <= o.out_dim:
            # measured on CIFAR-10 (BENCHMARKS.md, CPU learning check): 100 prototypes for a 128-d embedding
            # stayed on the ln K plateau, since an embedding can score all prototypes equally
            warnings.warn(f"method.prototypes {o.prototypes} is not more than method.out_dim {o.out_dim}: SwAV "
                          f"tends to collapse to uniform codes then; use more prototypes (e.g. "
                          f"{max(3 * o.out_dim, 300)}) or a smaller out_dim", UserWarning, stacklevel=2)

    def __init__(self, options: SwAVConfig, ctx: MethodContext, backbone: nn.Module):
        super().__init__(options, ctx)
        self.check(options, ctx)
        self.student = SwAVNet(backbone, ctx.feature_dim, options, ctx.forward_views)
        if options.freeze_prototypes_steps is not None:
            self.freeze_steps = options.freeze_prototypes_steps
        else:
            epochs = 1 if options.freeze_prototypes_epochs is None else options.freeze_prototypes_epochs
            self.freeze_steps = epochs * ctx.steps_per_epoch
        # the queue holds whole global batches (check() refuses other lengths); each rank keeps its share
        self.queue_length = options.queue_length
        local_rows = options.queue_length // ctx.world_size
        self.register_buffer("queue", torch.zeros(len(options.assign_crops), local_rows, options.out_dim))
        self.queue_start_step = options.queue_start_epoch * ctx.steps_per_epoch

    def before_step(self, step: int) -> None:
        self.student.prototypes.normalize_()

    def _queue_active(self, step: int) -> bool:
        return self.queue_length > 0 and self.epoch_of(step) >= self.options.queue_start_epoch

    def training_step(self, views, labels, step):
        o = self.options
        embeddings, scores = self.run_student(views)
        batch = views[0].shape[0]
        crop_scores = scores.view(len(views), batch, -1)  # [V, B, K]
        queue_scores = None
        active = self.value("queue_active", step)
        full = self.value("queue_full", step) if torch.compiler.is_compiling() else self._queue_full(step, batch)
        if active and full:
            weight = self.student.prototypes.layer.weight.detach()
            queue_scores = [self.queue[slot] @ weight.t().to(self.queue.dtype) for slot in range(len(o.assign_crops))]
        loss = swav_loss(crop_scores, o.temperature, o.epsilon, o.sinkhorn_iterations, o.assign_crops, queue_scores)
        if active:
            with torch.no_grad():
                stored = embeddings.detach().float().view(len(views), batch, -1)
                for slot, crop in enumerate(o.assign_crops):
                    # newest first: shift the queue down by one batch
                    self.queue[slot, batch:] = self.queue[slot, :-batch].clone()
                    self.queue[slot, :batch] = stored[crop]
        return loss, {}

    def _queue_full(self, step: int, batch: int) -> bool:
        # batches stored so far follow from the step: no counter to sync with the device
        return (step - self.queue_start_step) * batch >= self.queue.shape[1]

    def step_values(self, step: int) -> dict:
        return {**super().step_values(step), "queue_active": self._queue_active(step),
                "queue_full": self._queue_full(step, self.ctx.global_batch // self.ctx.world_size),
                "freeze_prototypes": step < self.freeze_steps}

    def before_optimizer_step(self, step: int) -> None:
        if self.value("freeze_prototypes", step):
            for param in self.student.prototypes.parameters():
                param.grad = None

    def describe(self) -> str:
        q = f", queue {self.queue_length} from epoch {self.options.queue_start_epoch}" if self.queue_length else ""
        return f"SwAV: {self.options.prototypes} prototypes, T={self.options.temperature}, eps={self.options.epsilon}{q}"

