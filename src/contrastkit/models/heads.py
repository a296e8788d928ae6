"""Projector and predictor MLPs, shared by every method.

One builder, :func:`mlp`, makes the heads of all the methods: SimCLR's projector (2 layers, BN on the hidden
layer), MoCo v2's (2 layers, no BN), BYOL/NNCLR's projector and predictor, Barlow Twins' 3-layer projector.
"""

from __future__ import annotations

from torch import nn

from contrastkit.errors import ConfigError


def mlp(
    in_dim: int,
    hidden_dim: int = 2048,
    out_dim: int = 128,
    num_layers: int = 2,
    hidden_bn: bool = True,
    last_bn: bool = False,
    last_bn_affine: bool = True,
) -> nn.Sequential:
    """Build an MLP head: ``num_layers - 1`` blocks of Linear(-BN)-ReLU, then a final Linear(-BN).

    Args:
        in_dim: input features (the backbone's output dim).
        hidden_dim: width of the hidden layers. Default 2048.
        out_dim: output embedding dim. Default 128.
        num_layers: number of Linear layers (>= 1). Default 2; ``1`` is a linear projection.
        hidden_bn: BatchNorm1d after each hidden Linear (SimCLR v1/BYOL: True; MoCo v2: False). Default True.
        last_bn: BatchNorm1d after the last Linear (SimCLR v2, NNCLR and Barlow Twins' projectors use it). Default False.
        last_bn_affine: whether that last BN has learnable scale/shift. Default True.
    """
    if num_layers < 1 or min(in_dim, hidden_dim, out_dim) < 1:
        raise ConfigError(
            f"invalid head: num_layers={num_layers}, dims=({in_dim}, {hidden_dim}, {out_dim}); all must be >= 1"
        )
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not hidden_bn))
        if hidden_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)
