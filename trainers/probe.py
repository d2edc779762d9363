"""Online linear probe: a linear classifier trained beside pretraining on frozen features.

The headline metric of solo-learn (vturrisi/solo-learn, solo/methods/base.py, ``self.classifier``,
commit 9187ea39c2c3f43c455ab06664d2b019a9802954): a ``nn.Linear(feature_dim, num_classes)`` on the
*detached* backbone features of the large (global) crops of every training batch, cross-entropy with
the data set's labels, weight decay 0, lr ``classifier_lr`` = 0.1 per 256 images (scaled by the batch
as the backbone's lr, solo/args/pretrain.py) under the backbone's warm-up + cosine schedule, SGD
momentum 0.9 (its sgd/lars default); measured each epoch on the held-out split.

Differences, on purpose: the probe has its own SGD optimizer (the backbone's optimizer never sees
it, whatever ``optim.name`` is), and it reads the *evaluation* backbone (``method.eval_backbone()``:
the teacher for DINO, as the online kNN does) in eval mode under ``no_grad`` -- one extra forward
of the global crops per step that leaves every weight and BN statistic of the run untouched, with
the features the held-out evaluation sees. Under DDP its gradients are averaged over the ranks
(equal shards: the mean of the ranks' mean losses is the global batch's mean loss), so every rank
holds the same probe.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainers.distributed import is_distributed, world_size


class OnlineLinearProbe(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, seed: int = 0, device="cpu"):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same start on every rank; the run's draws stay as they were
            torch.manual_seed(seed)
            self.linear = nn.Linear(feature_dim, num_classes).to(device)
        self.num_classes = num_classes
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)

    @staticmethod
    @torch.no_grad()
    def features(backbone: nn.Module, views: Sequence[torch.Tensor], autocast_dtype=None) -> torch.Tensor:
        """Float32 features [V*B, D] of ``views`` (the global crops: one size) through ``backbone`` in
        eval mode; its mode is restored after."""
        was_training = backbone.training
        backbone.eval()
        try:
            x = torch.cat(list(views)) if len(views) > 1 else views[0]
            with torch.autocast(device_type=x.device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                return backbone(x).float()
        finally:
            backbone.train(was_training)

    def train_step(self, features: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        """One SGD step on (detached) ``features`` [V*B, D] and the batch's ``labels`` [B] (repeated per
        view); returns the cross-entropy (a tensor: no host sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        labels = labels.to(features.device, non_blocking=True).long().view(-1)
        targets = labels.repeat(features.shape[0] // labels.shape[0])
        with torch.autocast(device_type=features.device.type, enabled=False):
            loss = F.cross_entropy(self.linear(features.detach().float()), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if is_distributed():  # average over ranks, as DDP does for the backbone: one flat all-reduce
            grads = [p.grad for p in self.linear.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= world_size()
            for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, features: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
        """``{"online_linear_top1": ..., "online_linear_top5": ...}`` (fractions) on raw features [N, D]."""
        hits1 = hits5 = 0
        labels = labels.to(features.device).long().view(-1)
        top = min(5, self.num_classes)
        for start in range(0, features.shape[0], chunk):
            logits = self.linear(features[start:start + chunk].float())
            best = logits.topk(top, dim=1).indices
            hit = best == labels[start:start + chunk].view(-1, 1)
            hits1 += int(hit[:, 0].sum())
            hits5 += int(hit.any(dim=1).sum())
        n = max(features.shape[0], 1)
        return {"online_linear_top1": hits1 / n, "online_linear_top5": hits5 / n}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        return {"linear": self.linear.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        """Weights and momentum from ``state``; momentum and weight decay stay this run's settings."""
        import copy

        settings = [(g["momentum"], g["weight_decay"]) for g in self.optimizer.param_groups]
        before = copy.deepcopy(self.checkpoint_state())
        try:
            self.linear.load_state_dict(state["linear"])
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception:
            self.linear.load_state_dict(before["linear"])  # all or nothing
            self.optimizer.load_state_dict(before["optimizer"])
            raise
        for group, (momentum, weight_decay) in zip(self.optimizer.param_groups, settings):
            group["momentum"], group["weight_decay"] = momentum, weight_decay
