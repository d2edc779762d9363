import math

import pytest
import torch

from trainers.data.augment import (CropGroup, MultiCropAugment, _gaussian_blur, _shift_hue, method_crop_groups,
                                   parse_crop_spec, sample_crop_boxes)
from trainers.errors import ConfigError
from trainers.kernel_count import count_kernels

PLAIN = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
IDENTITY_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def random_canvases(n=16, size=32, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_boxes_stay_inside_and_respect_scale_and_ratio():
    generator = torch.Generator().manual_seed(0)
    height, width = 32, 48
    boxes = sample_crop_boxes(20_000, height, width, (0.05, 0.4), (3 / 4, 4 / 3), generator, "cpu")
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width + 1e-4).all() and (y1 <= height + 1e-4).all()
    w, h = x1 - x0, y1 - y0
    scale = w * h / (height * width)
    assert scale.min() >= 0.05 - 1e-5 and scale.max() <= 0.4 + 1e-5
    ratio = w / h
    assert ratio.min() >= 0.75 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    # log-uniform ratio: about half of the boxes are wider than tall
    assert abs(float((ratio > 1).float().mean()) - 0.5) < 0.02
    # positions cover the image: the mean box centre is near the image centre
    assert abs(float(((x0 + x1) / 2).mean()) - width / 2) < 0.5


def test_boxes_fall_back_to_a_central_crop():
    generator = torch.Generator().manual_seed(0)
    # a scale of 1 with ratios far from the image's cannot fit: central crop, ratio clamped
    boxes = sample_crop_boxes(100, 20, 40, (1.0, 1.0), (0.5, 1.0), generator, "cpu")
    assert torch.allclose(boxes, torch.tensor([10.0, 0.0, 30.0, 20.0]).expand(100, 4))


def test_full_crop_without_augmentation_returns_the_image():
    canvases = random_canvases()
    group = CropGroup(count=1, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), **PLAIN)
    out = MultiCropAugment([group], **IDENTITY_NORM, seed=0)(canvases)[0]
    expected = canvases.permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(out, expected, atol=1e-5)


def test_flip_actually_flips():
    canvases = random_canvases()
    group = CropGroup(count=1, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**PLAIN, "flip_p": 1.0})
    out = MultiCropAugment([group], **IDENTITY_NORM, seed=0)(canvases)[0]
    expected = canvases.permute(0, 3, 1, 2).float().flip(3) / 255
    assert torch.allclose(out, expected, atol=1e-5)
    half = CropGroup(count=1, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**PLAIN, "flip_p": 0.5})
    augment = MultiCropAugment([half], **IDENTITY_NORM, seed=0, record=True)
    augment(random_canvases(n=4000, size=8))
    assert abs(float(augment.record.flips[0].float().mean()) - 0.5) < 0.03


def test_crop_picks_the_box_content():
    # an image that is its own x coordinate: the crop's mean must equal the box centre
    canvas = torch.arange(64, dtype=torch.float32).view(1, 1, 64).expand(8, 64, 64).clone()
    images = torch.stack([canvas] * 3, dim=1).div(255)
    group = CropGroup(count=1, size=16, scale=(0.1, 0.3), **PLAIN)
    augment = MultiCropAugment([group], **IDENTITY_NORM, seed=3, record=True)
    out = augment(images)[0]
    boxes = augment.record.boxes[0]
    centre = (boxes[:, 0] + boxes[:, 2]) / 2 - 0.5  # pixel i covers [i, i+1) with value i
    assert torch.allclose(out.mean(dim=(1, 2, 3)) * 255, centre, atol=0.05)


def test_grayscale_probability():
    group = CropGroup(count=2, size=8, scale=(0.5, 1.0), **{**PLAIN, "grayscale_p": 0.2})
    augment = MultiCropAugment([group], **IDENTITY_NORM, seed=1)
    out = torch.cat(augment(random_canvases(n=2500, size=16)))
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    rate = float(gray.float().mean())
    assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 5000)  # within 4 standard errors


