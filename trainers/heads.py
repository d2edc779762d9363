"""Projection heads of the methods, with the reference code's defaults.

- ``ProjectionHead``: Linear -> BN -> ReLU -> Linear (SwAV: hidden 2048 for RN50 / 512 for RN18,
  out 128; SupCon/SimCLR: hidden = input width, out 128).
- ``Prototypes``: SwAV's bias-free prototype layer, re-normalised to unit rows before every step.
- ``DINOHead``: 3-layer MLP (GELU, hidden 2048, optional BN) -> bottleneck 256 -> L2 normalise -> weight-normalised
  linear layer of ``out_dim`` (65536 by default), its norm fixed at 1 when ``norm_last_layer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from trainers.errors import ConfigError


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    return value


class ProjectionHead(nn.Module):
    """``layers`` linear layers with (BN +) ReLU between them. ``last_bn`` adds a BN without affine
    parameters after the last layer (MoCo v3's projectors, and its ViT predictor). ``last_bias``: a
    bias on the last linear layer (default: only without ``last_bn``; MoCo v3 never uses one)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128, layers: int = 2, batch_norm: bool = True,
                 last_bn: bool = False, last_bias: bool | None = None):
        super().__init__()
        _positive("head hidden size", hidden_dim)
        _positive("head output size", out_dim)
        _positive("head layers", layers)
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            blocks.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                blocks.append(nn.BatchNorm1d(hidden_dim))
            blocks.append(nn.ReLU(inplace=True))
            width = hidden_dim
        blocks.append(nn.Linear(width, out_dim, bias=(not last_bn) if last_bias is None else last_bias))
        if last_bn:
            blocks.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class Prototypes(nn.Module):
    """Scores of L2-normalised embeddings against K unit-norm prototypes (cosine similarities)."""

    def __init__(self, dim: int, count: int = 3000):
        super().__init__()
        _positive("number of prototypes", count)
        self.layer = nn.Linear(dim, count, bias=False)

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project the prototypes back onto the unit sphere (SwAV does this before every step)."""
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Scores [B, K]; ``normalized``: the embeddings are unit vectors already (SwAV's: no second pass)."""
        return self.layer(embeddings if normalized else F.normalize(embeddings, dim=1))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True, batch_norm: bool = False):
        super().__init__()
        for name, value in (("DINO out_dim", out_dim), ("DINO hidden_dim", hidden_dim),
                            ("DINO bottleneck_dim", bottleneck_dim), ("DINO head layers", layers)):
            _positive(name, value)
        if layers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            # batch_norm: BN after each hidden layer (DINO's --use_bn_in_head), steadier for ResNets
            def hidden(width):
                return [nn.Linear(width, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if batch_norm else []) + [nn.GELU()]

            blocks = hidden(in_dim)
            for _ in range(layers - 2):
                blocks += hidden(hidden_dim)
            blocks.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*blocks)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # start with unit-norm rows; with norm_last_layer the norm (g) stays 1 for the whole run
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))

    def last_layer_parameters(self):
        """What DINO freezes during the first epoch (gradients dropped)."""
        return list(self.last_layer.parameters())
