"""The plug-in seam: the base class of the techniques that compose with the methods, and the step context.

A plug-in is an ``nn.Module`` (its parameters train in its own parameter groups, its buffers are checkpointed with
the method) that overrides some of the hooks below; every hook's default does nothing, so a run without plug-ins
is exactly the host's run. The hooks act in this fixed order within a training step (docs/architecture.md):

1. ``select_batch(indices, ctx, module)`` (the batch; batch curation): the dataset indices of the loader's batch
   (a candidate pool) -> the indices to train on. Called by the training module before the images are gathered.
   A plug-in that wants a pool declares ``pool_factor`` (the loader then delivers ``pool_factor x optim.batch_size``
   indices per step; ``optim.batch_size`` pairs are trained, so the learning rate, its schedule and the epoch length
   follow ``optim.batch_size``), and may hand the views it made of the kept indices to the module through
   ``batch_views()`` (so the views it scored are the views that are trained).
2. ``transform_input(view, ctx)`` (the input; batch fusion): each view of the *student* encoder, one view at a
   time (never mixing the two views of an image), before the backbone; teachers see the plain views unless a
   plug-in also overrides ``transform_teacher_input``. Called in :meth:`contrastkit.methods.SSLMethod.encode_views`.
3. the encoders and heads of the host; ``encoding(backbone, num_views, ctx)`` is a context manager around each
   call of the *student* encoder (``num_views`` views of the same size concatenated along the batch), in which a
   plug-in may hook a stage of the backbone (batch fusion on a feature map); outside it the backbone is plain.
4. ``criterion(host, default, cfg)`` (the targets; ASCL): called once when the plug-in is attached to a method;
   returns a replacement for the host's loss module with the same call signature but other targets (e.g. soft
   ones), or None to keep the host's loss.
5. ``extra_losses(outputs, ctx)`` (extra loss terms; All4One-style terms): ``{name: (weight, scalar)}`` added to
   the host's loss as ``weight * scalar`` and logged as ``train/<plugin>_<name>``.

After the optimizer step, ``after_optimizer_step(ctx)`` (schedules, running statistics). ``logs()`` returns the
scalars the plug-in wants in the CSV/TensorBoard logs for the step (logged as ``train/<plugin>_<key>``).

Set-up: ``build(options, cfg)`` makes the plug-in from its options and the run configuration, ``check_config``
refuses options that conflict with the rest of the configuration (before training), and ``attach(method)`` is
called once when the plug-in joins a method (before the targets hook), e.g. to size modules from its backbone.

Compatibility: ``hosts`` maps each compatible method to the ``method.loss`` values it works with (None: any, or the
method has no loss choice). Options: the nested dataclass ``Options``; each field is one ``plugins.<name>.<key>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from contrastkit.errors import ConfigError

if TYPE_CHECKING:  # imported for annotations only: contrastkit.methods imports this module
    from contrastkit.config import Config, MethodConfig
    from contrastkit.methods.base import ParamGroup


@dataclass
class StepContext:
    """What a plug-in knows about the current training step.

    Attributes:
        progress: Fraction of training done, in ``[0, 1]`` (schedules).
        global_step: Optimizer steps done so far.
        epoch: Current epoch.
        generator: The checkpointed augmentation generator on the training device (draw randomness from it so
            that ``--resume`` continues exactly), or None outside training.
        indices: Dataset indices of the batch, ``B`` (long, on the device), or None.
        rank: Global rank of this process.
        world_size: Number of training processes.
    """

    progress: float = 0.0
    global_step: int = 0
    epoch: int = 0
    generator: torch.Generator | None = None
    indices: Tensor | None = None
    rank: int = 0
    world_size: int = 1


@dataclass
class NoOptions:
    """Options of a plug-in that has none."""

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming ``prefix.<key>`` for a bad value."""


