"""Each loss against a straightforward re-computation (loops, float64) and its defining properties."""

import math

import pytest
import torch

from trainers.losses import dino_loss, sdmp_targets, sinkhorn, soft_cross_entropy, supcon_loss, swav_loss
from trainers.methods.dino import update_center


def rng(seed):
    return torch.Generator().manual_seed(seed)


def normalized(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=rng(seed), dtype=torch.float64), dim=-1)


def reference_sinkhorn(scores, epsilon, iterations):
    q = torch.exp(scores.double() / epsilon)
    batch, prototypes = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for k in range(prototypes):
            q[:, k] = q[:, k] / q[:, k].sum() / prototypes
        for b in range(batch):
            q[b, :] = q[b, :] / q[b, :].sum() / batch
    return q * batch


def test_sinkhorn_matches_reference_and_marginals():
    scores = normalized(64, 10, seed=1) @ normalized(30, 10, seed=2).t()  # cosine scores [64, 30]
    codes = sinkhorn(scores, 0.05, 3)
    assert torch.allclose(codes, reference_sinkhorn(scores, 0.05, 3), atol=1e-5, rtol=1e-5)
    assert torch.allclose(codes.sum(1), torch.ones(64, dtype=codes.dtype), atol=1e-6)
    converged = sinkhorn(scores, 0.05, 200)
    assert torch.allclose(converged.sum(0), torch.full((30,), 64 / 30, dtype=codes.dtype), rtol=1e-3)


def test_sinkhorn_survives_low_precision_inputs():
    scores = (normalized(32, 8, seed=3) @ normalized(16, 8, seed=4).t()).to(torch.bfloat16)
    codes = sinkhorn(scores, 0.05, 3)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    half = sinkhorn(scores.to(torch.float16) * 40, 0.05, 3)  # exp(40 / 0.05) would overflow anything
    assert torch.isfinite(half).all()
    with pytest.raises(ValueError):
        sinkhorn(scores, epsilon=0.0)


def reference_swav(scores, temperature, epsilon, iterations, assign, queue=None):
    crops = len(scores)
    total = 0.0
    for slot, a in enumerate(assign):
        source = scores[a] if queue is None else torch.cat([queue[slot], scores[a]])
        q = reference_sinkhorn(source, epsilon, iterations)[-scores[a].shape[0]:]
        sub = 0.0
        for v in range(crops):
            if v == a:
                continue
            p = torch.softmax(scores[v].double() / temperature, dim=1)
            sub += -(q * torch.log(p)).sum(1).mean()
        total += sub / (crops - 1)
    return total / len(assign)


def test_swav_loss_matches_reference():
    prototypes = normalized(50, 16, seed=9)
    scores = [normalized(24, 16, seed=10 + c) @ prototypes.t() for c in range(5)]
    ours = swav_loss(scores, 0.1, 0.05, 3, (0, 1))
    assert abs(float(ours) - float(reference_swav(scores, 0.1, 0.05, 3, (0, 1)))) < 1e-5
    queue = [normalized(48, 16, seed=30 + s) @ prototypes.t() for s in range(2)]
    with_queue = swav_loss(scores, 0.1, 0.05, 3, (0, 1), queue=queue)
    assert abs(float(with_queue) - float(reference_swav(scores, 0.1, 0.05, 3, (0, 1), queue))) < 1e-5
    assert abs(float(with_queue) - float(ours)) > 1e-4  # the queue changes the codes


def test_swav_loss_is_log_k_for_uniform_scores():
    scores = [torch.zeros(8, 300, requires_grad=True) for _ in range(4)]
    loss = swav_loss(scores)
    assert abs(float(loss.detach()) - math.log(300)) < 1e-5
    loss.backward()
    assert scores[0].grad is not None and scores[2].grad is not None


def test_dino_loss_matches_reference_and_invariances():
    student = [torch.randn(16, 32, generator=rng(i), dtype=torch.float64) for i in range(6)]
    teacher = [torch.randn(16, 32, generator=rng(100 + i), dtype=torch.float64) for i in range(2)]
    center = torch.randn(32, generator=rng(7), dtype=torch.float64) * 0.1
    ours = dino_loss(student, teacher, center, 0.1, 0.04)
    total, pairs = 0.0, 0
    for i in range(2):
        t = torch.softmax((teacher[i] - center) / 0.04, dim=1)
        for v in range(6):
            if v != i:
                total += -(t * torch.log_softmax(student[v] / 0.1, dim=1)).sum(1).mean()
                pairs += 1
    assert pairs == 10 and abs(float(ours) - float(total / pairs)) < 1e-6
    # a constant per teacher row changes nothing; a shift of every output is removed by the centering
    shifted = [t + 5.0 for t in teacher]
    assert abs(float(dino_loss(student, shifted, center)) - float(ours)) < 1e-6
    offset = torch.randn(32, generator=rng(8), dtype=torch.float64)
    centered = dino_loss(student, [t + offset for t in teacher], center + offset)
    assert abs(float(centered) - float(ours)) < 1e-6


