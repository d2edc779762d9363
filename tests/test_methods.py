"""Method modules: heads, queue, prototype freezing, EMA teacher, schedules, SDMP mixing."""

import pytest
import torch
import torch.nn.functional as F

from trainers.backbones import build_backbone
from trainers.errors import ConfigError
from trainers.kernel_count import HOST_SYNC, count_kernels
from trainers.losses import dino_loss, sdmp_targets, supcon_loss, swav_loss
from trainers.methods import method_class
from trainers.methods.base import MethodContext, ema_update
from trainers.methods.mixing import cutmix, mix, mixup, resizemix
from trainers.methods.dino import DINOConfig
from trainers.methods.sdmp import SDMPMoCoConfig, sdmp_config
from trainers.methods.supcon import SimCLRConfig, SupConConfig
from trainers.methods.swav import SwAVConfig


def context(groups=((2, 16),), batch=8, epochs=3, steps=4):
    return MethodContext("resnet_mini", 256, tuple(groups), batch, 1, epochs, steps, 10, 0)


def views_for(ctx, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for count, size in ctx.crop_groups for _ in range(count)]


def build(name, options, ctx):
    backbone, _ = build_backbone("resnet_mini", ctx.crop_groups[0][1])
    torch.manual_seed(0)
    return method_class(name, options)(options, ctx, backbone)


# --------------------------------------------------------------------------- SwAV
def test_swav_prototypes_normalised_and_frozen_for_the_first_steps():
    ctx = context(((2, 16), (2, 8)))
    swav = build("swav", SwAVConfig(prototypes=20, freeze_prototypes_steps=2), ctx)
    with torch.no_grad():
        swav.student.prototypes.layer.weight.mul_(3)
    swav.before_step(0)
    assert torch.allclose(swav.student.prototypes.layer.weight.norm(dim=1), torch.ones(20), atol=1e-6)
    for step, frozen in ((0, True), (1, True), (2, False)):
        swav.zero_grad(set_to_none=True)
        loss, _ = swav.training_step(views_for(ctx), None, step)
        loss.backward()
        swav.before_optimizer_step(step)
        assert (swav.student.prototypes.layer.weight.grad is None) == frozen
        assert swav.student.projector.net[0].weight.grad is not None


def test_swav_freeze_prototypes_epochs_counts_whole_epochs():
    ctx = context(((2, 16),), steps=4)
    assert build("swav", SwAVConfig(prototypes=20, freeze_prototypes_epochs=2), ctx).freeze_steps == 8
    assert build("swav", SwAVConfig(prototypes=20), ctx).freeze_steps == 4  # neither set: one epoch
    assert build("swav", SwAVConfig(prototypes=20, freeze_prototypes_epochs=0), ctx).freeze_steps == 0
    assert build("swav", SwAVConfig(prototypes=20, freeze_prototypes_steps=3), ctx).freeze_steps == 3
    with pytest.raises(ConfigError, match="both set"):
        build("swav", SwAVConfig(prototypes=20, freeze_prototypes_steps=3, freeze_prototypes_epochs=2), ctx)
    with pytest.raises(ConfigError, match="freeze_prototypes_epochs must be >= 0"):
        build("swav", SwAVConfig(prototypes=20, freeze_prototypes_epochs=-1), ctx)


def test_swav_step_is_the_swav_loss_of_its_scores():
    ctx = context(((2, 16), (2, 8)))
    swav = build("swav", SwAVConfig(prototypes=20), ctx)
    views = views_for(ctx)
    loss, _ = swav.training_step(views, None, 0)
    embeddings, scores = swav.student(views)
    expected = swav_loss(list(scores.chunk(4)), 0.1, 0.05, 3, (0, 1))
    assert torch.allclose(loss, expected, atol=1e-5)


