import pytest
import torch

from trainers.backbones import build_backbone
from trainers.errors import ConfigError


@pytest.mark.parametrize("name,size,dim", [("resnet18", 32, 512), ("resnet50", 224, 2048), ("vit_tiny", 32, 192),
                                           ("vit_small", 64, 384)])
def test_backbones_take_any_crop_size(name, size, dim):
    model, features = build_backbone(name, size)
    assert features == dim
    model.eval()
    with torch.no_grad():
        for side in (size, size // 2):
            assert tuple(model(torch.randn(2, 3, side, side)).shape) == (2, dim)


def test_cifar_stem_is_automatic_for_small_images():
    small, _ = build_backbone("resnet18", 32)
    large, _ = build_backbone("resnet18", 224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, torch.nn.MaxPool2d)


def test_encode_views_groups_equal_sizes_or_runs_each_view_alone():
    """by_size: one backbone call per run of equal-sized views, the head once over all of them; each:
    backbone and head once per view (so BatchNorm sees one view's batch). Same features in eval mode."""
    from trainers.methods.base import encode_views

    torch.manual_seed(0)
    model, _ = build_backbone("resnet18", 32)
    model.eval()
    head = torch.nn.Sequential(torch.nn.Linear(512, 7))
    calls, head_calls = [], []
    model.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    head.register_forward_hook(lambda module, args, out: head_calls.append(tuple(args[0].shape)))
    views = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(4)]
    with torch.no_grad():
        grouped = encode_views(model, views, "by_size", head)
        assert calls == [(6, 3, 32, 32), (12, 3, 16, 16)] and head_calls == [(18, 512)]
        calls.clear(), head_calls.clear()
        each = encode_views(model, views, "each", head)
        assert calls == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 4 and head_calls == [(3, 512)] * 6
        features = encode_views(model, views, "by_size")
    assert tuple(grouped.shape) == (18, 7) and tuple(features.shape) == (18, 512)
    assert torch.allclose(grouped, each, atol=1e-4)  # view order kept: rows 9-11 are the fourth view
    assert torch.allclose(features[9:12], model(views[3]), atol=1e-4)


def test_unknown_backbone_suggests():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_backbone("resnet-18", 32)
    with pytest.raises(ConfigError, match="patch size"):
        build_backbone("vit_tiny", 30)
