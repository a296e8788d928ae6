"""Backbones: torchvision ResNets (with an optional CIFAR stem) and a small, fast ResNet for CPU work.

Every backbone maps ``B x C x H x W`` images to ``B x D`` features (global average pooled, no classifier), and
:func:`build_backbone` returns it together with ``D``.

- ``resnet18`` / ``resnet50``: ``torchvision.models.resnet18/50(weights=None)`` with the classifier replaced by
  ``nn.Identity``, any number of input channels, and ``cifar_stem=True`` for 32 px inputs (3x3 stride-1 first conv,
  no max-pool), as in SimCLR's CIFAR experiments (https://arxiv.org/abs/2002.05709, appendix B.9) and solo-learn.
  The state dict keys are torchvision's, so an exported backbone loads into ``torchvision.models.resnet18()``
  (with the same stem change) without contrastkit.
- ``convnet``: a plain 4-block ConvNet (:class:`ConvNet`), the reference point for throughput.
- ``small_resnet``: a width-scaled pre-activation-free ResNet with ``len(widths)`` stages of ``blocks`` basic
  blocks each (default widths 32-64-128-256, one block per stage, stride 2 from the second stage on). It is our CPU
  backbone: at 28 px it trains SimCLR on Fashion-MNIST at about a minute per epoch on 2 cores (see
  docs/benchmarks.md). Written by hand because torchvision has no ResNet with configurable stage widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import nn

from contrastkit.errors import ConfigError

BACKBONES = ("small_resnet", "convnet", "resnet18", "resnet50")

#: The arguments of :func:`build_backbone` each backbone reads (besides its name); an export records exactly these.
BACKBONE_ARGS: dict[str, tuple[str, ...]] = {
    "small_resnet": ("in_channels", "widths", "blocks", "stem_stride"),
    "convnet": ("in_channels", "widths"),
    "resnet18": ("in_channels", "cifar_stem"),
    "resnet50": ("in_channels", "cifar_stem"),
}

#: SmallResNet's stem stride when none is given (the class, :func:`build_backbone` and ``model.stem_stride`` share it).
DEFAULT_STEM_STRIDE = 2


class BasicBlock(nn.Module):
    """3x3-3x3 residual block (He et al. 2016, https://arxiv.org/abs/1512.03385) with a 1x1 projection shortcut
    when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet for CPU training on 28-64 px images.

    Args:
        in_channels: input channels (1 for Fashion-MNIST, 3 for RGB). Default 3.
        widths: output channels of each stage. Default (32, 64, 128, 256).
        blocks: basic blocks per stage. Default 1.
        stem_stride: stride of the 3x3 stem conv. Default 2 (:data:`DEFAULT_STEM_STRIDE`: 28 px inputs become 14 px
            in the first stage); 1 keeps the input resolution (4x the compute).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: int = 1,
        stem_stride: int = DEFAULT_STEM_STRIDE,
    ) -> None:
        super().__init__()
        if not widths or blocks < 1:
            raise ConfigError("model.widths must be non-empty and model.blocks >= 1")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(in_ch, w, stride=2 if (i > 0 and b == 0) else 1))
                in_ch = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_ch
        self.widths, self.blocks = tuple(widths), blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))  # B x W x h x w
        return torch.flatten(self.pool(x), 1)  # B x W