def test_solarize_inverts_at_and_above_the_threshold():
    values = torch.tensor([0, 100, 127, 128, 200, 255], dtype=torch.uint8)
    canvases = values.view(1, 1, 6, 1).expand(4, 6, 6, 3).contiguous()
    group = CropGroup(count=1, size=6, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**PLAIN, "solarize_p": 1.0})
    out = MultiCropAugment([group], **IDENTITY_NORM, seed=0)(canvases)[0]
    row = (out[0, 0, 0] * 255).round().tolist()
    assert row == [0, 100, 127, 255 - 128, 255 - 200, 0]


def test_per_view_probabilities_follow_dino():
    groups = method_crop_groups("dino", "2x16+4x8")
    assert groups[0].per_view("blur_p") == (1.0, 0.1) and groups[0].per_view("solarize_p") == (0.0, 0.2)
    assert groups[1].per_view("blur_p") == (0.5,) * 4 and groups[1].per_view("solarize_p") == (0.0,) * 4
    augment = MultiCropAugment(groups, seed=0, record=True)
    batch = 2000
    augment(random_canvases(n=batch, size=16))
    blurred = (augment.record.blur_sigma[0] > 0).float().view(2, batch).mean(1)
    solarized = augment.record.solarize[0].float().view(2, batch).mean(1)
    assert blurred[0] == 1.0 and abs(float(blurred[1]) - 0.1) < 0.03
    assert solarized[0] == 0.0 and abs(float(solarized[1]) - 0.2) < 0.03
    assert abs(float((augment.record.blur_sigma[1] > 0).float().mean()) - 0.5) < 0.03
    sigma = augment.record.blur_sigma[0][:batch]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0


def test_blur_smooths_and_zero_sigma_is_identity():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = _gaussian_blur(images, torch.tensor([0.0, 1.0, 2.0]), 2.0)
    assert torch.equal(out[0], images[0])
    assert out[1].std() < images[1].std() and out[2].std() < out[1].std()
    assert torch.allclose(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.02)  # blur keeps the mean


def test_hue_shift_matches_torchvision():
    from torchvision.transforms.functional import adjust_hue

    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    shifts = torch.tensor([0.0, 0.1, -0.25, 0.5])
    ours = _shift_hue(images, shifts)
    for i, shift in enumerate(shifts.tolist()):
        assert torch.allclose(ours[i], adjust_hue(images[i], shift), atol=1e-4)


def test_color_jitter_changes_colors_only_with_probability():
    canvases = random_canvases(n=1000, size=8)
    never = CropGroup(count=1, size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), **PLAIN)
    always = CropGroup(count=1, size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**PLAIN, "jitter_p": 1.0})
    base = MultiCropAugment([never], **IDENTITY_NORM, seed=0)(canvases)[0]
    jittered = MultiCropAugment([always], **IDENTITY_NORM, seed=0)(canvases)[0]
    changed = (jittered - base).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.99
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_same_seed_same_views_and_other_seed_differs():
    canvases = random_canvases(n=32)
    groups = method_crop_groups("swav", "2x32+4x16")
    first = MultiCropAugment(groups, seed=7)(canvases)
    second = MultiCropAugment(groups, seed=7)(canvases)
    third = MultiCropAugment(groups, seed=8)(canvases)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], third[0])


def test_output_shapes_stacking_and_normalization():
    canvases = random_canvases(n=5)
    groups = method_crop_groups("dino", "2x24+6x12")
    views = MultiCropAugment(groups, seed=0)(canvases)
    assert [tuple(v.shape) for v in views] == [(5, 3, 24, 24)] * 2 + [(5, 3, 12, 12)] * 6
    stacked = MultiCropAugment(groups, seed=0, stack_groups=True, dtype=torch.bfloat16)(canvases)
    assert [tuple(v.shape) for v in stacked] == [(2, 5, 3, 24, 24), (6, 5, 3, 12, 12)]
    assert stacked[0].dtype == torch.bfloat16
    assert torch.allclose(stacked[0][1].float(), views[1], atol=0.05)
    # normalized with ImageNet statistics: [0, 1] maps into about [-2.2, 2.7]
    assert min(float(v.min()) for v in views) >= -2.2 and max(float(v.max()) for v in views) <= 2.7