def test_dino_center_is_the_ema_of_the_teacher_mean():
    teacher = [torch.randn(10, 4, generator=rng(i)) for i in range(2)]
    center = torch.ones(4)
    update_center(center, teacher, momentum=0.9)
    expected = 0.9 * torch.ones(4) + 0.1 * torch.cat(teacher).mean(0)
    assert torch.allclose(center, expected, atol=1e-6)
    stacked_center = torch.ones(4)
    update_center(stacked_center, torch.stack(teacher), momentum=0.9)  # [G, B, D], as the DINO method passes it
    assert torch.allclose(stacked_center, expected, atol=1e-6)


def reference_supcon(features, labels, temperature, base_temperature):
    batch, views, _ = features.shape
    rows = [(b, v) for b in range(batch) for v in range(views)]
    losses = []
    for i, (bi, vi) in enumerate(rows):
        anchor = features[bi, vi]
        denominator = sum(math.exp(float(anchor @ features[bj, vj]) / temperature)
                          for j, (bj, vj) in enumerate(rows) if j != i)
        positives = [float(anchor @ features[bj, vj]) / temperature - math.log(denominator)
                     for j, (bj, vj) in enumerate(rows) if j != i and labels[bj] == labels[bi]]
        if positives:
            losses.append(-(temperature / base_temperature) * sum(positives) / len(positives))
    return sum(losses) / len(losses)


def test_supcon_loss_matches_reference():
    features = normalized(12, 3, 8, seed=11)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3, 4, 5, 0])
    ours = supcon_loss(features, labels, 0.1, 0.07)
    assert abs(float(ours) - reference_supcon(features, labels.tolist(), 0.1, 0.07)) < 1e-6
    simclr = supcon_loss(features, None, 0.5, 0.5)
    assert abs(float(simclr) - reference_supcon(features, list(range(12)), 0.5, 0.5)) < 1e-6


def solo_learn_supcon(features, labels, temperature):
    """solo-learn's simclr_loss_func (solo/losses/simclr.py, vturrisi/solo-learn @ 9187ea39) written out:
    per anchor -log(sum_pos exp(s / T) / (sum_pos + sum_neg)), self excluded, mean over all anchors."""
    batch, views, _ = features.shape
    z = features.transpose(0, 1).reshape(batch * views, -1)  # view-major, as solo concatenates the crops
    index = torch.tensor(labels).repeat(views)
    sim = torch.exp(z @ z.t() / temperature)
    pos = (index.unsqueeze(1) == index.unsqueeze(0)).float().fill_diagonal_(0)
    neg = (index.unsqueeze(1) != index.unsqueeze(0)).float()
    return -torch.log((sim * pos).sum(1) / ((sim * pos).sum(1) + (sim * neg).sum(1))).mean()


def test_supcon_in_form_is_solo_learns_loss_up_to_log_positive_count():
    features = normalized(12, 2, 8, seed=21).requires_grad_()
    labels = [0, 1, 2, 0, 1, 2, 0, 3, 3, 4, 5, 0]
    ours = supcon_loss(features, torch.tensor(labels), 0.2, 0.2, form="in")
    solo = solo_learn_supcon(features, labels, 0.2)
    # L_in = -log mean_p p_ip, solo's = -log sum_p p_ip: the difference is the mean of log|P(i)|
    counts = {c: labels.count(c) * 2 - 1 for c in labels}  # positives per anchor: same-class views minus itself
    offset = sum(math.log(counts[c]) for c in labels) / len(labels)
    assert float(ours) == pytest.approx(float(solo) + offset, abs=1e-5)
    assert float(ours) != pytest.approx(float(supcon_loss(features, torch.tensor(labels), 0.2, 0.2)), abs=1e-3)
    grad_ours, = torch.autograd.grad(ours, features)
    grad_solo, = torch.autograd.grad(solo, features)
    assert torch.allclose(grad_ours, grad_solo, atol=1e-6)  # the same training signal
    # one positive per anchor (SimCLR): both forms are NT-Xent and equal solo-learn's loss exactly
    simclr_in = supcon_loss(features, None, 0.2, 0.2, form="in")
    assert float(simclr_in) == pytest.approx(float(supcon_loss(features, None, 0.2, 0.2)), abs=1e-6)
    assert float(simclr_in) == pytest.approx(float(solo_learn_supcon(features, list(range(12)), 0.2)), abs=1e-5)
    # SupContrast's factor: base temperature 0.07 scales the same loss by T / 0.07
    assert float(supcon_loss(features, None, 0.2, 0.07)) == pytest.approx(float(simclr_in) * 0.2 / 0.07, rel=1e-5)
    single_view = normalized(6, 1, 6, seed=13).requires_grad_()
    lonely = supcon_loss(single_view, None, form="in")  # no anchor has a positive: 0, finite gradients
    lonely.backward()
    assert float(lonely.detach()) == 0.0 and torch.isfinite(single_view.grad).all()