def test_swav_warns_when_prototypes_do_not_outnumber_the_embedding_dimensions():
    import warnings

    ctx = context(((2, 16),))
    with pytest.warns(UserWarning, match=r"method.prototypes 100 is not more than method.out_dim 128.*e.g. 384"):
        method_class("swav").check(SwAVConfig(prototypes=100), ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method_class("swav").check(SwAVConfig(prototypes=300), ctx)
        method_class("swav").check(SwAVConfig(prototypes=20, out_dim=16), ctx)


def test_swav_queue_of_whole_batches_filled_and_used_only_when_full():
    ctx = context(((2, 16),), batch=8, epochs=3, steps=4)
    with pytest.raises(ConfigError, match="not a multiple of the global batch 8.*use 16 or 24"):
        build("swav", SwAVConfig(prototypes=20, queue_length=20, queue_start_epoch=1), ctx)
    swav = build("swav", SwAVConfig(prototypes=20, queue_length=16, queue_start_epoch=1), ctx)
    assert swav.queue_length == 16 and swav.queue.shape == (2, 16, 128)  # 2 x batch 8
    for step in range(4):  # epoch 0: queue not started
        swav.training_step(views_for(ctx, seed=step), None, step)
    assert swav.queue.abs().sum() == 0
    swav.training_step(views_for(ctx, seed=4), None, 4)  # first queued batch (queue not full: unused)
    embeddings, _ = swav.student(views_for(ctx, seed=4))
    assert torch.allclose(swav.queue[0, :8], embeddings[:8], atol=1e-5)
    assert swav.queue[:, 8:].abs().sum() == 0
    swav.training_step(views_for(ctx, seed=5), None, 5)  # now full, will be used from step 6 on
    stored = swav.queue.clone()
    views = views_for(ctx, seed=6)
    loss, _ = swav.training_step(views, None, 6)
    _, scores = swav.student(views)
    weight = swav.student.prototypes.layer.weight
    with_queue = swav_loss(list(scores.chunk(2)), queue=[stored[0] @ weight.t(), stored[1] @ weight.t()])
    without = swav_loss(list(scores.chunk(2)))
    assert torch.allclose(loss, with_queue, atol=1e-5)
    assert not torch.allclose(loss, without, atol=1e-4)


# --------------------------------------------------------------------------- DINO
@pytest.mark.parametrize("name", ["swav", "dino", "simclr", "supcon", "sdmp"])
def test_forward_views_each_gives_every_view_its_own_batchnorm_batch(name):
    """model.forward_views: 'by_size' puts both 16-px views through one backbone call (BatchNorm over 2B)
    and the head once over all views, 'each' makes one backbone and one head call per view (as solo-learn
    and lightly do); every method's student honours it, in its head's BatchNorm too."""
    from dataclasses import replace

    from trainers.methods.base import encode_views

    options = {"swav": SwAVConfig(prototypes=30, out_dim=16), "dino": DINOConfig(out_dim=64, head_batch_norm=True),
               "simclr": SimCLRConfig(),
               "supcon": SupConConfig(), "sdmp": SDMPMoCoConfig()}[name]
    ctx = context()
    views = views_for(ctx)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet_mini", 16)
    backbone.train()
    together = encode_views(backbone, views, "by_size")
    each = encode_views(backbone, views, "each")
    assert torch.allclose(together, backbone(torch.cat(views)), atol=1e-6)
    assert torch.allclose(each, torch.cat([backbone(v) for v in views]), atol=1e-6)
    assert not torch.allclose(together, each, atol=1e-3), "the BatchNorm batches differ"
    seen = {}
    for mode in ("by_size", "each"):
        method = build(name, options, replace(ctx, forward_views=mode))
        calls = []
        net = next(m for m in method.student.modules() if hasattr(m, "forward_views"))  # the student or its encoder
        assert net.forward_views == mode
        student_backbone = net.backbone
        handle = student_backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        in_backbone = {id(m) for m in student_backbone.modules()}
        head_norms = [m for m in method.student.modules()
                      if isinstance(m, torch.nn.BatchNorm1d) and id(m) not in in_backbone]
        head_calls = []
        handles = [norm.register_forward_hook(lambda module, args, out: head_calls.append(args[0].shape[0]))
                   for norm in head_norms[:1]]
        method.train()
        method.training_step(views_for(ctx), torch.arange(8) % 2, 0)
        for h in [handle, *handles]:
            h.remove()
        seen[mode] = calls, head_calls
    assert seen["by_size"][0][0] == 16 and seen["each"][0][:2] == [8, 8], seen
    if name in ("swav", "dino", "sdmp"):  # heads with BatchNorm: the head's batch follows the backbone's
        assert seen["by_size"][1][0] == 16 and seen["each"][1][:2] == [8, 8], seen
    else:  # SimCLR/SupCon heads have no BatchNorm (SupContrast's MLP head)
        assert seen["each"][1] == [], seen


def test_ema_update_is_the_moving_average():
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for got, want in zip(teacher.parameters(), expected):
        assert torch.allclose(got, want)


def test_dino_teacher_schedules_freeze_and_center():
    ctx = context(((2, 16), (2, 8)), epochs=4, steps=5)
    options = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, warmup_teacher_temperature=0.04,
                         teacher_temperature=0.07, warmup_teacher_temperature_epochs=2)
    dino = build("dino", options, ctx)
    # facebookresearch/dino's schedule: linspace with its end point, so warm-up epoch 2 already uses 0.07
    assert [round(dino.teacher_temperature(e * 5), 3) for e in range(4)] == [0.04, 0.07, 0.07, 0.07]
    assert dino.teacher_momenta[0] == pytest.approx(0.996) and dino.teacher_momenta[-1] == pytest.approx(1.0)
    assert all(not p.requires_grad for p in dino.teacher.parameters())
    views = views_for(ctx)
    teacher_out = list(dino.teacher(views[:2]).chunk(2))
    student_out = list(dino.student(views).chunk(4))
    expected = dino_loss(student_out, teacher_out, torch.zeros(64), 0.1, 0.04)
    loss, _ = dino.training_step(views, None, 0)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert dino.center.abs().sum() > 0  # updated after the loss
    loss.backward()
    dino.before_optimizer_step(0)  # epoch 0: last layer frozen
    assert all(p.grad is None for p in dino.student.head.last_layer_parameters() if p.requires_grad)
    assert dino.student.head.mlp[0].weight.grad is not None
    before = [p.clone() for p in dino.teacher.parameters()]
    with torch.no_grad():
        for p in dino.student.parameters():
            p.add_(1.0)
    dino.after_optimizer_step(0)
    moved = [(a - b).abs().max() for a, b in zip(dino.teacher.parameters(), before)]
    assert max(moved) == pytest.approx(1 - 0.996, rel=1e-3)  # one EMA step of a unit shift
    assert dino.eval_backbone() is dino.teacher.backbone


