"""Run a function in W gloo CPU processes (the harness of the multi-process tests).

``run_gloo(fn, world, out_dir, *args)`` spawns ``world`` processes; each sets up a gloo process group on a free
local port, calls ``fn(rank, world, *args)`` with one torch thread, and saves the dict it returns to
``out_dir/rank{r}.pt``. The parent waits at most ``timeout_s`` (a worker's exception is re-raised, a hang fails the
test) and returns the W dicts in rank order. ``fn`` must be a module-level function (it is pickled by name).

``launcher="lightning"``: the workers are started like ``torchrun`` starts them (the ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ... variables of torch elastic) and no process group is created: ``fn`` runs a
Lightning trainer with ``strategy="ddp"``, whose DDP strategy creates the gloo group and wraps the module itself, the
path multi-process training takes (Lightning does not launch processes when they were launched externally).

:func:`fixed_view_module` builds the training module of these tests: contrastkit's ``SSLModule`` with views that
are a fixed function of each image and a BatchNorm-free network, so that runs can be compared exactly.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

IMAGE_SIDE = 8  # images of fixed_view_module: 1 x 8 x 8 uint8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., dict], out_dir: str, args: tuple,
            launcher: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if launcher == "lightning":  # torch elastic's variables, as torchrun sets them; Lightning makes the group
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), TORCHELASTIC_RUN_ID="contrastkit-tests")
        from lightning.pytorch.utilities import rank_zero_only

        rank_zero_only.rank = rank  # read from RANK when Lightning is imported: torchrun sets it before, spawn after
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.save(fn(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn: Callable[..., dict[str, Any]], world: int, out_dir: Path, *args: Any,
             timeout_s: float = 120, launcher: str = "plain") -> list[dict[str, Any]]:
    context = mp.spawn(_worker, args=(world, free_port(), fn, str(out_dir), args, launcher), nprocs=world,
                       join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def fixed_view_module(cfg: Any, num_images: int, steps_per_epoch: int) -> Any:
    """``SSLModule`` for ``cfg`` on ``num_images`` random 1 x 8 x 8 images, whose two views are fixed functions of the
    image (no random augmentation) and whose method wraps a BN-free 2-layer backbone (64 -> 12 -> 8);
    ``steps_per_epoch`` optimizer steps per epoch (the length of the learning-rate schedule)."""
    from contrastkit.methods import build_method
    from contrastkit.training.module import SSLModule

    class FixedViews(SSLModule):
        def make_views(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
            x = images.to(self.dtype) / 255  # B x 1 x 8 x 8
            return [x, 0.6 * x.flip(-1) + 0.2]

    module = FixedViews(cfg.to_dict(), 1, IMAGE_SIDE, [0.0], [1.0], steps_per_epoch=steps_per_epoch)
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(IMAGE_SIDE**2, 12), nn.ReLU(), nn.Linear(12, 8)]
    module.method = build_method(nn.Sequential(*layers), 8, cfg.method)
    g = torch.Generator().manual_seed(3)
    module.attach_images(torch.randint(0, 256, (num_images, 1, IMAGE_SIDE, IMAGE_SIDE), generator=g, dtype=torch.uint8))
    return module
