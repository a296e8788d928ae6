"""Argument validation for every part of contrastkit: losses, queues, momentum schedules, evaluation protocols.

Each check takes ``(value, name, ...)``, returns the value converted (``int``, ``float``, ...) and raises
:class:`~contrastkit.errors.ConfigError` (a bad option) or :class:`~contrastkit.errors.DataError` (bad features,
labels or images) with a one-line message that says what is wrong and how to fix it. The run configuration's own
keys are checked by :meth:`contrastkit.config.Config.validate`, which names the key.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

from typing import TYPE_CHECKING

from contrastkit.errors import ConfigError, ContrastkitError, DataError

if TYPE_CHECKING:  # torch is imported where a tensor is checked: reading a configuration must not load it
    import torch
    from torch import Tensor


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (Python or NumPy scalar), excluding ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def resolve_device(device: torch.device | str | None, default: torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, or ``default`` when it is ``None``."""
    import torch

    if device is None:
        return default
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a valid torch device; use e.g. 'cpu' or 'cuda:0'") from exc
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def positive_int(value: object, name: str) -> int:
    """``value`` as an ``int`` >= 1 (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_float(value: object, name: str, hint: str = "") -> float:
    """``value`` as a finite ``float`` > 0 (``bool`` is rejected); ``hint`` (how to fix it) ends the message."""
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}" + (f"; {hint}" if hint else ""))
    return float(value)


def number_in(value: object, name: str, low: float, high: float) -> float:
    """``value`` as a finite ``float`` in the closed interval ``[low, high]`` (``bool``, NaN and inf are rejected;
    ``high = math.inf`` means no upper bound)."""
    if not is_real(value) or not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def number_pair(value: object, name: str, low: float, high: float, *, open_low: bool = False
                ) -> tuple[float, float]:
    """``value`` as a finite ``(min, max)`` pair with ``low <= min <= max <= high`` (``low < min`` with
    ``open_low``)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(is_real(v) and math.isfinite(v) for v in value)
    if ok:
        lo, hi = float(value[0]), float(value[1])  # type: ignore[index]
        ok = (low < lo if open_low else low <= lo) and lo <= hi <= high
    if not ok:
        rule = f"{low:g} {'<' if open_low else '<='} min <= max" + ("" if math.isinf(high) else f" <= {high:g}")
        raise ConfigError(f"{name} must be a (min, max) pair with {rule}, got {value!r}")
    return lo, hi


def check_value(ok: bool, key: str, value: object, expected: str) -> None:
    """Raise a one-line ConfigError naming ``key``, ``value`` and what was ``expected`` unless ``ok``; every
    configuration section and plug-in option validates through it."""
    if not ok:
        raise ConfigError(f"invalid value {value!r} for {key}: expected {expected}")


def known_options(given: Iterable[str], valid: Iterable[str], prefix: str, owner: str = "",
                  error: type[ContrastkitError] = ConfigError) -> None:
    """Refuse option names not in ``valid`` (a typo would otherwise be ignored): one line naming the first unknown
    option as ``prefix.<name>`` (of ``owner``) and the valid ones; ``error`` is DataError for dataset options.
    Every option mapping (method, loss, dataset and plug-in options) is checked here."""
    valid = list(valid)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        of = f" of {owner}" if owner else ""
        raise error(f"unknown option {prefix}.{unknown[0]}{of}; valid options: {', '.join(valid) or 'none'}")


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is a ``bool``, else a ConfigError naming ``name``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def float_grid(value: float | Sequence[float], name: str, allow_zero: bool) -> tuple[float, ...]:
    """A scalar or a non-empty sequence of finite floats (> 0, or >= 0 with ``allow_zero``) as a tuple."""
    values = [value] if is_real(value) else value
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ConfigError(f"{name} must be a number or a non-empty sequence of numbers, got {value!r}")
    out = []
    for v in values:
        ok = is_real(v) and math.isfinite(v)
        if not ok or v < 0 or (v == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"every {name} value must be a finite number {bound}, got {v!r} in {value!r}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ConfigError(f"{name} contains duplicate values: {value!r}; list each value once")
    return tuple(out)


def num_classes_arg(num_classes: object) -> int:
    """``num_classes`` as an ``int`` >= 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def features_arg(x: object, name: str, dim: int | None = None) -> Tensor:
    """Check an N x D floating-point feature tensor with N, D >= 1, finite values and (optionally) D == ``dim``."""
    import torch
    from torch import Tensor

    if not isinstance(x, Tensor):
        raise DataError(f"{name} must be a torch.Tensor of shape N x D, got {type(x).__name__}")
    if x.dim() != 2:
        raise DataError(f"{name} must be 2-D (N x D), got shape {tuple(x.shape)}; flatten the features first")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (0 samples); pass at least one feature vector")
    if x.shape[1] == 0:
        raise DataError(f"{name} has 0 feature dimensions; pass N x D features with D >= 1")
    if not x.is_floating_point():
        raise DataError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with .float()")
    if dim is not None and x.shape[1] != dim:
        raise DataError(
            f"{name} has dimension {x.shape[1]} but the training features have {dim}; "
            "extract both with the same model"
        )
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name} contains NaN or Inf values; check the model that produced them (diverged training?)")
    return x


def labels_arg(y: object, name: str, n: int, num_classes: int, features_name: str) -> Tensor:
    """Check a 1-D integer label tensor of length ``n`` with values in [0, num_classes)."""
    import torch
    from torch import Tensor

    if y is None:
        raise DataError(f"{name} is missing; pass one integer class label per feature vector")
    if not isinstance(y, Tensor):
        raise DataError(f"{name} must be a 1-D integer torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1:
        raise DataError(f"{name} must be 1-D (one label per sample), got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise DataError(f"{name} must have an integer dtype, got {y.dtype}; convert with .long()")
    if y.shape[0] != n:
        raise DataError(f"{name} has {y.shape[0]} labels but {features_name} has {n} rows; pass one label per row")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{name} must lie in [0, num_classes={num_classes}), got values in [{lo}, {hi}]; "
            "drop unlabelled samples (label -1) or raise num_classes"
        )
    return y
