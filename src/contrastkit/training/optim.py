"""Optimisers, parameter groups and the warm-up + cosine schedule.

- Parameter groups: every method's named groups (:class:`~contrastkit.methods.base.ParamGroup`) are split into a
  weight-decay part (weights of convs and linears) and a no-decay part (BatchNorm parameters and biases: every
  parameter with ``ndim <= 1``), as in SimCLR/BYOL/solo-learn. LARS also skips its trust ratio on the no-decay part.
  A group's peak lr is ``lr_factor`` x the run's (batch-scaled) peak lr, or its own fixed ``lr`` when it sets one
  (All4One's transformer, as solo-learn's fixed-lr groups); the schedule multiplies every group's peak lr.
- ``lars``: LARS (You et al. 2017, https://arxiv.org/abs/1708.03888) as used by SimCLR/BYOL/solo-learn. Written
  here because neither PyTorch nor torchvision ship one; it is a thin wrapper of the SGD update.
- Schedule: linear warm-up over ``warmup_epochs`` from ``warmup_start_factor * lr`` to ``lr``, then cosine decay to
  ``min_lr_factor * lr``, stepped per optimizer step (``torch.optim.lr_scheduler.LambdaLR``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from contrastkit.config import OptimConfig
from contrastkit.methods.base import ParamGroup


class LARS(torch.optim.Optimizer):
    """SGD with momentum, weight decay and layer-wise adaptive rate scaling.

    For a parameter ``w`` with gradient ``g`` in a group with ``lars_adapt=True`` (solo-learn's rule,
    ``solo/utils/lars.py``, itself from Lightning Bolts):

    - if ``||w|| > 0`` and ``||g|| > 0``: ``trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)``; with ``clip_lr``
      (solo-learn's CIFAR recipes) ``trust <- min(trust / lr, 1)``, so the adapted rate never exceeds ``lr``
      (at ``lr = 0`` this is its limit, 1); then ``d = trust * (g + wd * w)``;
    - otherwise (a zero weight or a zero gradient) ``d = g``: neither weight decay nor adaptation;
    - ``v <- m * v + d`` (``v = d`` at the first step); ``w <- w - lr * v``.

    Groups with ``lars_adapt=False`` (biases, BN) do plain SGD with momentum (``d = g + wd * w``).

    Args:
        params: parameters or groups.
        lr: learning rate. momentum: default 0.9. weight_decay: default 0. eta: trust coefficient, default 0.02
            (solo-learn's CIFAR recipes; SimCLR uses 0.001). clip_lr: default True. eps: added to the trust ratio's
            denominator, default 1e-8 (solo-learn, timm).
    """

    def __init__(
        self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
        clip_lr: bool = True, eps: float = 1e-8,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adapt=True,
                        clip_lr=clip_lr, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars_adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(d)
                    trust = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    if group["clip_lr"]:
                        trust = torch.ones_like(trust) if group["lr"] == 0 else torch.clamp(trust / group["lr"], max=1.0)
                    # tensors, not Python branches: no device-to-host copy per parameter
                    d = torch.where((w_norm > 0) & (g_norm > 0), d.add(p, alpha=wd) * trust, d)
                elif wd != 0:
                    d = d.add(p, alpha=wd)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def split_decay(groups: list[ParamGroup], lr: float, weight_decay: float) -> list[dict]:
    """Turn named groups into optimizer groups: (decay, no-decay) per named group; empty groups dropped."""
    out: list[dict] = []
    seen: set[int] = set()
    for g in groups:
        decay = [p for p in g.params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in g.params if p.requires_grad and p.ndim <= 1]
        for p in decay + no_decay:
            if id(p) in seen:
                raise ValueError(f"parameter appears in two groups (second: {g.name})")
            seen.add(id(p))
        group_lr = g.lr if g.lr is not None else lr * g.lr_factor  # a fixed lr is neither scaled nor factored
        if decay:
            out.append(dict(name=f"{g.name}", params=decay, lr=group_lr, weight_decay=weight_decay,
                            lars_adapt=True))
        if no_decay:
            out.append(dict(name=f"{g.name}_no_decay", params=no_decay, lr=group_lr, weight_decay=0.0,
                            lars_adapt=False))
    return out


def build_optimizer(groups: list[ParamGroup], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over ``groups`` at peak learning rate ``lr``."""
    param_groups = split_decay(groups, lr, cfg.weight_decay)
    if cfg.name == "sgd":
        for g in param_groups:
            g.pop("lars_adapt")
        return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "lars":
        return LARS(param_groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    for g in param_groups:
        g.pop("lars_adapt")
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(cfg.betas))  # type: ignore[arg-type]


def warmup_cosine(total_steps: int, warmup_steps: int, start_factor: float = 0.0, min_factor: float = 0.0
                  ) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based): linear warm-up then cosine decay."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_factor + (1.0 - start_factor) * step / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        t = min(1.0, t)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor
