"""SDMP: what the key networks are fed, the heads per backbone, the mixing ops on values."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.backbones import build_backbone
from trainers.errors import ConfigError
from trainers.losses import sdmp_targets
from trainers.methods import method_class
from trainers.methods.base import MethodContext
from trainers.methods.mixing import MIX_MODES, cutmix, mix, mixup, resizemix
from trainers.methods.sdmp import sdmp_config

SMALL = {"dino": dict(out_dim=64, hidden_dim=32, bottleneck_dim=16),
         "moco_v3": dict(moco_hidden_dim=32, moco_out_dim=16, moco_predictor_hidden_dim=32)}


def build(base, backbone_name="resnet_mini", groups=((2, 16),), **options):
    ctx = MethodContext(backbone_name, 256, tuple(groups), 8, 1, 3, 4, 10, 0)
    backbone, _ = build_backbone("resnet_mini", 16)
    torch.manual_seed(0)
    return method_class("sdmp", {"base": base})(sdmp_config(base, **{**SMALL[base], **options}), ctx, backbone)


def record_inputs(module: nn.Module, fed: dict, key: str) -> None:
    """Keep a copy of the list of views ``module`` is called with."""
    original = module.forward

    def forward(views):
        fed[key] = [v.detach().clone() for v in views]
        return original(views)

    module.forward = forward


def distinguishable_views(groups=((2, 16),), batch=8):
    """View 0 in [0, 1), view 1 in [10, 11), local crops in [20, 21): any mix shows where it came from."""
    g = torch.Generator().manual_seed(3)
    sizes = [size for count, size in groups for _ in range(count)]
    return [torch.rand(batch, 3, size, size, generator=g) + 10 * min(index, 2) for index, size in enumerate(sizes)]


def mixup_weights(mixed, images):
    """Per-sample w with mixed = w * images + (1 - w) * flip partners (least squares)."""
    partners = images.flip(0)
    d, m = (images - partners).flatten(1), (mixed - partners).flatten(1)
    return (d * m).sum(1) / (d * d).sum(1)


def steps_with_both_roles(sdmp):
    """A step where view 1 is mixed into the query (a = 0) and one where view 0 is (a = 1)."""
    by_a = {}
    for step in range(40):
        by_a.setdefault(sdmp.roles(step)[0], step)
    assert set(by_a) == {0, 1}
    return by_a[0], by_a[1]


# --------------------------------------------------------------------------- the mixed key
@pytest.mark.parametrize("base", ["moco_v3", "dino"])
def test_mixed_key_is_the_other_view_mixed_with_the_same_partners_and_lam(base):
    groups = ((2, 16),) if base == "moco_v3" else ((2, 16), (2, 8))
    sdmp = build(base, groups=groups, mix_modes=["mixup"])
    views = distinguishable_views(groups)
    for step in steps_with_both_roles(sdmp):
        a, b = sdmp.roles(step)
        fed = {}
        record_inputs(sdmp.student, fed, "student")
        record_inputs(sdmp.teacher, fed, "teacher")
        loss, logs = sdmp.training_step(views, None, step)
        assert torch.isfinite(loss) and logs["loss_mixed"] > 0
        if base == "moco_v3":  # student: clean a + mixed b; teacher: clean a, clean b, mixed a
            clean_query, query = fed["student"]
            assert len(fed["teacher"]) == 3
            key_a, key_b, key = fed["teacher"]
            assert torch.equal(clean_query, views[a]) and torch.equal(key_a, views[a]) and torch.equal(key_b, views[b])
        else:  # student: globals, mixed b, locals; teacher: globals, mixed a
            assert len(fed["student"]) == 5 and len(fed["teacher"]) == 3
            query, key = fed["student"][2], fed["teacher"][2]
            assert all(torch.equal(x, y) for x, y in zip(fed["student"][:2] + fed["student"][3:], views))
            assert all(torch.equal(x, y) for x, y in zip(fed["teacher"][:2], views[:2]))
        # not the query's own mixed image: the query is view b mixed, the key view a mixed
        assert not torch.allclose(query, key)
        assert torch.all((query >= 10 * b) & (query < 10 * b + 1))
        assert torch.all((key >= 10 * a) & (key < 10 * a + 1))
        # the same flip partners and the same lam (Beta(1, 1), one per sample) for both
        lam = mixup_weights(query, views[b])
        assert torch.allclose(query, views[b] * lam.view(-1, 1, 1, 1) + views[b].flip(0) * (1 - lam.view(-1, 1, 1, 1)),
                              atol=1e-5)
        assert torch.allclose(key, views[a] * lam.view(-1, 1, 1, 1) + views[a].flip(0) * (1 - lam.view(-1, 1, 1, 1)),
                              atol=1e-5)
        assert lam.std() > 0.05 and torch.all((lam > 0) & (lam < 1))


@pytest.mark.parametrize("mode", ["cutmix", "resizemix"])
def test_box_mixes_build_both_views_from_their_own_images_and_partners(mode):
    sdmp = build("moco_v3")
    views = distinguishable_views()
    torch.manual_seed(5)
    query, key, source, mixed = sdmp.mixed_views(views[1], views[0], mode)
    for mixed_view, images, offset in ((query, views[1], 10), (key, views[0], 0)):
        own = (mixed_view == images).all(dim=1)
        assert torch.all((~own).float().mean(dim=(1, 2)) > 0)  # every sample got a box
        assert torch.all((mixed_view >= offset - 1e-5) & (mixed_view < offset + 1))  # nothing of the other view
        if mode == "cutmix":  # each pixel: the image's own or its flip partner's at the same place
            assert torch.all(own | (mixed_view == images.flip(0)).all(dim=1))
    # source targets: the query's visible share on itself, the rest on the partner
    query_share = 1 - (query != views[1]).any(dim=1).float().mean(dim=(1, 2))
    assert torch.allclose(source.diagonal(), query_share, atol=1e-6)
    assert torch.allclose(source[torch.arange(8), torch.arange(8).flip(0)], 1 - query_share, atol=1e-6)
    key_share = 1 - (key != views[0]).any(dim=1).float().mean(dim=(1, 2))
    assert torch.allclose(mixed, sdmp_targets(query_share, key_share)[1], atol=1e-5)
    if mode == "resizemix":  # boxes of one size for one lam: both views show the same share
        assert torch.allclose(query_share, key_share)


def test_sdmp_targets_with_the_key_share():
    lam, key = torch.tensor([0.7, 0.2, 0.5, 0.9]), torch.tensor([0.6, 0.2, 0.5, 0.8])
    _, mixed = sdmp_targets(lam, key)
    own = min(0.7, 0.6) + min(0.3, 0.4)  # query 0 vs mixed key 0
    shared = min(0.7, 1 - 0.8) + min(0.3, 0.8)  # query 0 vs mixed key 3 (its partner)
    assert mixed[0, 0] == pytest.approx(own / (own + shared)) and mixed[0, 3] == pytest.approx(shared / (own + shared))
    assert torch.allclose(sdmp_targets(lam, lam)[1], sdmp_targets(lam)[1])
    c = min(0.7, 1 - 0.9) + min(0.3, 0.9)  # SDMP's ``common`` with key = lam
    assert sdmp_targets(lam)[1][0, 0] == pytest.approx(1 / (1 + c))


def test_mix_modes_are_an_option_with_the_papers_default_and_roles_swap():
    default = build("moco_v3")
    assert default.options.mix_modes == list(MIX_MODES) == ["mixup", "cutmix", "resizemix"]
    assert {default.mix_mode(step) for step in range(30)} == set(MIX_MODES)
    assert {default.roles(step) for step in range(30)} == {(0, 1), (1, 0)}
    assert [default.draws(step) for step in range(10)] == [default.draws(step) for step in range(10)]
    only = build("moco_v3", mix_modes=["cutmix", "resizemix"])
    assert {only.mix_mode(step) for step in range(30)} == {"cutmix", "resizemix"}
    with pytest.raises(ConfigError, match="mix_modes"):
        build("moco_v3", mix_modes=["blend"])
    with pytest.raises(ConfigError, match="resizemix_lam"):
        build("moco_v3", resizemix_lam=[0.9, 0.1])


def test_loss_is_the_base_plus_half_of_each_mixed_term():
    sdmp = build("moco_v3")
    loss, logs = sdmp.training_step(distinguishable_views(), None, 0)
    assert sdmp.options.mix_weight == 0.5
    assert torch.allclose(loss.detach(), logs["loss_base"] + 0.5 * (logs["loss_source"] + logs["loss_mixed"]))


# --------------------------------------------------------------------------- heads by backbone
def layers(head: nn.Module):
    return list(head.net)


def test_resnet_gets_moco_v3s_resnet_heads():
    sdmp = build("moco_v3", "resnet_mini")
    projector, predictor = layers(sdmp.student.encoder.projector), layers(sdmp.student.predictor)
    assert [type(m) for m in projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert (projector[0].in_features, projector[0].out_features, projector[3].out_features) == (256, 32, 16)
    assert projector[1].affine and not projector[-1].affine
    assert [type(m) for m in predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no final BN
    assert all(m.bias is None for m in projector + predictor if isinstance(m, nn.Linear))
    teacher = layers(sdmp.teacher.projector)
    assert [type(m) for m in teacher] == [type(m) for m in projector]
    out = sdmp.student([torch.randn(4, 3, 16, 16)])
    assert out.shape == (4, 16)
    assert "ResNet heads" in sdmp.describe()


def test_vit_gets_moco_v3s_vit_heads():
    sdmp = build("moco_v3", "vit_tiny")  # the heads follow the backbone name in the method context
    projector, predictor = layers(sdmp.student.encoder.projector), layers(sdmp.student.predictor)
    assert [type(m) for m in projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert not projector[-1].affine
    assert [type(m) for m in predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert not predictor[-1].affine
    assert all(m.bias is None for m in projector + predictor if isinstance(m, nn.Linear))
    assert "ViT heads" in sdmp.describe()


# --------------------------------------------------------------------------- mixing ops on values
def test_mixup_values():
    images, partners = torch.rand(3, 3, 4, 4), torch.rand(3, 3, 4, 4)
    lam = torch.tensor([0.0, 0.25, 1.0])
    mixed, visible = mixup(images, partners, lam)
    assert torch.equal(mixed[0], partners[0]) and torch.equal(mixed[2], images[2])
    assert torch.allclose(mixed[1], 0.25 * images[1] + 0.75 * partners[1])
    assert torch.equal(visible, lam)


def test_cutmix_pastes_the_partner_at_the_same_place_with_the_box_area_as_share():
    g = torch.Generator().manual_seed(1)
    images, partners = torch.rand(64, 3, 16, 16, generator=g), torch.rand(64, 3, 16, 16, generator=g) + 2
    lam = torch.full((64,), 0.75)  # a nominal 8 x 8 box, clipped at the borders
    mixed, visible = cutmix(images, partners, lam, generator=g)
    pasted = (mixed == partners).all(dim=1)
    assert torch.all(pasted | (mixed == images).all(dim=1))
    for k in range(64):
        rows, cols = pasted[k].nonzero(as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h * w == len(rows) and h <= 8 and w <= 8  # one rectangle
        assert visible[k] == pytest.approx(1 - h * w / 256)
    assert torch.any(visible == 0.75) and torch.all(visible >= 0.75)  # clipping only shrinks the box


def test_resizemix_pastes_the_whole_partner_shrunk_with_sdmps_lam_mapping():
    g = torch.Generator().manual_seed(2)
    images, partners = torch.rand(4, 3, 16, 32, generator=g), torch.rand(4, 3, 16, 32, generator=g) + 2
    lam = torch.tensor([0.0, 0.5, 0.9375, 1.0])
    mixed, visible = resizemix(images, partners, lam, generator=g)
    # 0.1 + 0.8 lam = 0.1, 0.5, 0.85, 0.9 -> sqrt(1 - .) = 0.949, 0.707, 0.387, 0.316 -> floor(16 r) x floor(32 r)
    expected = [(15, 30), (11, 22), (6, 12), (5, 10)]
    for k, (h, w) in enumerate(expected):
        box = (mixed[k] >= 2 - 1e-6).all(dim=0)  # the partner's values are in [2, 3)
        rows, cols = box.nonzero(as_tuple=True)
        assert (int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1), len(rows)) == (h, w, h * w)
        assert visible[k] == pytest.approx(1 - h * w / (16 * 32))
        patch = mixed[k][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        shrunk = F.interpolate(partners[k:k + 1], size=(h, w), mode="bilinear", align_corners=False)[0]
        assert torch.allclose(patch, shrunk, atol=1e-5)  # the whole partner, resized bilinearly
        assert torch.equal(mixed[k][:, ~box], images[k][:, ~box])
    fixed, share = resizemix(images, partners, lam, lam_range=(0.5, 0.5), generator=g)
    assert torch.allclose(share, torch.full((4,), 1 - 11 * 22 / 512))


def test_mix_dispatch_and_unknown_mode():
    images, partners, lam = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.tensor([0.3, 0.6])
    assert torch.equal(mix(images, partners, lam, "mixup")[0], mixup(images, partners, lam)[0])
    with pytest.raises(ConfigError, match="unknown mix mode"):
        mix(images, partners, lam, "blend")
    with pytest.raises(ValueError, match="do not match"):
        mix(images, partners[:1], lam, "mixup")


def test_each_base_has_its_own_options():
    """SDMP on MoCo v3 knows no DINO option (nor logs one), SDMP on DINO is DINO's options plus the mixing."""
    from trainers.config import Config
    from trainers.methods.sdmp import SDMPDINO, SDMPMoCo

    moco = Config(method={"name": "sdmp", "moco_out_dim": 16})
    assert method_class("sdmp", moco.method) is SDMPMoCo
    keys = {key for key in moco.flat() if key.startswith("method.")}
    assert "method.moco_out_dim" in keys and "method.mix_weight" in keys
    assert not {"method.out_dim", "method.teacher_temperature", "method.center_momentum"} & keys
    dino = Config(method={"name": "sdmp", "base": "dino", "out_dim": 64})
    assert method_class("sdmp", dino.method) is SDMPDINO
    keys = {key for key in dino.flat() if key.startswith("method.")}
    assert {"method.out_dim", "method.teacher_temperature", "method.mix_weight"} <= keys
    assert not any(key.startswith("method.moco_") for key in keys)
    with pytest.raises(ConfigError, match="out_dim"):
        Config(method={"name": "sdmp", "base": "moco_v3", "out_dim": 64}).method_options()
    with pytest.raises(ConfigError, match="method.base 'byol' must be one of moco_v3, dino"):
        Config(method={"name": "sdmp", "base": "byol"}).method_options()
    with pytest.raises(ConfigError, match=r"method.base '\['dino'\]' must be one of moco_v3, dino"):
        Config(method={"name": "sdmp", "base": ["dino"]}).method_options()


def test_a_dino_checkpoint_from_before_the_criterion_still_loads():
    """The DINO center moved from the method ('center') into its criterion ('criterion.center')."""
    sdmp = build("dino")
    state = sdmp.state_dict()
    assert "criterion.center" in state and "center" not in state
    old = {("center" if key == "criterion.center" else key): value for key, value in state.items()}
    old["center"] = torch.full_like(old["center"], 0.25)
    fresh = build("dino")
    fresh.load_state_dict(old)
    assert torch.equal(fresh.center, torch.full_like(fresh.center, 0.25))
