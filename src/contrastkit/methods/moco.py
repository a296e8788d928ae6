"""MoCo v2 (Chen et al. 2020, https://arxiv.org/abs/2003.04297; MoCo: He et al., CVPR 2020,
https://arxiv.org/abs/1911.05722): momentum contrast with a queue of keys.

query encoder: backbone -> projector ``q``;  key encoder: EMA copy of backbone -> projector ``k`` (no gradient).
Each query's positive is the key of the other view of its image; its negatives are the keys of earlier steps, held
in a :class:`~contrastkit.models.MemoryQueue` (global under DDP). The queue is read *before* this step's keys are
enqueued (they are staged and pushed after the optimizer step, see the MemoryQueue docstring), so they are never
their own negatives. The loss is InfoNCE (MoCo), DCL or DCLW (``method.loss``; the DCL
paper, https://arxiv.org/abs/2110.06848, applies DCL to MoCo v2), see :class:`~contrastkit.losses.QueueContrastiveLoss`.

- ``method.symmetric=true`` (default): both views serve as queries, ``(L(q1, k2) + L(q2, k1)) / 2``, and the keys of
  both views are enqueued (2B keys per step, view 1's first); ``false``: MoCo v2's asymmetric ``L(q1, k2)``,
  enqueueing ``k2``.
- First step: the queue is empty, so that step uses the other keys of the batch as negatives (MoCo v3's in-batch
  negatives); from the second step on, only the queue.

BatchNorm leakage (MoCo Sec. 3.3: with BN, a query and its key computed on the same batch can "cheat" through the
batch statistics). ``method.shuffle_bn``:

- ``shuffle``: shuffling BN. Under DDP, as the official code: the key encoder's inputs of all processes are
  gathered, shuffled by a permutation drawn on rank 0, each process encodes its shard, and the keys are gathered
  and unshuffled. On a single device, ``G`` processes are emulated, as in MoCo's CIFAR demo with its SplitBatchNorm:
  the batch is split into ``G = method.options.bn_splits`` groups (default 8, as the demo and MoCo's 8-GPU
  ImageNet setup), the query encoder normalises each group with its own statistics (both views of the group
  together, like one process), and the key encoder normalises groups of a random permutation of the batch. This is
  exactly what ``G`` processes with shuffling BN compute (same permutation, same groups), so a run behaves the same
  on one device as on ``G`` (tests/test_methods_distributed.py checks it). The cost is ``G`` smaller forward passes
  per encoder; each updates the BN running statistics once (as ``G`` processes would, each with its own copy).
- ``sync``: the BN layers of both encoders are converted to :class:`torch.nn.SyncBatchNorm` (global statistics over
  all processes, as MoCo v3). On a single device it is plain BN (no protection). PyTorch's SyncBatchNorm needs
  GPUs under DDP.
- ``none``: plain BN, no protection (what solo-learn and lightly amount to on a single GPU).
- ``auto`` (default): ``none`` if the encoders have no BatchNorm, ``sync`` if they already have SyncBatchNorm
  (``train.sync_batchnorm=true``), ``shuffle`` otherwise.

Defaults and their sources (``configs/fmnist_moco.yaml`` scales the projector and queue down for the CPU demo):

- projector: 2 layers without BN (``method.proj_hidden_bn=false``), 2048 -> 128 (MoCo v2); solo-learn's MoCo v2+
  CIFAR: 2048 -> 256.
- temperature 0.2 (MoCo v2, solo-learn CIFAR); queue 65536 (MoCo v2) / 32768 (solo-learn CIFAR).
- key momentum: MoCo v2 uses a fixed 0.999; solo-learn CIFAR a cosine schedule 0.99 -> 0.999
  (``method.momentum_base`` / ``method.momentum_final``; equal values give a fixed momentum).
- optimiser: MoCo v2 SGD lr 0.03 x B/256, wd 1e-4, cosine; solo-learn CIFAR SGD lr 0.3, wd 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from contrastkit import distributed
from contrastkit.config import MethodConfig
from contrastkit.errors import ConfigError
from contrastkit.distributed import gather_no_grad
from contrastkit.losses import build_queue_loss
from contrastkit.methods.base import SSLMethod, build_projector, check_no_options, check_two_views
from contrastkit.models import MemoryQueue

Encoder = Callable[[Tensor], Tensor]


def _group_slices(views: list[Tensor], groups: int) -> list[list[Tensor]]:
    """``groups`` groups of the batch, each holding its slice of every view (what one process would hold)."""
    per_view = [v.tensor_split(groups) for v in views]  # V x G slices
    return [[slices[g] for slices in per_view] for g in range(groups)]


def encode_in_groups(encode: Callable[[list[Tensor]], list[Tensor]], views: list[Tensor], groups: int) -> list[Tensor]:
    """``encode(views)`` run separately on ``groups`` slices of the batch (so BN sees one group at a time)."""
    if groups == 1:
        return encode(views)
    outs = [encode(group) for group in _group_slices(views, groups)]  # G x V
    return [torch.cat([out[v] for out in outs]) for v in range(len(views))]


@torch.no_grad()
def shuffled_forward(encoder: Encoder, views: list[Tensor], groups: int = 1) -> list[Tensor]:
    """Encode ``views`` with BatchNorm statistics of random groups of samples (MoCo's shuffling BN).

    Args:
        encoder: Maps ``m x ...`` inputs to ``m x P`` outputs (the key encoder).
        views: ``V`` tensors of ``n x ...`` inputs (this process's batch).
        groups: Single process only: the number of emulated processes ``G``; ignored under DDP (``G = W``).

    Returns:
        ``V`` tensors ``n x P``, row ``i`` the encoding of ``views[v][i]``: each sample is encoded in a group made
        of a random ``1/G`` of the (global) batch and unshuffled back to its place.
    """
    num_views, n = len(views), views[0].shape[0]
    world = distributed.world_size()
    local = torch.cat(views)  # (V*n)x...
    if world > 1:  # the official DDP algorithm; every process's block in `everything` is its `local`
        rank = distributed.rank()
        everything = gather_no_grad(local)  # (W*V*n)x...
        perm = torch.randperm(everything.shape[0], device=local.device)  # W*V*n
        dist.broadcast(perm, src=0)
        keys = gather_no_grad(encoder(everything[perm].chunk(world)[rank]))  # (W*V*n)xP, shuffled order
        keys = keys[torch.argsort(perm)]  # (W*V*n)xP, gathered order
        keys = keys[rank * num_views * n : (rank + 1) * num_views * n]  # (V*n)xP, this process's rows
    else:  # G emulated processes: group g holds the g-th slice of every view, like process g would
        index = torch.arange(num_views * n, device=local.device).view(num_views, n)  # row of (view, sample)
        parts = index.tensor_split(groups, dim=1)  # G x (V x n_g)
        layout = torch.cat([p.reshape(-1) for p in parts])  # V*n, the rows of `local` in group order
        perm = torch.randperm(num_views * n, device=local.device)  # V*n
        shuffled = local[layout][perm]  # (V*n)x...
        encoded = torch.cat([encoder(x) for x in shuffled.split([p.numel() for p in parts])])  # (V*n)xP
        keys = torch.empty_like(encoded)
        keys[layout[perm]] = encoded  # back to the rows of `local`
    return list(keys.chunk(num_views))  # V x (nxP)


class MoCo(SSLMethod):
    """MoCo v2 with a queue of keys, a symmetric-loss option and shuffling BN; see the module docstring."""

    two_views = True

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> None:
        check_no_options(cfg, "moco", known=("bn_splits",))
        super().__init__(backbone, feature_dim, cfg)
        splits = cfg.options.get("bn_splits", 8)
        if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
            raise ConfigError(f"method.options.bn_splits must be an integer >= 1, got {splits!r}")
        self.bn_splits = splits
        self.projector = build_projector(feature_dim, cfg)
        if cfg.shuffle_bn == "sync":
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)
        self.add_teacher(backbone=self.backbone, projector=self.projector)
        self.queue = MemoryQueue(cfg.queue_size, cfg.proj_out_dim, gather_distributed=cfg.gather_distributed)
        self.criterion = build_queue_loss(
            cfg.contrastive_loss, temperature=cfg.temperature, sigma=cfg.sigma, gather_distributed=cfg.gather_distributed
        )

    def bn_mode(self) -> str:
        """The BatchNorm leakage fix in effect: ``shuffle``, ``sync`` or ``none`` (resolves ``auto``)."""
        mode = self.cfg.shuffle_bn
        if mode == "auto":
            bns = [m for m in self.teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            mode = "none" if not bns else "sync" if any(isinstance(m, nn.SyncBatchNorm) for m in bns) else "shuffle"
        return mode

    def _query(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def _key(self, x: Tensor) -> Tensor:
        return self.teacher.projector(self.teacher.backbone(x))

    def forward_loss(self, views: list[torch.Tensor], progress: float) -> dict[str, torch.Tensor]:
        x1, x2 = check_two_views(views, "moco")
        query_views, key_views = ([x1, x2], [x1, x2]) if self.cfg.symmetric else ([x1], [x2])
        mode = self.bn_mode()
        world = distributed.world_size()
        if mode == "sync" and world > 1 and x1.device.type == "cpu":
            raise ConfigError("method.shuffle_bn=sync needs GPUs under DDP (PyTorch's SyncBatchNorm); use shuffle")
        groups = min(self.bn_splits, x1.shape[0]) if mode == "shuffle" and world == 1 else 1

        query = lambda vs: self.encode_views(vs, self._query, student=True)  # noqa: E731
        q = encode_in_groups(query, query_views, groups)  # BxP each
        with torch.no_grad():
            if mode == "shuffle":
                key_views = encode_in_groups(self.teacher_inputs, key_views, groups)  # per emulated process
                k = shuffled_forward(self._key, key_views, groups)  # BxP each
            else:
                k = self.encode_views(key_views, self._key)  # BxP each

        bank = self.queue.get()  # MxP snapshot, earlier steps only
        negatives = bank if bank.shape[0] > 0 else None  # first step: the batch's other keys
        if self.cfg.symmetric:
            loss = (self.criterion(q[0], k[1], negatives) + self.criterion(q[1], k[0], negatives)) / 2
        else:
            loss = self.criterion(q[0], k[0], negatives)
        for keys in k:
            self.queue.stage(keys)  # enqueued at the optimizer step
        return {"loss": loss}

