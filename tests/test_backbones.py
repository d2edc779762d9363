import pytest
import torch

from trainers.backbones import MultiCropEncoder, build_backbone
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


def test_multicrop_encoder_groups_equal_sizes_and_matches_per_view_calls():
    torch.manual_seed(0)
    model, _ = build_backbone("resnet18", 32)
    model.eval()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    encoder = MultiCropEncoder(model, torch.nn.Linear(512, 7))
    views = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(4)]
    with torch.no_grad():
        outputs, features = encoder(views, return_features=True)
        assert calls == [(6, 3, 32, 32), (12, 3, 16, 16)]  # one call per crop size
        assert [tuple(o.shape) for o in outputs] == [(3, 7)] * 6
        assert torch.allclose(features[3], model(views[3]), atol=1e-5)


def test_unknown_backbone_suggests():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_backbone("resnet-18", 32)
    with pytest.raises(ConfigError, match="patch size"):
        build_backbone("vit_tiny", 30)