# --------------------------------------------------------------------------- SupCon / SimCLR
@pytest.mark.parametrize("name, options", [("supcon", SupConConfig()), ("simclr", SimCLRConfig())])
def test_contrastive_step(name, options):
    ctx = context(((2, 16),))
    method = build(name, options, ctx)
    views = views_for(ctx)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])
    loss, _ = method.training_step(views, labels, 0)
    features = F.normalize(method.student.head(method.student.backbone(torch.cat(views))), dim=1)
    features = features.view(2, 8, -1).transpose(0, 1)
    base = options.temperature if options.base_temperature is None else options.base_temperature
    assert base == (0.07 if name == "supcon" else 0.5)  # SimCLR: null means = temperature, factor 1 (NT-Xent)
    expected = supcon_loss(features, labels if name == "supcon" else None, options.temperature, base)
    assert torch.allclose(loss, expected, atol=1e-5)


# --------------------------------------------------------------------------- SDMP mixing
def test_mixup_cutmix_resizemix_really_mix_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 16, generator=g)
    partners = images.flip(0)
    lam = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 1.0])
    mixed, visible = mixup(images, partners, lam)
    assert torch.allclose(mixed[2], 0.5 * images[2] + 0.5 * partners[2])
    assert torch.equal(visible, lam)

    mixed, visible = cutmix(images, partners, lam, generator=g)
    from_partner = (mixed == partners).all(dim=1) & (mixed != images).any(dim=1)
    assert torch.allclose(1 - from_partner.float().mean(dim=(1, 2)), visible, atol=1e-6)
    assert visible[-1] == 1 and visible[0] < 1  # lam 1: untouched; lam 0: a clipped full-size box
    assert torch.all(visible >= lam - 0.1)  # clipping at the border only shrinks the pasted box
    assert ((mixed != images).any(dim=1).float().mean() > 0.2)

    mixed, visible = resizemix(images, partners, lam, generator=g)
    changed = (mixed != images).any(dim=1)
    assert torch.allclose(1 - changed.float().mean(dim=(1, 2)), visible, atol=1e-6)
    side = changed.float().sum(dim=(1, 2)).sqrt()
    # SDMP's code: lam -> 0.1 + 0.8 lam, side floor(16 sqrt(1 - that)): 15, 13, 11, 9, 6, 5 px
    assert torch.equal(side, torch.tensor([15.0, 13, 11, 9, 6, 5]))
    # the pasted square is the whole partner shrunk: its mean matches the partner's mean
    k = 2
    rows, cols = changed[k].nonzero(as_tuple=True)
    patch = mixed[k][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    shrunk = F.interpolate(partners[k:k + 1], size=patch.shape[-2:], mode="bilinear", align_corners=False)[0]
    assert (patch.mean() - partners[k].mean()).abs() < 0.05
    assert (patch - shrunk).abs().mean() < 0.15


@pytest.mark.parametrize("base", ["moco_v3", "dino"])
def test_sdmp_step_mixes_with_flip_partners_and_adds_both_terms(base):
    ctx = context(((2, 16),))
    small = {"dino": dict(out_dim=64, hidden_dim=32, bottleneck_dim=16),
             "moco_v3": dict(moco_hidden_dim=32, moco_out_dim=16, moco_predictor_hidden_dim=32)}[base]
    options = sdmp_config(base, **small)
    sdmp = build("sdmp", options, ctx)
    views = views_for(ctx)
    modes = {sdmp.mix_mode(step) for step in range(30)}
    assert modes == {"mixup", "cutmix", "resizemix"} and sdmp.mix_mode(7) == sdmp.mix_mode(7)
    torch.manual_seed(1)
    mixed, mixed_key, source, mixed_targets = sdmp.mixed_views(views[0], views[1], sdmp.mix_mode(3))
    assert not torch.allclose(mixed, views[0])  # the bug in the released code: mixed == original
    assert not torch.allclose(mixed_key, views[1])
    assert torch.allclose(source.sum(1), torch.ones(8)) and torch.allclose(mixed_targets.sum(1), torch.ones(8))
    assert torch.all(source[torch.arange(8), torch.arange(8).flip(0)] > 0) or sdmp.mix_mode(3) != "mixup"
    loss, logs = sdmp.training_step(views, None, 3)
    assert torch.isfinite(loss)
    total = logs["loss_base"] + 0.5 * (logs["loss_source"] + logs["loss_mixed"])  # mix_weight 0.5
    assert torch.allclose(loss.detach(), total, atol=1e-5)
    assert logs["loss_source"] > 0 and logs["loss_mixed"] > 0
    loss.backward()
    assert all(p.grad is not None for p in sdmp.student.backbone.parameters())
    teacher_before = [p.clone() for p in sdmp.teacher.parameters()]
    with torch.no_grad():
        for p in sdmp.student.parameters():
            p.add_(1.0)
    sdmp.after_optimizer_step(0)
    moved = max((a - b).abs().max() for a, b in zip(sdmp.teacher.parameters(), teacher_before))
    momentum = 0.99 if base == "moco_v3" else 0.996
    assert moved == pytest.approx(1 - momentum, rel=1e-3)  # the teacher follows by one EMA step


def test_sdmp_targets_use_the_visible_share():
    lam = torch.tensor([0.3, 0.6, 1.0, 0.1])
    source, mixed = sdmp_targets(lam)
    assert source[0, 0] == pytest.approx(0.3) and source[0, 3] == pytest.approx(0.7)
    mixed_images, visible = mix(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), lam, "cutmix")
    assert visible.shape == (4,) and torch.all((visible >= 0) & (visible <= 1))