def test_nchw_and_nhwc_inputs_agree():
    canvases = random_canvases(n=4)
    groups = method_crop_groups("supcon", "2x16")
    a = MultiCropAugment(groups, seed=0)(canvases)
    b = MultiCropAugment(groups, seed=0)(canvases.permute(0, 3, 1, 2).contiguous())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("spec,message", [
    ("0x32", "0 crops"), ("0x32+4x16", "0 global crops"), ("2x0", "positive"), ("2x-8", "positive"),
    ("2by32", "COUNTxSIZE"), ("", "COUNTxSIZE"),
])
def test_impossible_crop_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_crop_spec(spec)


@pytest.mark.parametrize("kwargs,message", [
    (dict(scale=(0.0, 1.0)), "0 < min <= max <= 1"), (dict(scale=(0.5, 1.2)), "0 < min <= max <= 1"),
    (dict(scale=(0.6, 0.3)), "0 < min <= max <= 1"), (dict(ratio=(0.0, 1.0)), "aspect ratio"),
    (dict(size=0), "positive"), (dict(blur_p=1.5), "probability"), (dict(blur_p=(0.1, 0.2, 0.3)), "3 values"),
])
def test_impossible_crop_groups(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CropGroup(**{"count": 2, "size": 16, **kwargs}).validate()


def test_no_crops_at_all():
    with pytest.raises(ConfigError, match="no crops"):
        MultiCropAugment([CropGroup(count=0, size=16)])
    with pytest.raises(ConfigError, match="global_scale|scale"):
        method_crop_groups("swav", "2x32", global_scale=(0.0, 1.0))


def test_hue_shift_matches_torchvision_on_grays_blacks_and_ties():
    from torchvision.transforms.functional import adjust_hue

    pixels = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 0.2], [0.3, 0.9, 0.9], [0.7, 0.1, 0.7],
                           [1.0, 0.0, 0.0], [0.2, 0.4, 0.6], [1.0, 1.0, 1.0]])
    images = pixels.t().reshape(1, 3, 2, 4).expand(5, 3, 2, 4).contiguous()
    shifts = torch.tensor([0.0, 0.5, -0.5, 0.17, -0.33])
    ours = _shift_hue(images, shifts)
    for i, shift in enumerate(shifts.tolist()):
        assert torch.allclose(ours[i], adjust_hue(images[i], shift), atol=1e-5), shift


@pytest.mark.parametrize("op,reference", [(0, "adjust_brightness"), (1, "adjust_contrast"),
                                          (2, "adjust_saturation"), (3, "adjust_hue")])
def test_each_jitter_operation_matches_torchvision(op, reference):
    import torchvision.transforms.functional as TF

    strengths = [0.0, 0.0, 0.0, 0.0]
    strengths[op] = 0.4
    group = CropGroup(count=2, size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                      **{**PLAIN, "jitter_p": 0.5, "jitter": tuple(strengths)})
    augment = MultiCropAugment([group], **IDENTITY_NORM, seed=0, record=True)
    canvases = random_canvases(n=64, size=8)
    views = torch.cat(augment(canvases))
    factors = augment.record.jitter[0][:, op]
    neutral = 0.0 if op == 3 else 1.0
    assert 0.3 < float((factors != neutral).float().mean()) < 0.7  # jitter_p 0.5, per view
    images = canvases.permute(0, 3, 1, 2).float().div(255).repeat(2, 1, 1, 1)  # view-major, as the views
    # torchvision's tensor grayscale weighs red 0.2989, ours (PIL's) 0.299: up to 4e-5 apart on [0, 1]
    tolerance = 1e-4 if op in (1, 2) else 1e-5
    for image, view, factor in zip(images, views, factors.tolist()):
        assert torch.allclose(view, getattr(TF, reference)(image, factor), atol=tolerance)