class ConvNet(nn.Module):
    """A plain ConvNet: ``len(widths)`` blocks of 3x3 conv -> BN -> ReLU -> 2x2 max-pool, then global average pool.

    The max-pool is PyTorch's default (floor mode), so 28 px inputs go 28 -> 14 -> 7 -> 3 -> 1. With the default
    widths (32, 64, 128, 256) this is the 4-layer ConvNet of lightly's Fashion-MNIST reference run (our reference
    point for throughput in docs/benchmarks.md).

    Args:
        in_channels: input channels. Default 3. widths: channels of each block. Default (32, 64, 128, 256).
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        if not widths:
            raise ConfigError("model.widths must be non-empty")
        layers: list[nn.Module] = []
        in_ch = in_channels
        for w in widths:
            layers += [nn.Conv2d(in_ch, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=False)]
            in_ch = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_ch
        self.widths = tuple(widths)
        self.min_size = 2 ** len(widths)  # each floor-mode pool halves the side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:  # the training crop is checked against min_size when the run is set up
            raise ValueError(f"convnet needs inputs of at least {self.min_size} px (each of its blocks halves the "
                             f"side), got {tuple(x.shape[-2:])}")
        return torch.flatten(self.pool(self.features(x)), 1)  # B x widths[-1]


def _torchvision_resnet(name: str, in_channels: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    model = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim


def build_backbone(
    name: str = "small_resnet",
    in_channels: int = 3,
    cifar_stem: bool = False,
    widths: Sequence[int] = (32, 64, 128, 256),
    blocks: int = 1,
    stem_stride: int = DEFAULT_STEM_STRIDE,
) -> tuple[nn.Module, int]:
    """Build a backbone by name and return ``(module, feature_dim)``.

    Args:
        name: one of ``small_resnet``, ``convnet``, ``resnet18``, ``resnet50``.
        in_channels: input image channels.
        cifar_stem: for torchvision ResNets, replace the 7x7/2 conv and max-pool by a 3x3/1 conv (small images).
        widths: stage widths of ``small_resnet`` and ``convnet``.
        blocks, stem_stride: ``small_resnet`` only (see :class:`SmallResNet`).
    """
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    if name == "small_resnet":
        net = SmallResNet(in_channels, widths, blocks, stem_stride)
        return net, net.out_dim
    if name == "convnet":
        conv = ConvNet(in_channels, widths)
        return conv, conv.out_dim
    if name in ("resnet18", "resnet50"):
        return _torchvision_resnet(name, in_channels, cifar_stem)
    raise ConfigError(f"unknown model.backbone {name!r}; choose one of {', '.join(BACKBONES)}")



def backbone_args(name: str, model_cfg: Any, in_channels: int) -> dict[str, Any]:
    """The :func:`build_backbone` keyword arguments of backbone ``name`` (:data:`BACKBONE_ARGS`) taken from a
    ``model`` config section (``cifar_stem``, ``widths``, ``blocks``, ``stem_stride``) and the image channels:
    ``build_backbone(name, **backbone_args(name, cfg.model, C))`` builds the configured backbone."""
    if name not in BACKBONE_ARGS:
        raise ConfigError(f"unknown model.backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    values = {"in_channels": int(in_channels), "cifar_stem": bool(model_cfg.cifar_stem),
              "widths": [int(w) for w in model_cfg.widths], "blocks": int(model_cfg.blocks),
              "stem_stride": int(model_cfg.stem_stride)}
    return {k: values[k] for k in BACKBONE_ARGS[name]}


def stage_names(name: str, model_cfg: Any) -> list[str]:
    """The stage names :func:`backbone_stages` gives backbone ``name`` built from a ``model`` config section, in order
    (for checking a configuration before anything is built)."""
    if name == "convnet":
        return [f"stage{i + 1}" for i in range(len(model_cfg.widths))]
    count = len(model_cfg.widths) if name == "small_resnet" else 4
    return ["stem", *(f"stage{i + 1}" for i in range(count))]


def backbone_stages(backbone: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """The named stages of a backbone made by :func:`build_backbone`: name -> (the sub-module whose output is the
    stage's feature map ``B x C_s x h_s x w_s``, ``C_s``), in forward order.

    ``stem`` (small_resnet: the stem conv-BN-ReLU; ResNets: conv1-bn1-relu-maxpool, read at the max-pool) and
    ``stage1`` ... ``stageN`` (small_resnet: the last block of each width; ResNets: ``layer1`` ... ``layer4``;
    convnet: each conv-BN-ReLU-pool block, read at its pool). A forward hook on one of these modules that returns a
    tensor of the same shape changes what the rest of the backbone sees: the way to run a backbone "in two parts"
    without changing the module (:mod:`contrastkit.plugins.batch_fusion` registers one only while it trains)."""
    if isinstance(backbone, SmallResNet):
        stages = {"stem": (backbone.stem, backbone.widths[0])}
        for i, w in enumerate(backbone.widths):
            stages[f"stage{i + 1}"] = (backbone.layers[(i + 1) * backbone.blocks - 1], w)
        return stages
    if isinstance(backbone, ConvNet):
        return {f"stage{i + 1}": (backbone.features[4 * i + 3], w) for i, w in enumerate(backbone.widths)}
    if isinstance(backbone, torchvision.models.ResNet):
        stages = {"stem": (backbone.maxpool, backbone.conv1.out_channels)}
        for i in range(4):
            layer = getattr(backbone, f"layer{i + 1}")
            bns = [m for m in layer[-1].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            stages[f"stage{i + 1}"] = (layer, bns[-1].num_features)  # the block's last BN: its output width
        return stages
    raise ConfigError(f"{type(backbone).__name__} has no named stages; use one of {', '.join(BACKBONES)}")
