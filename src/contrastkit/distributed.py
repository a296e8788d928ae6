"""The collectives of contrastkit, in one place: process rank and count, gathers with and without gradient, a
differentiable sum. Losses (:mod:`contrastkit.losses`), the memory queue (:mod:`contrastkit.models.queue`) and the
methods (MoCo's shuffling BN) all use these; none calls ``torch.distributed`` collectives on its own except
MoCo's one ``broadcast`` of its shuffle permutation.

Contrastive losses get better with more negatives, so under data parallelism each process usually compares its own
embeddings against the embeddings of *all* processes. :func:`gather` does this with gradients: the gathered tensor is
built with :func:`torch.distributed.nn.functional.all_gather`, the autograd-aware collective maintained in PyTorch,
whose backward pass sums, over all processes, the gradients that reach each slice and hands every process the sum for
its own slice (a reduce-scatter). No hand-rolled ``autograd.Function`` is needed.

Why the gradients come out right: let process ``r`` hold the local loss ``L_r`` (a mean over its own anchors) computed
from its local embeddings ``x_r`` and the gathered embeddings of everyone. After ``L_r.backward()`` on all processes,
the gradient on ``x_r`` is ``d(sum_s L_s) / d x_r``: the direct path through ``L_r`` plus, via the collective, the
paths through every other process's loss. With equal local batch sizes ``sum_s L_s = W * L`` where ``L`` is the loss of
the whole global batch and ``W`` the world size, so the gradient is ``W * dL/dx_r``; DDP then averages parameter
gradients over the ``W`` processes, which divides by ``W`` again: training is exactly that of one process seeing the
whole batch.

Assumption: **every process has the same local batch size.** ``all_gather`` requires equal shapes (mismatched shapes
raise an error or hang, depending on the backend), and :func:`rank_offset` relies on it. Checking it would cost an
extra collective per step, so it is not checked; contrastkit's training loader
(:func:`contrastkit.training.module.index_loader`, with Lightning's own sampler disabled) builds its own
:class:`torch.utils.data.DistributedSampler`, which gives every process the same number of samples, and
``drop_last=True`` on the loader additionally makes every batch full. If you filter samples inside a step, keep the count equal on all processes.

Every collective here must be called by all processes, in the same order; this includes the backward pass of a
gathered tensor, so call ``loss.backward()`` on every process.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "gather", "gather_no_grad", "gather_objects", "is_distributed", "rank", "rank_offset",
           "world_size"]


def is_distributed() -> bool:
    """True when :mod:`torch.distributed` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is unavailable or not initialised."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group; 0 when torch.distributed is unavailable or not initialised."""
    return dist.get_rank() if is_distributed() else 0


def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all processes along dim 0, keeping gradients.

    Args:
        x: Local tensor of shape ``(n, ...)``; the same shape on every process.

    Returns:
        Tensor of shape ``(world_size * n, ...)`` whose rows ``[r * n, (r + 1) * n)`` come from rank ``r``; the rows
        of this process are ``rank_offset(n) : rank_offset(n) + n``. Gradients that reach any slice flow back to the
        process that owns it (summed over processes). With a world size of 1 ``x`` itself is returned, unchanged.
    """
    if world_size() == 1:
        return x
    # Imported lazily: torch.distributed.nn is only importable where torch.distributed is available.
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)  # (W*n)x...


def rank_offset(local_batch: int) -> int:
    """Index of this process's first row in a tensor returned by :func:`gather`: ``rank() * local_batch``.

    Assumes every process has the same local batch size (see the module docstring).
    """
    return rank() * local_batch


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (``n x ...``, the same shape on every process) from all processes along dim 0, without
    gradient (queue keys, MoCo's shuffled inputs): rows ``[r * n, (r + 1) * n)`` come from rank ``r``. ``x`` itself
    when not distributed."""
    world = world_size()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)  # (W*n)x...


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all processes, differentiable; ``x`` itself when not distributed.

    Uses :func:`torch.distributed.nn.functional.all_reduce`, whose backward pass all-reduces the incoming gradient.
    A raw ``torch.distributed.all_reduce`` is invisible to autograd: each process then back-propagates only through
    its own summand, and after DDP's averaging the gradient is ``1 / world_size`` of the correct one (the bug of
    several public Barlow Twins implementations). With this one, every process computes the same global loss ``L``
    and receives ``W * dL/dx_r`` for its slice, which DDP's averaging turns into exactly ``dL/dx_r``.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # PyTorch marks it deprecated in favour of a functional collective
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x)


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects, e.g. generator states); ``[obj]`` when not
    distributed. A collective: every process must call it."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
