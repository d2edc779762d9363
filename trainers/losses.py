"""Self-supervised losses as pure functions: tensors in, a scalar (or codes / targets) out.

Each docstring names the paper and the defaults. Under torch.distributed every quantity defined
over "the batch" uses the global batch (see ``trainers.distributed``); in one process the same
code runs unchanged. Losses are computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from trainers.distributed import (all_gather_cat, all_gather_cat_no_grad, all_reduce_max, all_reduce_sum, rank,
                                  world_size)


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


# --------------------------------------------------------------------------- SwAV
def _global_logsumexp(values: torch.Tensor, dim: int | None) -> torch.Tensor:
    """log(sum(exp(values))) over ``dim`` (None: all entries) and over every rank's share."""
    peak = values.amax() if dim is None else values.amax(dim=dim, keepdim=True)
    peak = all_reduce_max(peak.detach().clone())
    total = torch.exp(values - peak)
    total = total.sum() if dim is None else total.sum(dim=dim, keepdim=True)
    return peak + torch.log(all_reduce_sum(total))


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's equipartitioned soft codes (Caron et al., 2020, "Unsupervised Learning of Visual
    Features by Contrasting Cluster Assignments", Sec. 3.1; epsilon 0.05, 3 iterations).

    ``scores`` [B, K]: prototype scores of this rank's samples. Q = exp(scores / epsilon) is scaled
    alternately so that every prototype gets an equal share of the *global* batch (sums all-reduced
    across ranks) and every sample's codes sum to 1. Returns [B, K] codes whose rows sum to 1;
    column sums approach B/K as the iterations grow. Computed in the log domain in float32 (float64
    inputs stay float64), whatever the autocast dtype: exp(1 / 0.05) overflows fp16, and in the
    plain domain a sample far from every prototype underflows to a column of zeros.
    """
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"sinkhorn needs epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_codes = (_float32(scores) / epsilon).t()  # [K, B]
        prototypes = log_codes.shape[0]
        log_batch = math.log(log_codes.shape[1] * world_size())
        log_codes = log_codes - _global_logsumexp(log_codes, None)
        for _ in range(iterations):
            # each prototype (row) gets 1/K of the mass of the global batch
            log_codes = log_codes - _global_logsumexp(log_codes, 1) - math.log(prototypes)
            # each sample (column) gets 1/B of the mass; a sample lives on one rank only
            log_codes = log_codes - torch.logsumexp(log_codes, dim=0, keepdim=True) - log_batch
        return torch.exp(log_codes + log_batch).t()


def swav_loss(scores: Sequence[torch.Tensor], temperature: float = 0.1, epsilon: float = 0.05,
              sinkhorn_iterations: int = 3, assign_crops: Sequence[int] = (0, 1),
              queue: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """SwAV swapped prediction loss (Caron et al., 2020; temperature 0.1, epsilon 0.05, 3 Sinkhorn
    iterations, codes from the two global crops).

    ``scores``: one [B, K] tensor per crop (normalised embeddings times normalised prototypes).
    For each crop in ``assign_crops`` its Sinkhorn codes (no gradient) are predicted from every other
    crop by cross-entropy against softmax(scores / temperature); each sub-loss is divided by
    (number of crops - 1), the sum by len(assign_crops). ``queue``: one [Q, K] score tensor per
    assign crop (stored embeddings times the current prototypes): Sinkhorn then runs on the queue
    rows plus the batch, and only the batch rows' codes are used.
    """
    if len(scores) < 2:
        raise ValueError(f"swav_loss needs at least 2 crops, got {len(scores)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if queue is not None and len(queue) != len(assign_crops):
        raise ValueError(f"queue needs one score tensor per assign crop ({len(assign_crops)}), got {len(queue)}")
    stacked = _stack_crops(scores, "scores")
    log_probs = F.log_softmax(_float32(stacked) / temperature, dim=-1)  # [V, B, K], one kernel for all crops
    summed = log_probs.sum(dim=0)
    total = log_probs.new_zeros(())
    for slot, crop in enumerate(assign_crops):
        batch = stacked.shape[1]
        with torch.no_grad():
            source = stacked[crop].detach()
            if queue is not None:
                source = torch.cat([queue[slot].detach().to(source.dtype), source])
            codes = sinkhorn(source, epsilon, sinkhorn_iterations)[-batch:]
        # codes predicted from every other crop: sum over all crops minus the crop itself
        others = summed - log_probs[crop]
        total = total - (codes * others).sum(dim=1).mean() / (len(scores) - 1)
    return total / len(assign_crops)


# --------------------------------------------------------------------------- DINO
def _stack_crops(crops: Sequence[torch.Tensor] | torch.Tensor, name: str) -> torch.Tensor:
    """[crops, B, D] from a list of [B, D] tensors, or a tensor already shaped so (no copy then)."""
    if isinstance(crops, torch.Tensor):
        if crops.ndim != 3:
            raise ValueError(f"{name}: expected [crops, B, D] or a list of [B, D] tensors, got {tuple(crops.shape)}")
        return crops
    return torch.stack(list(crops))


def dino_loss(student: Sequence[torch.Tensor] | torch.Tensor, teacher: Sequence[torch.Tensor] | torch.Tensor,
              center: torch.Tensor, student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> torch.Tensor:
    """DINO self-distillation loss (Caron et al., 2021, "Emerging Properties in Self-Supervised
    Vision Transformers", Eq. 3; student temperature 0.1, teacher 0.04 after warm-up).

    ``student``: [B, D] logits for every crop (globals first), as a list or one [V, B, D] tensor;
    ``teacher``: [B, D] logits for the global crops (list or [G, B, D]); ``center`` [D].
    H(P_t, P_s) = -sum softmax((t - center) / tau_t) * log_softmax(s / tau_s), averaged over the batch
    and over every (teacher i, student v) pair with v != i. The teacher side carries no gradient.
    """
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError("DINO temperatures must be > 0")
    student, teacher = _stack_crops(student, "student"), _stack_crops(teacher, "teacher")
    globals_, views = teacher.shape[0], student.shape[0]
    same = min(globals_, views)  # pairs (i, i): teacher crop i is also student crop i
    pairs = globals_ * views - same
    if pairs == 0:
        raise ValueError("dino_loss needs at least one (teacher, other student crop) pair")
    targets = F.softmax((_float32(teacher.detach()) - _float32(center)) / teacher_temperature, dim=-1)
    log_probs = F.log_softmax(_float32(student) / student_temperature, dim=-1)
    # every (i, v) pair at once: (sum_i q_i) . (sum_v log p_v), minus the pairs with v == i;
    # a fixed number of kernels however many crops (not one cross-entropy per pair)
    all_pairs = (targets.sum(dim=0) * log_probs.sum(dim=0)).sum(dim=-1)
    same_crop = (targets[:same] * log_probs[:same]).sum(dim=(0, 2))
    return -(all_pairs - same_crop).mean() / pairs


# --------------------------------------------------------------------------- SupCon / SimCLR
def supcon_loss(features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.1,
                base_temperature: float = 0.07, form: str = "out") -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, "Supervised Contrastive Learning"; defaults:
    temperature T 0.1, base temperature T_b 0.07 and the L_out form, Eq. 2, as HobbitLong/SupContrast).

    ``features`` [B, V, D], L2-normalised. Every view is an anchor i; its positives P(i) are the other
    views with the same label; with p_ia = exp(z_i . z_a / T) / sum_{a' != i} exp(z_i . z_a' / T), the
    denominator running over every other view in the *global* batch (features gathered across ranks),
    the loss per anchor is

    - ``form="out"`` (Eq. 2, L_out): -(T / T_b) * mean_{p in P(i)} log p_ip;
    - ``form="in"`` (Eq. 3, L_in): -(T / T_b) * log mean_{p in P(i)} p_ip. solo-learn's SupCon
      (solo/losses/simclr.py ``simclr_loss_func`` with class labels as indexes) is -log sum_{p in P(i)}
      p_ip: L_in with T_b = T minus log|P(i)|, so the same gradients and a value lower by the mean log|P(i)|;

    averaged over the anchors that have a positive (an anchor without one contributes nothing instead
    of NaN). The factor T / T_b is 1 only when ``base_temperature == temperature``.

    ``labels=None`` makes every sample its own class: with 2 views each anchor has exactly one
    positive, both forms agree, and with ``base_temperature == temperature`` this is SimCLR's NT-Xent
    (Chen et al., 2020) exactly, as solo-learn's ``simclr_loss_func``. With SupContrast's own SimCLR
    setting (T_b left at 0.07) it is NT-Xent times T / 0.07.
    """
    if features.ndim != 3:
        raise ValueError(f"supcon_loss expects features [B, V, D], got shape {tuple(features.shape)}")
    if temperature <= 0 or base_temperature <= 0:
        raise ValueError("SupCon temperatures must be > 0")
    if form not in ("out", "in"):
        raise ValueError(f"supcon_loss form must be 'out' or 'in', got {form!r}")
    batch, views, _ = features.shape
    local = _float32(features).reshape(batch * views, -1)  # sample-major: row = sample * V + view
    if labels is None:
        labels = torch.arange(batch, device=features.device) + rank() * batch
    elif labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(labels.shape)}")
    everyone = all_gather_cat(local)
    all_labels = all_gather_cat(labels.reshape(-1)).repeat_interleave(views)
    local_labels = labels.reshape(-1).repeat_interleave(views)
    logits = local @ everyone.t() / temperature  # [B*V, Bg*V]
    self_index = torch.arange(batch * views, device=features.device) + rank() * batch * views
    not_self = torch.ones_like(logits, dtype=torch.bool)
    not_self[torch.arange(batch * views, device=features.device), self_index] = False
    logits = logits - logits.detach().max(dim=1, keepdim=True).values  # numerical stability only
    log_denominator = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    positives = (local_labels.unsqueeze(1) == all_labels.unsqueeze(0)) & not_self
    count = positives.sum(dim=1)
    has_positive = count > 0
    if form == "out":
        log_term = (log_prob * positives).sum(dim=1) / count.clamp(min=1)
    else:
        # log of the mean probability over the positives; a row without a positive is replaced by zeros
        # before the logsumexp (an all -inf row would send NaN through the backward pass), masked below
        positive_logs = log_prob.masked_fill(~positives, float("-inf"))
        positive_logs = torch.where(has_positive.unsqueeze(1), positive_logs, torch.zeros_like(positive_logs))
        log_term = torch.logsumexp(positive_logs, dim=1) - torch.log(count.clamp(min=1).to(log_prob.dtype))
    per_anchor = -(temperature / base_temperature) * log_term
    # masked mean instead of boolean indexing: no host sync, and 0 (not NaN) when no anchor has a positive
    return (per_anchor * has_positive).sum() / has_positive.sum().clamp(min=1)