def count_host_syncs(fn) -> int:
    """Device-to-host reads (.item(), bool(), float() of a tensor) while ``fn`` runs."""
    return count_kernels(fn)[1][HOST_SYNC]


@pytest.mark.parametrize("name, options, groups", [
    ("swav", SwAVConfig(prototypes=300, queue_length=16, queue_start_epoch=0), ((2, 16), (2, 8))),
    ("dino", DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16), ((2, 16), (2, 8))),
    ("sdmp", SDMPMoCoConfig(moco_hidden_dim=32, moco_out_dim=16, moco_predictor_hidden_dim=32), ((2, 16),)),
    ("supcon", SupConConfig(), ((2, 16),)),
])
def test_a_training_step_never_waits_for_the_device(name, options, groups):
    # a host sync stalls the CPU until the GPU has caught up: none per step, in forward, backward or
    # the teacher / queue / center updates (the loop reads losses once per logging window)
    ctx = context(groups)
    method = build(name, options, ctx)
    views, labels = views_for(ctx), torch.arange(8) % 3

    def step(index):
        method.before_step(index)
        loss, logs = method.training_step(views, labels, index)
        loss.backward()
        method.before_optimizer_step(index)
        method.after_optimizer_step(index)

    steps = range(9) if name == "sdmp" else range(3)  # SDMP (seed 0) mixes with all 3 modes by step 8
    if name == "sdmp":
        assert {method.mix_mode(index) for index in steps} == {"mixup", "cutmix", "resizemix"}
    for index in steps:  # SwAV's queue is full and used from step 2 on
        assert count_host_syncs(lambda: step(index)) == 0, f"{name} step {index}"
