"""Adaptive batch fusion (BA-SSL) as a plug-in: the samples of each view's batch communicate before (or inside) the
student's backbone, with a strength that grows over training.

Paper: Zhang, Shen & Liu, "From Pretext to Purpose: Batch-Adaptive Self-Supervised Learning", arXiv preprint 2023
(v1 "adaptive technique of batch fusion"), https://arxiv.org/abs/2311.09974. No official code; only the abstract and
the component names are public, so this is a documented reconstruction. *paper*: stated in the abstract or named in
the paper; *ours*: our choice where the paper is unavailable, exposed as an option where it is a real unknown.

Equations, per view ``x`` (``B x C x H x W``: the input, or a feature map of the backbone), ``L`` layers::

    x_0 = x
    x_l = x_{l-1} + alpha_l(t) * F_l(x_{l-1})          l = 1..L,  F_l: B x C x H x W -> B x C x H x W
    F_l = PatchRestore o Mixer o ConvEmbedding o PatchPartition    (contrastkit.models.batch_fusion)

- the Embedding Layer ``F_l`` built of Patch Partition, Conv Embedding and Patch Restore, "dimensionality
  reduction and reconstruction of batch data" with "intra-batch communication" (*paper*); its form (a stride-``p``
  conv to ``embed_dim`` channels, a mixer over the batch axis at each patch position, a transposed conv back, zero
  padding to multiples of ``p``) is *ours*.
- the residual ``x + alpha(t) F(x)`` and a strength that starts at 0, so training starts as the host: *ours*; that
  the effect is "adaptively amplified as the training progresses" is *paper*.
- ``L`` stacked layers, each with its own weights and gate: the number of Embedding Layers is ablated in the
  *paper*; default 1 is *ours*.

Where it acts (all *ours*):

- per view: each view's batch is fused on its own with the same weights; the two views of an image never meet
  (fusing them together would let the positive leak into its anchor, the "cheating" MoCo's shuffling BN prevents).
- the student encoder only: a momentum teacher (MoCo, BYOL, All4One) sees plain inputs unless ``teacher: true`` (then the
  teacher's views pass the same layers, without gradient; input placement only).
- training only: kNN/linear evaluation, ``export``, ``embed`` and ``load_backbone`` use the backbone alone (the
  layers live in the plug-in, not in the backbone; at a stage, a forward hook is registered on the backbone only
  around each call of the student encoder and removed after it).
- ``placement: input`` (default; "from a data processing standpoint", *paper*) or after a named backbone stage
  (``stem``, ``stage1`` ... ``stageN``; :func:`contrastkit.models.backbone_stages`), a real unknown.
- MoCo's emulated shuffling BN (one process, ``method.options.bn_splits`` groups) emulates that many processes, so
  the fusion sees one group at a time, like the local batch of each emulated process.

Distributed (DDP): the batch that communicates is each process's local batch (no all-gather: a gathered batch
would need the other processes' gradients). W processes therefore differ from one process on the whole batch, as
with BatchNorm. All the layers' parameters are in every step's graph even at strength 0 (the residual is computed
and multiplied, never skipped), so DDP needs no ``find_unused_parameters``.

Options (``plugins.batch_fusion.<key>``, all *ours* unless said):

- ``patch_size`` (int >= 1, default 4): ``p``; 28 px Fashion-MNIST -> 7 x 7 positions.
- ``embed_dim`` (int >= 1, default 32): ``E``, the width of the reduced (embedded) patches.
- ``mixer`` (default ``attention``): ``attention`` (pre-LayerNorm multi-head self-attention over the batch axis at
  each position, any batch size) or ``linear`` (a learned ``B x B`` map over the batch axis; needs every batch to
  have exactly ``optim.batch_size`` samples, which training's ``drop_last`` loader guarantees; refused on MoCo with
  emulated shuffling BN, whose groups are smaller; a batch of another size stops training with a one-line error).
- ``heads`` (int >= 1 dividing ``embed_dim``, default 4): attention heads.
- ``layers`` (int >= 1, default 1): ``L``.
- ``strength`` (default ``learned``): ``learned`` (``alpha_l = g_l``, a scalar parameter initialised at 0),
  ``ramp`` (``alpha_l = max_strength * t`` with ``t`` the training progress in [0, 1], linear) or ``both``
  (``alpha_l = max_strength * t + g_l``). ``ramp`` with ``max_strength: 0`` is the host exactly (tested).
- ``max_strength`` (float >= 0, default 1.0): the ramp's final strength.
- ``placement`` (default ``input``): ``input``, ``stem`` or ``stageK`` of the configured backbone.
- ``teacher`` (bool, default false): also fuse a momentum teacher's views (see above).
- ``lr_factor`` (float > 0, default 1.0): learning-rate factor of the parameter group ``plugins.batch_fusion``.

Logged (``train/batch_fusion_<key>``, per step): ``strength`` (``alpha`` averaged over layers) and ``relative_norm``
(``||x_L - x_0|| / ||x_0||``: the size of the fused part relative to what it is added to), averaged over the
student's encoder calls of the step.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from contrastkit.config import Config, check_value
from contrastkit.errors import ConfigError
from contrastkit.models import backbone_stages, stage_names
from contrastkit.models.batch_fusion import MIXERS, BatchFusionLayer, relative_norm
from contrastkit.plugins.base import Plugin, StepContext
from contrastkit.plugins.registry import register

STRENGTHS = ("learned", "ramp", "both")


@dataclass
class BatchFusionOptions:
    """``plugins.batch_fusion`` options; see the module docstring for their meaning and sources."""

    patch_size: int = 4  #: p
    embed_dim: int = 32  #: E
    mixer: str = "attention"  #: attention, linear
    heads: int = 4  #: attention heads
    layers: int = 1  #: L stacked Embedding Layers
    strength: str = "learned"  #: learned, ramp, both
    max_strength: float = 1.0  #: the ramp's final strength
    placement: str = "input"  #: input, stem, stage1 ...
    teacher: bool = False  #: also fuse a momentum teacher's views (input placement)
    lr_factor: float = 1.0  #: learning-rate factor of the plug-in's parameter group

    def validate(self, prefix: str) -> None:
        for key in ("patch_size", "embed_dim", "heads", "layers"):
            check_value(getattr(self, key) >= 1, f"{prefix}.{key}", getattr(self, key), "an integer >= 1")
        check_value(self.mixer in MIXERS, f"{prefix}.mixer", self.mixer, "one of " + ", ".join(MIXERS))
        check_value(self.mixer != "attention" or self.embed_dim % self.heads == 0, f"{prefix}.heads", self.heads,
                    f"a divisor of {prefix}.embed_dim={self.embed_dim}")
        check_value(self.strength in STRENGTHS, f"{prefix}.strength", self.strength, "one of " + ", ".join(STRENGTHS))
        check_value(math.isfinite(self.max_strength) and self.max_strength >= 0, f"{prefix}.max_strength",
                    self.max_strength, "a finite number >= 0")
        check_value(re.fullmatch(r"input|stem|stage[1-9][0-9]*", self.placement) is not None, f"{prefix}.placement",
                    self.placement, "input, stem or stageK (a stage of the backbone)")
        check_value(not self.teacher or self.placement == "input", f"{prefix}.teacher", self.teacher,
                    f"false unless {prefix}.placement=input (a teacher's feature maps are not hooked)")
        check_value(math.isfinite(self.lr_factor) and self.lr_factor > 0, f"{prefix}.lr_factor", self.lr_factor,
                    "a finite number > 0")


@register
class BatchFusion(Plugin):
    """Adaptive batch fusion on the student's views or feature maps; see the module docstring.

    Args:
        options: validated :class:`BatchFusionOptions`.
        batch_size: per-process batch (the linear mixer's ``B``). Default 256.
        seed: seed of the layers' initialisation (drawn from a forked RNG, so the host's random stream, e.g.
            MoCo's shuffles, is the same with and without the plug-in). Default 0.
    """

    name = "batch_fusion"
    hosts = dict.fromkeys(["simclr", "moco", "nnclr", "byol", "barlow", "all4one"])  # any loss
    Options = BatchFusionOptions

    def __init__(self, options: BatchFusionOptions, batch_size: int = 256, seed: int = 0) -> None:
        super().__init__(options)
        self.lr_factor = options.lr_factor
        self.batch_size, self.seed = batch_size, seed
        self.layers = nn.ModuleList()  # built by attach(), once the channels are known
        self.gates = nn.ParameterList()
        self._stats: list[tuple[Tensor, Tensor]] = []

    @classmethod
    def build(cls, options: BatchFusionOptions, cfg: Config) -> BatchFusion:
        return cls(options, batch_size=cfg.optim.batch_size, seed=cfg.train.seed)

    @classmethod
    def check_config(cls, options: BatchFusionOptions, cfg: Config) -> None:
        prefix = f"plugins.{cls.name}"
        if options.placement != "input":
            names = stage_names(cfg.model.backbone, cfg.model)
            check_value(options.placement in names, f"{prefix}.placement", options.placement,
                        f"input or a stage of model.backbone={cfg.model.backbone}: {', '.join(names)}")
            check_value(not cfg.train.compile, "train.compile", cfg.train.compile,
                        f"false with {prefix}.placement={options.placement} (a hook inside the compiled backbone)")
        splits = cfg.method.options.get("bn_splits", 8)
        if options.mixer == "linear" and cfg.method.name == "moco" and cfg.method.shuffle_bn in ("auto", "shuffle") \
                and splits != 1:
            raise ConfigError(f"{prefix}.mixer=linear needs whole batches, but MoCo's emulated shuffling BN encodes "
                              f"groups of the batch (method.options.bn_splits={splits}): use {prefix}.mixer=attention,"
                              " method.shuffle_bn=none or method.options.bn_splits=1")

    def attach(self, method: nn.Module) -> None:
        o = self.options
        if o.teacher and not isinstance(getattr(method, "teacher", None), nn.Module):
            raise ConfigError(f"plugins.batch_fusion.teacher=true needs a host with a momentum teacher (moco, byol, "
                              f"all4one); "
                              f"method.name={method.cfg.name} has none")
        if o.placement == "input":
            channels = next(m for m in method.backbone.modules() if isinstance(m, nn.Conv2d)).in_channels
        else:
            channels = backbone_stages(method.backbone)[o.placement][1]
        with torch.random.fork_rng(devices=[]):  # the host's random stream stays untouched
            torch.manual_seed(self.seed)
            for _ in range(o.layers):
                self.layers.append(BatchFusionLayer(channels, o.patch_size, o.embed_dim, o.mixer, o.heads,
                                                    self.batch_size))
        if o.strength in ("learned", "both"):
            self.gates.extend(nn.Parameter(torch.zeros(())) for _ in range(o.layers))

    # ----------------------------------------------------------------------------------------- the fusion
    def strength(self, layer: int, progress: float) -> Tensor | float:
        """``alpha_layer(t)`` (module docstring): the gate, the ramp ``max_strength * t``, or their sum."""
        ramp = self.options.max_strength * min(1.0, max(0.0, progress))
        if self.options.strength == "ramp":
            return ramp
        gate = self.gates[layer]
        return gate + ramp if self.options.strength == "both" else gate

    def fuse(self, x: Tensor, progress: float, record: bool = True) -> Tensor:
        """``x_L`` of one view ``x`` (``B x C x H x W``); ``record``: keep the step's logged statistics."""
        out = x
        alphas = []
        for i, layer in enumerate(self.layers):
            alpha = self.strength(i, progress)
            out = out + alpha * layer(out)  # B x C x H x W; computed even at alpha = 0 (DDP: no unused parameters)
            alphas.append(torch.as_tensor(alpha).detach().float())
        if record:
            self._stats.append((torch.stack(alphas).mean(), relative_norm(out - x, x)))
        return out

    def transform_input(self, view: Tensor, ctx: StepContext) -> Tensor:
        return self.fuse(view, ctx.progress) if self.options.placement == "input" else view

    def transform_teacher_input(self, view: Tensor, ctx: StepContext) -> Tensor:
        return self.fuse(view, ctx.progress, record=False) if self.options.teacher else view

    @contextlib.contextmanager
    def encoding(self, backbone: nn.Module, num_views: int, ctx: StepContext) -> Iterator[None]:
        """At a stage placement: a forward hook on that stage of ``backbone`` for this call only, fusing each of
        the ``num_views`` concatenated views' feature maps on its own."""
        if self.options.placement == "input":
            yield
            return

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            # (V*B) x C_s x h x w -> the same, each view's B rows fused on their own
            return torch.cat([self.fuse(part, ctx.progress) for part in output.chunk(num_views)])

        handle = backbone_stages(backbone)[self.options.placement][0].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def logs(self) -> dict[str, Tensor]:
        if not self._stats:
            return {}
        alphas, norms = zip(*self._stats)
        self._stats = []
        return {"strength": torch.stack(alphas).mean(), "relative_norm": torch.stack(norms).mean()}
