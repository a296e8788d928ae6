"""The method interface that the training loop drives.

A method is an ``nn.Module`` that owns a backbone and whatever heads, momentum encoders, queues and losses it
needs, and turns a list of augmented views into a loss. The Lightning module in :mod:`contrastkit.training` does
everything else (data, views, optimisation, logging, checkpoints), so a method reads as a short composition of
shared parts (:mod:`contrastkit.models`, :mod:`contrastkit.losses`).

Contract:

- ``forward_loss(views, progress) -> dict``: ``views`` is a list of ``B x C x h x w`` float tensors (one per view,
  already augmented and normalised); ``progress`` in ``[0, 1]`` is the fraction of training done (for schedules such
  as a momentum that rises to 1). Returns a dict with the scalar ``"loss"`` and any other scalars to log.
- ``after_optimizer_step(progress)``: called once per optimizer step that was taken (after gradient accumulation),
  for EMA teachers and queues. Default: the momentum update of the teacher made by :meth:`SSLMethod.add_teacher`,
  if the method has one, then the commit of the keys staged in every
  :class:`~contrastkit.models.MemoryQueue` of the method during the step's micro-batches. Overrides call ``super()``.
- ``after_skipped_step()``: called instead when the optimizer step was skipped (the fp16 grad scaler found
  non-finite gradients): the teacher stays, the staged keys are discarded.
- ``parameter_groups() -> list[ParamGroup]``: named groups with a learning-rate factor (e.g. a predictor at 10x).
  Every trainable parameter appears in exactly one group; the trainer splits each group further into weight-decay /
  no-weight-decay parts.

Plug-ins (:mod:`contrastkit.plugins`): ``method.plugins`` is the run's :class:`~contrastkit.plugins.PluginSet`
(empty by default; :meth:`SSLMethod.use_plugins` attaches one). The base class calls their input hook on the
student's views in :meth:`SSLMethod.encode_views`, lets a targets plug-in replace ``self.criterion``, and adds
their parameter groups; the hosts stay plug-in agnostic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from contrastkit.config import MethodConfig, options_from_dict
from contrastkit.errors import ConfigError
from contrastkit.models import MemoryQueue, MomentumTeacher, cosine_momentum, mlp
from contrastkit.plugins.base import PluginSet
from contrastkit.validation import known_options


@dataclass
class ParamGroup:
    """A named set of parameters with a learning-rate multiplier."""

    name: str
    params: list[nn.Parameter]
    lr_factor: float = 1.0
    #: a fixed peak learning rate for the group instead of ``lr_factor`` x the run's (batch-scaled) peak lr; the
    #: warm-up + cosine schedule still applies (All4One's transformer: 0.1, not batch-scaled)
    lr: float | None = None


class SSLMethod(nn.Module):
    """Base class of the self-supervised methods.

    Class attribute ``own_loss``: the name of the method's own loss (BYOL, Barlow Twins), for which
    ``method.loss`` must stay unset; ``None`` (default) for methods built around a contrastive loss, which read
    ``cfg.contrastive_loss`` (``method.loss``, InfoNCE when unset). ``two_views``: the method takes exactly two
    views (config validation refuses another ``views.num_views``).

    Args:
        backbone: maps ``B x C x H x W`` images to ``B x feature_dim`` features.
        feature_dim: the backbone's output width.
        cfg: the method section of the run configuration.
    """

    own_loss: ClassVar[str | None] = None
    two_views: ClassVar[bool] = False  #: the method uses exactly 2 views (``views.num_views`` must be 2)
    #: typed ``method.options`` (a dataclass with ``validate(prefix)``, as a plug-in's ``Options``), checked when
    #: the configuration is validated; None: the method checks its options itself when it is built
    Options: ClassVar[type | None] = None

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.plugins = PluginSet()
        self.feature_dim = feature_dim
        self.cfg = cfg

    @classmethod
    def parse_options(cls, cfg: MethodConfig) -> Any:
        """The method's ``Options`` from ``cfg.options`` (unknown keys, wrong types, bad values: a one-line
        ConfigError naming ``method.options.<key>``), or None for a method without declared options. Methods with
        checks that involve other fields of ``cfg`` extend it."""
        if cls.Options is None:
            return None
        return options_from_dict(cls.Options, cfg.options, "method.options", cfg.name)

    def use_plugins(self, plugins: PluginSet) -> None:
        """Attach the run's plug-ins; a targets plug-in may replace ``self.criterion`` (its ``criterion`` hook)."""
        self.plugins = plugins
        for plugin in plugins:
            plugin.attach(self)
            criterion = plugin.criterion(self.cfg.name, getattr(self, "criterion", None), self.cfg)
            if criterion is not None:
                self.criterion = criterion

    def encode_views(self, views: list[torch.Tensor], encoder: nn.Module | None = None,
                     student: bool | None = None) -> list[torch.Tensor]:
        """Run ``encoder`` (default: the backbone) on every view, in one batch per crop size.

        Views of the same size are concatenated so that one forward pass serves them all (faster, and BatchNorm
        sees all views together, as in SimCLR's implementation). ``student`` (default: ``encoder is None``): the
        encoder is trained by gradient, so each view first passes the plug-ins' input hook and each encoder call
        runs inside their ``encoding`` context; otherwise (a teacher) the views pass :meth:`teacher_inputs`.
        """
        student = student if student is not None else encoder is None
        views = [self.plugins.transform_input(v) for v in views] if student else self.teacher_inputs(views)
        encoder = self.backbone if encoder is None else encoder
        out: list[torch.Tensor | None] = [None] * len(views)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(views):
            by_size.setdefault(tuple(v.shape[1:]), []).append(i)
        for idx in by_size.values():
            with self.plugins.encoding(self.backbone, len(idx)) if student else contextlib.nullcontext():
                feats = encoder(torch.cat([views[i] for i in idx]))  # (len(idx)*B) x D
            for i, f in zip(idx, feats.chunk(len(idx))):
                out[i] = f
        return out  # type: ignore[return-value]

    def teacher_inputs(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The views a teacher encoder sees: each through the plug-ins' teacher input hook (plain by default)."""
        return [self.plugins.transform_teacher_input(v) for v in views] if len(self.plugins) else views

    def forward_loss(self, views: list[torch.Tensor], progress: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def add_teacher(self, **students: nn.Module) -> MomentumTeacher:
        """Give the method a momentum teacher (``self.teacher``): EMA copies of ``students`` (e.g.
        ``backbone=self.backbone, projector=self.projector``), reachable as ``self.teacher.<name>``. The default
        :meth:`after_optimizer_step` then updates it with momentum ``cosine_momentum(cfg.momentum_base,
        cfg.momentum_final, progress)``; ``momentum_final == momentum_base`` gives MoCo's fixed momentum."""
        self.teacher = MomentumTeacher(students)
        return self.teacher

    def queues(self) -> list[MemoryQueue]:
        """The method's memory queues (any depth)."""
        return [m for m in self.modules() if isinstance(m, MemoryQueue)]

    def after_optimizer_step(self, progress: float) -> None:
        """Hook called once per optimizer step taken: the EMA update of the teacher, if :meth:`add_teacher` made
        one, then every queue commits the keys staged since the previous step."""
        teacher = getattr(self, "teacher", None)
        if isinstance(teacher, MomentumTeacher):
            teacher.update(cosine_momentum(self.cfg.momentum_base, self.cfg.momentum_final, progress))
        for queue in self.queues():
            queue.commit()

    def after_skipped_step(self) -> None:
        """Hook called instead of :meth:`after_optimizer_step` when the optimizer step was skipped (the fp16 grad
        scaler found non-finite gradients): no EMA update, and the staged queue keys are dropped."""
        for queue in self.queues():
            queue.discard()

    def parameter_groups(self) -> list[ParamGroup]:
        """One group per direct sub-module with trainable parameters, named after it (``backbone``,
        ``projector``, ``predictor``, ...), in registration order. Frozen parts (momentum teachers) and
        parameter-free parts (queues, losses) contribute nothing; a group named ``predictor`` gets
        ``optim.predictor_lr_factor``. The plug-ins' groups (``plugins.<name>``, their own factors) come last.
        Override for other groupings."""
        groups = []
        for name, child in self.named_children():
            params = [p for p in child.parameters() if p.requires_grad]
            if params and child is not self.plugins:
                groups.append(ParamGroup(name, params))
        return groups + self.plugins.parameter_groups()


# ------------------------------------------------------------------------------------------------ shared helpers
def build_projector(in_dim: int, cfg: MethodConfig) -> nn.Sequential:
    """The projector described by the method config (``proj_*`` fields), shared by all methods."""
    return mlp(in_dim, cfg.proj_hidden_dim, cfg.proj_out_dim, num_layers=cfg.proj_layers,
               hidden_bn=cfg.proj_hidden_bn, last_bn=cfg.proj_last_bn)


def build_predictor(cfg: MethodConfig) -> nn.Sequential:
    """BYOL/NNCLR's predictor: ``proj_out_dim -> pred_hidden_dim (BN if proj_hidden_bn) -> proj_out_dim``."""
    return mlp(cfg.proj_out_dim, cfg.pred_hidden_dim, cfg.proj_out_dim, num_layers=2, hidden_bn=cfg.proj_hidden_bn)


def check_two_views(views: list[torch.Tensor], method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of a two-view method (``num_views == 2``), or a ValueError: the configuration is checked
    for ``views.num_views`` when it is validated, so other counts here are a caller's mistake."""
    if len(views) != 2:
        raise ValueError(f"{method} uses exactly 2 views, got {len(views)}")
    return views[0], views[1]


def check_no_options(cfg: MethodConfig, method: str, known: tuple[str, ...] = ()) -> None:
    """Refuse ``method.options`` keys the method does not read (typos would otherwise be ignored)."""
    known_options(cfg.options, known, "method.options", method)