class Plugin(nn.Module):
    """Base class of the plug-ins; see the module docstring for the hooks and their order.

    Args:
        options: The validated ``Options`` of the plug-in.
    """

    name: ClassVar[str] = ""
    hosts: ClassVar[dict[str, tuple[str, ...] | None]] = {}
    Options: ClassVar[type] = NoOptions
    lr_factor: float = 1.0  #: learning-rate factor of the plug-in's parameter group
    #: options ``contrastkit bench throughput --plugin NAME`` sets unless configured (so it acts within a few steps)
    bench_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Any) -> None:
        super().__init__()
        self.options = options

    # --------------------------------------------------------------------------------------------- options
    @classmethod
    def parse_options(cls, raw: dict[str, Any] | None) -> Any:
        """The ``Options`` of ``plugins.<name>``: unknown keys, wrong types and bad values raise ConfigError."""
        from contrastkit.config import options_from_dict

        return options_from_dict(cls.Options, raw, f"plugins.{cls.name}")

    @classmethod
    def check_host(cls, method: str, loss: str) -> None:
        """Raise ConfigError unless the plug-in works with ``method.name=method`` and ``method.loss=loss``."""
        if method not in cls.hosts:
            raise ConfigError(f"plugins.{cls.name} does not work with method.name={method}; compatible methods: "
                              f"{', '.join(sorted(cls.hosts))}")
        losses = cls.hosts[method]
        if losses is not None and loss not in losses:
            raise ConfigError(f"plugins.{cls.name} does not work with method.loss={loss} on {method}; compatible "
                              f"losses: {', '.join(losses)}")

    @property
    def pool_factor(self) -> int:
        """Batch: the loader delivers ``pool_factor x optim.batch_size`` indices per step to :meth:`select_batch`,
        which returns ``optim.batch_size`` of them. Default 1 (the host's batch)."""
        return 1

    @classmethod
    def build(cls, options: Any, cfg: Config) -> Plugin:
        """The plug-in of a run from its validated ``options`` and the run configuration. Default: ``cls(options)``."""
        return cls(options)

    @classmethod
    def check_config(cls, options: Any, cfg: Config) -> None:
        """Raise ConfigError if ``options`` conflict with the rest of ``cfg`` (run before training). Default: none."""

    def attach(self, method: nn.Module) -> None:
        """Called once when the plug-in joins ``method`` (an SSLMethod), before its targets hook. Default: nothing."""

    # ----------------------------------------------------------------------------------- hooks, in order
    def select_batch(self, indices: Tensor, ctx: StepContext, module: Any) -> Tensor:
        """Batch: the dataset indices to train on, from the loader's ``indices`` (``module``: the training module,
        with ``images``, ``make_views`` and ``method``). Default: all of them."""
        return indices

    def batch_views(self) -> list[Tensor] | None:
        """Batch: the views (``V x (B x C x h x w)``) :meth:`select_batch` made of the indices it returned this
        step, handed over once, or None (default): the training module makes them."""
        return None

    def transform_input(self, view: Tensor, ctx: StepContext) -> Tensor:
        """Input: one view ``B x C x h x w`` of the student encoder. Default: unchanged."""
        return view

    def transform_teacher_input(self, view: Tensor, ctx: StepContext) -> Tensor:
        """Input of a teacher encoder (momentum or other non-student encoder), one view. Default: unchanged."""
        return view

    def encoding(self, backbone: nn.Module, num_views: int, ctx: StepContext) -> contextlib.AbstractContextManager:
        """Context around one call of the student encoder on ``num_views`` concatenated views. Default: nothing."""
        return contextlib.nullcontext()

    def criterion(self, host: str, default: nn.Module | None, cfg: MethodConfig) -> nn.Module | None:
        """Targets: a replacement of the host's loss module ``default`` (same call signature), or None."""
        return None

    def extra_losses(self, outputs: dict[str, Tensor], ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        """Extra loss terms ``{name: (weight, scalar)}`` given the host's outputs. Default: none."""
        return {}

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Called once per optimizer step, after the host's own update."""

    def logs(self) -> dict[str, Tensor]:
        """Scalars to log for this step (``train/<name>_<key>``). Default: none."""
        return {}

    def parameter_groups(self) -> list[ParamGroup]:
        """The plug-in's trainable parameters, one group ``plugins.<name>`` at ``lr_factor`` (none if it has no
        parameters). Override for several groups."""
        from contrastkit.methods.base import ParamGroup

        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroup(f"plugins.{self.name}", params, self.lr_factor)] if params else []


class PluginSet(nn.Module):
    """The plug-ins of a run (possibly none), in configuration order; dispatches each hook to all of them.

    A method holds one as ``method.plugins`` (empty by default), so plug-in state is part of the method's state
    dict. ``context`` is the :class:`StepContext` of the current step, set by :meth:`begin_step`.
    """

    def __init__(self, plugins: list[Plugin] | None = None) -> None:
        super().__init__()
        self.items = nn.ModuleDict({p.name: p for p in plugins or []})
        self.context = StepContext()

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self.items.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.items)

    def begin_step(self, ctx: StepContext) -> None:
        self.context = ctx

    @property
    def pool_factor(self) -> int:
        """Indices the loader delivers per step, in units of ``optim.batch_size`` (the plug-ins' factors multiplied)."""
        return math.prod(p.pool_factor for p in self)

    def select_batch(self, indices: Tensor, module: Any) -> Tensor:
        for p in self:
            indices = p.select_batch(indices, self.context, module)
        self.context = dataclasses.replace(self.context, indices=indices)
        return indices

    def batch_views(self) -> list[Tensor] | None:
        """The views a batch plug-in made of the kept indices this step, or None."""
        for p in self:
            views = p.batch_views()
            if views is not None:
                return views
        return None

    def transform_input(self, view: Tensor) -> Tensor:
        for p in self:
            view = p.transform_input(view, self.context)
        return view

    def transform_teacher_input(self, view: Tensor) -> Tensor:
        for p in self:
            view = p.transform_teacher_input(view, self.context)
        return view

    @contextlib.contextmanager
    def encoding(self, backbone: nn.Module, num_views: int) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for p in self:
                stack.enter_context(p.encoding(backbone, num_views, self.context))
            yield

    def add_extra_losses(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``outputs`` with the plug-ins' weighted extra terms added to ``"loss"`` and their values and logs added
        as ``<plugin>_<name>`` entries; ``outputs`` itself when there are no plug-ins."""
        if not len(self):
            return outputs
        out = dict(outputs)
        for p in self:
            for key, (weight, value) in p.extra_losses(outputs, self.context).items():
                out["loss"] = out["loss"] + weight * value
                out[f"{p.name}_{key}"] = value.detach()
            out.update({f"{p.name}_{key}": v for key, v in p.logs().items()})
        return out

    def after_optimizer_step(self) -> None:
        for p in self:
            p.after_optimizer_step(self.context)

    def parameter_groups(self) -> list[ParamGroup]:
        return [g for p in self for g in p.parameter_groups()]