@pytest.mark.parametrize("order_kind", ["batch", "image"])
def test_jitter_follows_the_recorded_order_per_image(order_kind):
    """Each view is torchvision's four jitter functions applied in its recorded order with its recorded
    factors; "image" draws many orders within one call (torchvision's ColorJitter), "batch" one per call."""
    import torchvision.transforms.functional as TF

    functions = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    group = CropGroup(count=2, size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                      **{**PLAIN, "jitter_p": 1.0, "jitter": (0.4, 0.4, 0.4, 0.1), "jitter_order": order_kind})
    augment = MultiCropAugment([group], **IDENTITY_NORM, seed=0, record=True)
    canvases = random_canvases(n=48, size=8)
    views = torch.cat(augment(canvases))
    factors, orders = augment.record.jitter[0], augment.record.jitter_order[0]
    distinct = {tuple(order) for order in orders.tolist()}
    assert len(distinct) > 10 if order_kind == "image" else len(distinct) == 1  # 24 orders exist
    assert all(sorted(order) == [0, 1, 2, 3] for order in distinct)
    images = canvases.permute(0, 3, 1, 2).float().div(255).repeat(2, 1, 1, 1)
    in_given_order = in_reverse = 0
    for image, view, factor, order in zip(images, views, factors.tolist(), orders.tolist()):
        expected, reverse = image, image
        for op, back in zip(order, reversed(order)):
            expected = functions[op](expected, factor[op])
            reverse = functions[back](reverse, factor[back])
        in_given_order += bool(torch.allclose(view, expected, atol=2e-4))
        in_reverse += bool(torch.allclose(view, reverse, atol=2e-4))
    assert in_given_order == len(views)
    assert in_reverse < len(views) // 2  # the order matters: applied backwards, most views differ


def test_jitter_order_setting_is_checked():
    with pytest.raises(ConfigError, match="jitter_order.*batch, image"):
        method_crop_groups("swav", "2x32", global_augment={"jitter_order": "pixel"})
    groups = method_crop_groups("swav", "2x32+2x16", global_augment={"jitter_order": "image"})
    assert [g.jitter_order for g in groups] == ["image", "batch"]


def count_augment_kernels(groups, batch):
    augment = MultiCropAugment(groups, seed=0)
    canvases = random_canvases(n=batch, size=32)
    augment(canvases)  # per-group constants are built on the first call
    return count_kernels(augment, canvases)[0]


def test_the_augmentation_launches_a_fixed_small_number_of_kernels_per_crop_group():
    # no per-sample or per-view Python loops: the count depends on the groups, not on the batch or views
    two_views = count_augment_kernels(method_crop_groups("dino", "2x32"), batch=4)
    assert count_augment_kernels(method_crop_groups("dino", "2x32"), batch=64) == two_views
    assert count_augment_kernels(method_crop_groups("dino", "8x32"), batch=4) == two_views
    multi_crop = count_augment_kernels(method_crop_groups("dino", "2x32+6x16"), batch=4)
    assert multi_crop < 2 * two_views + 5
    # every operation on, DINO's globals: 184 kernels before this was reduced (2026-11-23), 82 after
    assert two_views <= 90, two_views


def test_compiled_pixel_ops_make_the_same_views():
    # data.compile_augment: every pixel operation through torch.compile (fused kernels); same draws,
    # same views up to float rounding, over several calls (the jitter order changes per call)
    groups = method_crop_groups("dino", "2x16")
    eager = MultiCropAugment(groups, seed=5)
    compiled = MultiCropAugment(groups, seed=5, compile_ops=True)
    assert "compiled" in repr(compiled)
    canvases = random_canvases(n=8, size=20)
    for _ in range(3):
        for a, b in zip(eager(canvases), compiled(canvases)):
            assert torch.allclose(a, b, atol=1e-5)
