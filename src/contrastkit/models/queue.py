"""A FIFO memory queue of embeddings: MoCo's dictionary of keys, NNCLR's support set.

MoCo: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020,
https://arxiv.org/abs/1911.05722 (Sec. 3.2, "Dictionary as a queue").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit.distributed import gather_no_grad
from contrastkit.errors import ConfigError
from contrastkit.validation import positive_int

__all__ = ["MemoryQueue", "ddp_ignored_buffers"]


class MemoryQueue(nn.Module):
    """First-in first-out queue of L2-normalised embeddings, saved in checkpoints.

    ``push(keys)`` L2-normalises ``keys`` (``n x D``) and writes them over the oldest entries; ``get()`` returns a
    detached copy of the entries written so far. In training, methods do not push directly: they ``stage`` this
    micro-batch's keys, and the training loop ``commit``s everything staged once per optimizer step
    (:meth:`contrastkit.methods.base.SSLMethod.after_optimizer_step`), or ``discard``s it when the step was skipped
    (the fp16 grad scaler found non-finite gradients)::

        negatives = queue.get()            # snapshot: only keys of earlier optimizer steps
        loss = criterion(q, k, negatives)  # this step's keys are never their own negatives
        queue.stage(k)                     # held back until the optimizer step ...
        queue.commit()                     # ... then pushed, in staging order (SSLMethod.after_optimizer_step)

    Why per optimizer step: with gradient accumulation over ``A`` micro-batches, every micro-batch then reads the
    same queue, the one a step over the ``A``-times larger batch would read (as do ``A`` DDP processes with a
    global queue); pushing per micro-batch would make later micro-batches contrast with the keys of earlier ones of
    the same step, a dependence on micro-batch order a large batch does not have. The
    queue also changes only when the teacher that made its keys does (the EMA runs at the same point).

    ``get()`` returns a copy, so a later ``push`` can never change the negatives of a loss that has already been
    computed (the in-place write would otherwise also break its backward pass).

    Semantics:

    - Unfilled entries are never returned: a fresh queue is empty (``len(queue) == 0``) and ``get()`` returns the
      ``min(pushed, size)`` entries written so far. (MoCo instead starts from random unit vectors, which act as
      meaningless negatives until they are overwritten; here the method decides what to do while the queue is
      empty.)
    - Any batch size: a push of ``n`` keys writes at the pointer and wraps around the end of the storage, so
      ``size`` need not be a multiple of ``n``, and a short last batch is just a smaller push. A push of more than
      ``size`` keys keeps the newest ``size``.
    - ``get()`` returns the entries in storage order (cheap); ``get(oldest_first=True)`` in insertion order.
    - Distributed (``gather_distributed=True`` and a process group with ``W > 1``): ``push`` gathers the keys of all
      processes (without gradient, rank order) and enqueues the ``W * n`` keys on every process, so the queue is
      global and identical on all ranks. Every process must call ``push`` with the same ``n``.
    - State: the storage (``keys``, and ``indices``/``labels`` when kept), the write pointer ``ptr`` and the count
      ``filled`` are registered buffers, so they are saved in checkpoints, restored by ``load_state_dict`` and moved
      by ``.to(device)``. The pointer and count are mirrored as Python integers to avoid a device-to-host copy per
      step; ``load_state_dict`` refreshes the mirrors. Staged, uncommitted keys are not state: checkpoints are
      written between optimizer steps, when nothing is staged.
    - DDP: the buffers are per-process state (a global queue is identical on every rank because every rank pushes
      the same gathered keys; with ``gather_distributed=False`` each rank keeps its own). They must not be
      overwritten by DDP's per-forward broadcast of rank 0's buffers (``broadcast_buffers=True``, Lightning's
      default), so the training module lists them in DDP's ignore list (:func:`ddp_ignored_buffers`).

    Args:
        size: Number of entries ``K`` (> 0). MoCo v2: 65536 on ImageNet; see each method for its default.
        dim: Embedding width ``D`` (> 0).
        store_indices: Also keep the dataset index of each entry (``-1`` when not given), e.g. to monitor whether a
            nearest neighbour is the sample itself. Default False.
        store_labels: Also keep a label per entry (``-1`` when not given), for monitoring only (e.g. NNCLR's
            nearest-neighbour accuracy). Default False.
        gather_distributed: Enqueue the keys of all processes under DDP (one global queue). Default True.
        dtype: Storage dtype of the keys. Default float32.
    """

    keys: Tensor
    ptr: Tensor
    filled: Tensor
    indices: Tensor | None
    labels: Tensor | None

    def __init__(
        self,
        size: int,
        dim: int,
        store_indices: bool = False,
        store_labels: bool = False,
        gather_distributed: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.size = positive_int(size, "queue size")
        self.dim = positive_int(dim, "queue dim")
        self.gather_distributed = bool(gather_distributed)
        self.register_buffer("keys", torch.zeros(size, dim, dtype=dtype))  # KxD
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # rows written so far, <= K
        # K each, or None (a None buffer is not saved)
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long) if store_indices else None)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long) if store_labels else None)
        self._ptr = 0  # Python mirrors of ptr and filled
        self._filled = 0
        self._staged: list[tuple[Tensor, Tensor | None, Tensor | None]] = []  # (keys, indices, labels) per stage()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={self._filled}, gather_distributed={self.gather_distributed}"

    def __len__(self) -> int:
        """Number of valid entries (``min(pushed, size)``)."""
        return self._filled

    @property
    def is_full(self) -> bool:
        return self._filled == self.size

    # ------------------------------------------------------------------------------------------------------- read
    def _rows(self, x: Tensor, oldest_first: bool) -> Tensor:
        if oldest_first and self._filled == self.size and self._ptr:
            return torch.cat([x[self._ptr :], x[: self._ptr]])  # oldest entry is at ptr once full
        return x[: self._filled].clone()

    def get(self, oldest_first: bool = False) -> Tensor:
        """Detached copy of the valid entries, ``len(self) x D`` (``0 x D`` when empty).

        Args:
            oldest_first: Return them in insertion order (oldest first) instead of storage order. Default False.
        """
        return self._rows(self.keys.detach(), oldest_first)

    def get_indices(self, oldest_first: bool = False) -> Tensor:
        """The dataset indices of the entries returned by :meth:`get` (``-1`` where none were given)."""
        if self.indices is None:
            raise RuntimeError("this queue keeps no indices; build it with store_indices=True")
        return self._rows(self.indices, oldest_first)

    def get_labels(self, oldest_first: bool = False) -> Tensor:
        """The labels of the entries returned by :meth:`get` (``-1`` where none were given)."""
        if self.labels is None:
            raise RuntimeError("this queue keeps no labels; build it with store_labels=True")
        return self._rows(self.labels, oldest_first)

    # ------------------------------------------------------------------------------------------------------ write
    def _write(self, storage: Tensor, rows: Tensor, start: int) -> None:
        """Write ``rows`` (``m <= size`` of them) at ``start``, wrapping around the end of ``storage``."""
        first = min(rows.shape[0], self.size - start)
        storage[start : start + first] = rows[:first]
        if first < rows.shape[0]:
            storage[: rows.shape[0] - first] = rows[first:]

    @torch.no_grad()
    def push(self, keys: Tensor, indices: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Enqueue ``keys`` (``n x D``, L2-normalised here) over the oldest entries.

        Args:
            keys: New entries, shape ``(n, D)``; detached, normalised in float32 (float64 stays float64) and cast
                to the storage dtype.
            indices: Optional dataset indices, shape ``(n,)``, kept when the queue stores indices.
            labels: Optional labels, shape ``(n,)``, kept when the queue stores labels.
        """
        self._check(keys, indices, labels)
        keys = keys.detach()
        keys = keys if keys.dtype in (torch.float32, torch.float64) else keys.float()
        keys = F.normalize(keys, dim=1).to(self.keys.dtype)  # nxD, normalised in float32 (or float64)
        gather = gather_no_grad if self.gather_distributed else (lambda x: x)
        keys = gather(keys)  # (W*n)xD
        n = keys.shape[0]
        m = min(n, self.size)  # only the newest `size` keys can be kept
        start = (self._ptr + n - m) % self.size
        self._write(self.keys, keys[n - m :], start)
        for storage, extra in ((self.indices, indices), (self.labels, labels)):
            if storage is not None:
                if extra is None:
                    values = torch.full((n,), -1, dtype=torch.long, device=storage.device)
                else:
                    values = gather(extra.detach().to(device=storage.device, dtype=torch.long))  # W*n
                self._write(storage, values[n - m :], start)
        self._ptr = (self._ptr + n) % self.size
        self._filled = min(self._filled + n, self.size)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    def _check(self, keys: Tensor, indices: Tensor | None, labels: Tensor | None) -> None:
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"queue keys must have shape (n, {self.dim}), got {tuple(keys.shape)}")
        for name, extra in (("indices", indices), ("labels", labels)):
            if extra is not None and tuple(extra.shape) != (keys.shape[0],):
                raise ValueError(f"queue {name} must have shape ({keys.shape[0]},), got {tuple(extra.shape)}")

    @torch.no_grad()
    def stage(self, keys: Tensor, indices: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Hold ``keys`` (and optional ``indices``/``labels``, as in :meth:`push`) until :meth:`commit`; checked now,
        invisible to :meth:`get` until committed."""
        self._check(keys, indices, labels)
        self._staged.append((keys.detach(), None if indices is None else indices.detach(),
                             None if labels is None else labels.detach()))

    def commit(self) -> int:
        """Push everything staged since the last commit, in staging order (one :meth:`push` per :meth:`stage`, so
        each is gathered on its own under DDP); return the number of pushes."""
        staged, self._staged = self._staged, []
        for keys, indices, labels in staged:
            self.push(keys, indices, labels)
        return len(staged)

    def discard(self) -> None:
        """Drop the staged keys without pushing them (the optimizer step they belong to was skipped)."""
        self._staged = []

    @property
    def staged(self) -> int:
        """Number of :meth:`stage` calls waiting for :meth:`commit`."""
        return len(self._staged)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "ptr" in state_dict and prefix + "filled" in state_dict:
            ptr, filled = int(self.ptr), int(self.filled)  # one host copy per load, not per step
            if not (0 <= ptr < self.size and 0 <= filled <= self.size):
                raise ConfigError(
                    f"queue state in the checkpoint is inconsistent (ptr={ptr}, filled={filled}, size={self.size}); "
                    "was it saved with a different method.queue_size?"
                )
            self._ptr, self._filled = ptr, filled


def ddp_ignored_buffers(root: nn.Module) -> list[str]:
    """Fully qualified names (relative to ``root``) of the buffers of every :class:`MemoryQueue` inside ``root``:
    the per-process state that DDP must not broadcast from rank 0 (see the class docstring)."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, module in root.named_modules() if isinstance(module, MemoryQueue)
            for name, _ in module.named_buffers(recurse=False)]
