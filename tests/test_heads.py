import pytest
import torch

from trainers.errors import ConfigError
from trainers.heads import DINOHead, ProjectionHead, Prototypes


def test_projection_head_shapes():
    head = ProjectionHead(512, 512, 128)
    assert tuple(head(torch.randn(4, 512)).shape) == (4, 128)
    assert isinstance(head.net[1], torch.nn.BatchNorm1d)


def test_prototypes_give_cosine_scores_after_normalisation():
    prototypes = Prototypes(16, 30)
    with torch.no_grad():
        prototypes.layer.weight.mul_(5.0)
    prototypes.normalize_()
    assert torch.allclose(prototypes.layer.weight.norm(dim=1), torch.ones(30), atol=1e-6)
    embeddings = torch.randn(8, 16) * 10
    scores = prototypes(embeddings)
    assert scores.abs().max() <= 1.0 + 1e-6  # cosine similarities
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    assert torch.allclose(prototypes(unit, normalized=True), scores, atol=1e-6)
    # normalized=True trusts its input: no second normalisation
    assert torch.allclose(prototypes(embeddings, normalized=True), embeddings @ prototypes.layer.weight.t(), atol=1e-5)
    assert prototypes(embeddings, normalized=True).abs().max() > 2
    assert prototypes.layer.bias is None


def test_dino_head_output_and_frozen_norm():
    head = DINOHead(384, out_dim=1000, hidden_dim=64, bottleneck_dim=32)
    out = head(torch.randn(5, 384))
    assert tuple(out.shape) == (5, 1000)
    # unit-norm bottleneck times unit-norm rows of the last layer: |logits| <= 1
    assert out.abs().max() <= 1.0 + 1e-5
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1.0)
    out.sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad is not None
    linear_layers = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linear_layers) == 3
    assert DINOHead(8, 10, 16, 4, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_bad_head_sizes():
    with pytest.raises(ConfigError, match="out_dim"):
        DINOHead(8, out_dim=0)
    with pytest.raises(ConfigError, match="prototypes"):
        Prototypes(8, 0)


def test_dino_head_batch_norm_option_puts_bn_after_each_hidden_layer():
    from torch import nn

    from trainers.heads import DINOHead

    plain = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16, layers=3)
    with_bn = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16, layers=3, batch_norm=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    norms = [m for m in with_bn.mlp if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2 and all(m.num_features == 48 for m in norms)
    out = with_bn(torch.randn(8, 32))
    assert out.shape == (8, 64)
    # the bottleneck is L2-normalised and the last layer has unit rows: logits are cosines
    assert out.abs().max() <= 1.0 + 1e-5