def test_supcon_with_distinct_labels_is_simclr_and_no_positive_is_not_nan():
    features = normalized(10, 2, 6, seed=12)
    assert torch.allclose(supcon_loss(features, torch.arange(10) * 7), supcon_loss(features, None))
    single_view = normalized(6, 1, 6, seed=13).requires_grad_()
    loss = supcon_loss(single_view, None)
    assert float(loss.detach()) == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(single_view.grad).all()
    # one labelled pair among singletons: only those two anchors count
    partial = supcon_loss(single_view.detach(), torch.tensor([0, 0, 1, 2, 3, 4]))
    assert torch.isfinite(partial) and float(partial) > 0


def test_sdmp_targets():
    lam = torch.tensor([0.7, 0.2, 0.5, 0.9, 0.4])
    source, mixed = sdmp_targets(lam)
    assert torch.allclose(source.sum(1), torch.ones(5)) and torch.allclose(mixed.sum(1), torch.ones(5))
    assert torch.isclose(source[0, 0], torch.tensor(0.7)) and torch.isclose(source[0, 4], torch.tensor(0.3))
    c = min(0.7, 1 - 0.4) + min(0.3, 0.4)  # i = 0, partner 4 with lam 0.4
    assert torch.isclose(mixed[0, 0], torch.tensor(1 / (1 + c))) and torch.isclose(mixed[0, 4], torch.tensor(c / (1 + c)))
    assert source[2, 2] == 1.0 and mixed[2, 2] == 1.0  # the middle sample is its own partner
    assert (source[1, [0, 2, 4]] == 0).all()
    logits = torch.randn(5, 5, generator=rng(0))
    expected = -(source * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.isclose(soft_cross_entropy(logits, source), expected)


def test_multi_crop_losses_take_stacked_crops_and_give_the_pairwise_gradients():
    # the losses sum every (target crop, other crop) pair at once; the gradients must equal the pair loop's
    student = torch.randn(8, 12, 20, generator=rng(40), dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 12, 20, generator=rng(41), dtype=torch.float64)
    center = torch.randn(20, generator=rng(42), dtype=torch.float64) * 0.1
    stacked = dino_loss(student, teacher, center, 0.1, 0.04)
    (grad,) = torch.autograd.grad(stacked, student)
    crops = [s.detach().clone().requires_grad_(True) for s in student]
    total = 0.0
    for i in range(2):
        target = torch.softmax((teacher[i] - center) / 0.04, dim=1)
        for v in range(8):
            if v != i:
                total = total - (target * torch.log_softmax(crops[v] / 0.1, dim=1)).sum(1).mean()
    total = total / 14
    total.backward()
    assert abs(float(stacked) - float(total)) < 1e-10
    assert torch.allclose(grad, torch.stack([c.grad for c in crops]), atol=1e-12)
    assert abs(float(dino_loss(list(student.detach()), list(teacher), center)) - float(stacked)) < 1e-10

    prototypes = normalized(30, 16, seed=50)
    scores = torch.stack([normalized(24, 16, seed=51 + c) @ prototypes.t() for c in range(6)]).requires_grad_(True)
    ours = swav_loss(scores, 0.1, 0.05, 3, (0, 1))
    (swav_grad,) = torch.autograd.grad(ours, scores)
    as_list = [s.detach().clone().requires_grad_(True) for s in scores]
    reference = 0.0
    for a in (0, 1):
        codes = reference_sinkhorn(scores[a].detach(), 0.05, 3)
        for v in range(6):
            if v != a:
                reference = reference - (codes * torch.log_softmax(as_list[v].double() / 0.1, dim=1)).sum(1).mean() / 5
    reference = reference / 2
    reference.backward()
    assert abs(float(ours) - float(reference)) < 1e-5
    assert torch.allclose(swav_grad, torch.stack([s.grad for s in as_list]), atol=1e-6)
    with pytest.raises(ValueError, match="crops, B, D"):
        dino_loss(student[0], teacher, center)


def test_info_nce_is_moco_v3s_loss_written_out():
    """Each query against every key, its own the positive, cross-entropy times 2T (moco-v3 Algorithm 1)."""
    from trainers.losses import info_nce

    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    t = 0.2
    q = [row / row.norm() for row in queries.double()]
    k = [row / row.norm() for row in keys.double()]
    terms = []
    for i in range(6):
        logits = [float(q[i] @ k[j]) / t for j in range(6)]
        terms.append(-(logits[i] - math.log(sum(math.exp(v) for v in logits))))
    assert float(info_nce(queries, keys, t)) == pytest.approx(2 * t * sum(terms) / 6, rel=1e-5)
    # orthonormal pairs: only the positive scores 1/T
    eye = torch.eye(3)
    expected = -2 * t * math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert float(info_nce(3 * eye, eye, t)) == pytest.approx(expected, rel=1e-6)
    # scale-free inputs, float32 under bf16 inputs
    assert float(info_nce(queries.bfloat16(), keys, t)) == pytest.approx(float(info_nce(queries, keys, t)), abs=2e-2)