# --------------------------------------------------------------------------- MoCo v3
def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's contrastive loss (Chen, Xie and He, 2021, "An Empirical Study of Training
    Self-Supervised Vision Transformers", Algorithm 1; temperature 0.2 for ResNets, 0.1 for ViTs in
    facebookresearch/moco-v3).

    ``queries`` [B, D] (one view through the student and predictor) against ``keys`` [B, D] (the other
    view through the momentum encoder) of the *global* batch: each query's own key is the positive,
    every other rank's keys are negatives too (gathered without gradient). Both are L2-normalised;
    the cross-entropy is scaled by 2T as in the paper's code.
    """
    queries, keys = F.normalize(_float32(queries), dim=1), F.normalize(_float32(keys), dim=1)
    everyone = all_gather_cat_no_grad(keys)
    logits = queries @ everyone.t() / temperature
    targets = torch.arange(queries.shape[0], device=queries.device) + rank() * queries.shape[0]
    return F.cross_entropy(logits, targets) * (2 * temperature)


# --------------------------------------------------------------------------- SDMP
def sdmp_targets(lam: torch.Tensor, key_lam: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft labels of SDMP (Ren et al., 2022, "A Simple Data Mixing Prior for Improving
    Self-Supervised Learning") for an intra-batch mix: sample i is mixed with its flip partner
    p = B - 1 - i, keeping weight lam[i] of itself. The query is view a mixed with lam; the keys
    are the other view b, clean (source term) and mixed with the same partners (mixed term) keeping
    ``key_lam`` of itself (default: lam, as in SDMP; box mixes may show a slightly different share).

    Returns (source_targets, mixed_targets), both [B, B] with rows summing to 1:
    source: lam[i] on i, 1 - lam[i] on p (mixed image vs the clean images of the other view);
    mixed: weights proportional to the content query i shares with mixed key i,
    s = min(lam[i], k[i]) + min(1 - lam[i], 1 - k[i]), and with mixed key p,
    c = min(lam[i], 1 - k[p]) + min(1 - lam[i], k[p]); with k = lam (SDMP) that is
    1/(1+c) on i and c/(1+c) on p (OliverRensu/SDMP moco/moco/builder.py, ``common``).
    When i == p (odd B, middle sample) all weight is on i.
    """
    if lam.ndim != 1:
        raise ValueError(f"lam must be [B], got shape {tuple(lam.shape)}")
    lam = _float32(lam)
    key = lam if key_lam is None else _float32(key_lam)
    if key.shape != lam.shape:
        raise ValueError(f"key_lam must have lam's shape {tuple(lam.shape)}, got {tuple(key.shape)}")
    batch = lam.shape[0]
    index = torch.arange(batch, device=lam.device)
    partner = index.flip(0)
    source = torch.zeros(batch, batch, device=lam.device, dtype=lam.dtype)
    source.index_put_((index, index), lam, accumulate=True)
    source.index_put_((index, partner), 1.0 - lam, accumulate=True)
    own = torch.minimum(lam, key) + torch.minimum(1.0 - lam, 1.0 - key)
    shared = torch.minimum(lam, 1.0 - key[partner]) + torch.minimum(1.0 - lam, key[partner])
    total = (own + shared).clamp_min(1e-12)  # 0 only if query and keys share nothing: an all-zero row
    mixed = torch.zeros_like(source)
    mixed.index_put_((index, index), own / total, accumulate=True)
    mixed.index_put_((index, partner), shared / total, accumulate=True)
    return source, mixed


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits / temperature)): SDMP's loss terms."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return -(targets * F.log_softmax(_float32(logits) / temperature, dim=-1)).sum(dim=-1).mean()
