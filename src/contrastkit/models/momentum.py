"""Momentum (exponential moving average) teachers and their momentum schedules.

A momentum teacher is a copy of some student modules whose weights follow the student's as an exponential moving
average: MoCo's key encoder (He et al., CVPR 2020, https://arxiv.org/abs/1911.05722, Eq. 2) and BYOL's target
network (Grill et al., NeurIPS 2020, https://arxiv.org/abs/2006.07733, Sec. 3.1).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from contrastkit.errors import ConfigError
from contrastkit.validation import number_in

__all__ = ["MomentumTeacher", "cosine_momentum", "fixed_momentum"]


def cosine_momentum(base: float, final: float, progress: float) -> float:
    """BYOL's cosine momentum schedule, rising from ``base`` to ``final`` over training.

    ``tau(p) = final - (final - base) * (cos(pi * p) + 1) / 2`` for training progress ``p`` in ``[0, 1]`` (clamped);
    with ``final = 1`` this is BYOL's ``1 - (1 - base) * (cos(pi * k / K) + 1) / 2`` (k the step, K the total).
    ``tau(0) = base``, ``tau(1/2) = (base + final) / 2``, ``tau(1) = final``; ``base == final`` is a fixed momentum.

    Args:
        base: Momentum at the start, in [0, 1]. BYOL: 0.996 (ImageNet), solo-learn CIFAR: 0.99.
        final: Momentum at the end, in [0, 1]. BYOL: 1.0; solo-learn's MoCo v2+ CIFAR: 0.999.
        progress: Fraction of training done.
    """
    base, final = number_in(base, "momentum base", 0.0, 1.0), number_in(final, "momentum final", 0.0, 1.0)
    p = min(1.0, max(0.0, float(progress)))
    return final - (final - base) * (math.cos(math.pi * p) + 1.0) / 2.0


def fixed_momentum(base: float, progress: float = 0.0) -> float:
    """A constant momentum ``base`` (MoCo v1/v2: 0.999), whatever the progress."""
    return number_in(base, "momentum", 0.0, 1.0)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _inputs_to_parameter_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the teacher's modules: cast half-precision floating inputs to the parameters' dtype."""
    dtype = next((p.dtype for p in module.parameters()), None)
    if dtype is None:
        return args
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.dtype in _LOW_PRECISION else a for a in args)


class MomentumTeacher(nn.Module):
    """An exponential-moving-average copy of a set of student modules.

    ``MomentumTeacher({"backbone": backbone, "projector": projector})`` deep-copies the students (the copies are
    submodules ``teacher.backbone``, ``teacher.projector``, saved in checkpoints) and freezes the copies
    (``requires_grad=False``, so they never appear in an optimizer). ``update(m)`` then does, for every parameter::

        theta_teacher <- m * theta_teacher + (1 - m) * theta_student

    with ``torch._foreach_lerp_`` (one fused kernel per dtype/device group). Call it once per optimizer step, after
    the step (SSLMethod.after_optimizer_step), so that gradient accumulation does not change the schedule.

    Precision: the teacher's parameters and buffers are kept in at least float32, whatever the rest of the model is
    converted to (``module.to(torch.bfloat16)``, as Lightning's ``precision=bf16-true`` does). In bfloat16 (8
    significant bits) an EMA increment ``(1 - m) * (student - teacher)`` with ``m = 0.99 .. 0.999`` is almost always
    below half a unit in the last place of the teacher's weight, so the update rounds to nothing and the teacher
    never moves. Lower-precision inputs to the teacher's modules are cast to its dtype by a forward pre-hook (so
    its forward pass runs in float32 too; its outputs stay float32).

    Buffers (BatchNorm running statistics): MoCo and BYOL momentum-update only the parameters; the teacher runs in
    training mode (it normalises with batch statistics) and its running statistics are whatever its own forward
    passes accumulate, used only if the teacher is ever evaluated in eval mode. Here, after its parameters, the
    teacher's floating-point buffers are moved by the same EMA towards the student's (``buffers="ema"``, as timm's
    ``ModelEmaV2``), so that the running statistics stay consistent with the averaged weights however the teacher
    is run; integer buffers (``num_batches_tracked``) are copied. ``buffers="copy"`` copies every buffer from the
    student instead. Either choice leaves the training signal of MoCo/BYOL unchanged (in training mode BN does not
    read its running statistics).

    Args:
        students: Name -> student module; the modules are referenced (not owned) for the updates, so keep them
            registered elsewhere (e.g. as the method's ``backbone`` and ``projector``).
        buffers: ``"ema"`` (default) or ``"copy"``, see above.
    """

    def __init__(self, students: Mapping[str, nn.Module], buffers: str = "ema") -> None:
        super().__init__()
        if not students:
            raise ConfigError("MomentumTeacher needs at least one student module")
        if buffers not in ("ema", "copy"):
            raise ConfigError(f"buffers must be 'ema' or 'copy', got {buffers!r}")
        self.buffer_mode = buffers
        self._students = dict(students)  # plain dict: not registered, so not saved twice nor optimised
        for name, student in self._students.items():
            teacher = copy.deepcopy(student)
            teacher.requires_grad_(False)
            teacher.register_forward_pre_hook(_inputs_to_parameter_dtype)
            self.add_module(name, teacher)
        self._keep_float32()  # a student already in half precision gives a float32 teacher too

    def _keep_float32(self) -> None:
        for t in [*self.parameters(), *self.buffers()]:
            if t.dtype in _LOW_PRECISION:
                t.data = t.data.float()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``nn.Module._apply`` (behind ``.to``, ``.half()``, ...), then half-precision tensors back to float32."""
        super()._apply(fn, recurse)
        self._keep_float32()
        return self

    def _pairs(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Matching (teacher, student) parameter and buffer lists, checked for the same structure."""
        tp, sp, tb, sb = [], [], [], []
        for name, student in self._students.items():
            teacher = getattr(self, name)
            t_params, s_params = list(teacher.parameters()), list(student.parameters())
            t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
            if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
                raise RuntimeError(f"the teacher's {name!r} no longer has the structure of its student")
            tp += t_params
            sp += s_params
            tb += t_bufs
            sb += s_bufs
        return tp, sp, tb, sb

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One EMA step: ``teacher <- momentum * teacher + (1 - momentum) * student`` (see the class docstring)."""
        m = number_in(momentum, "momentum", 0.0, 1.0)
        t_params, s_params, t_bufs, s_bufs = self._pairs()
        s_params = [s.to(t.dtype) for t, s in zip(t_params, s_params)]  # a bf16 student into the float32 teacher
        s_bufs = [s.to(t.dtype) for t, s in zip(t_bufs, s_bufs)]
        if m < 1.0:
            torch._foreach_lerp_(t_params, s_params, 1.0 - m)
        float_t = [t for t, s in zip(t_bufs, s_bufs) if t.is_floating_point() and self.buffer_mode == "ema"]
        float_s = [s for t, s in zip(t_bufs, s_bufs) if t.is_floating_point() and self.buffer_mode == "ema"]
        if float_t and m < 1.0:
            torch._foreach_lerp_(float_t, float_s, 1.0 - m)
        rest = [(t, s) for t, s in zip(t_bufs, s_bufs) if not (t.is_floating_point() and self.buffer_mode == "ema")]
        if rest:
            torch._foreach_copy_([t for t, _ in rest], [s for _, s in rest])
