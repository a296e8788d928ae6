"""Two-process (gloo, CPU) test of ``gather_distributed=True``: W processes on W equal slices of a batch must train
exactly like one process on the whole batch.

One spawn checks all three losses; the workers write their results to ``tmp_path`` and the parent asserts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from contrastkit import distributed
from contrastkit.losses import build_loss

from distributed_utils import run_gloo

WORLD = 2
N_LOCAL = 4  # pairs per process
D_IN, D_OUT = 6, 5
TEMPERATURE = 0.2
KINDS = ["infonce", "dcl", "dclw"]
TIMEOUT_S = 120


def _make_data() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1234)
    n = WORLD * N_LOCAL
    z1 = torch.randn(n, D_OUT, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    return {
        "z1": z1,
        "z2": z1 + torch.randn(n, D_OUT, generator=g, dtype=torch.float64),
        "x1": x1,
        "x2": x1 + 0.5 * torch.randn(n, D_IN, generator=g, dtype=torch.float64),
        "weight": torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64),
        "bias": torch.randn(D_OUT, generator=g, dtype=torch.float64),
    }


def _linear(data: dict[str, Tensor]) -> nn.Linear:
    model = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(data["weight"])
        model.bias.copy_(data["bias"])
    return model


def _loss_and_grads(kind: str, gather: bool, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)
    loss = build_loss(kind, temperature=TEMPERATURE, gather_distributed=gather)(z1, z2)
    loss.backward()
    return {"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}


def _ddp_step_grads(kind: str, model: nn.Module, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
    z = model(torch.cat([x1, x2]))  # 2nxD_OUT, one forward for both views
    z1, z2 = z.chunk(2)
    build_loss(kind, temperature=TEMPERATURE, gather_distributed=True)(z1, z2).backward()
    params = model.module if isinstance(model, DistributedDataParallel) else model
    return {name: p.grad.detach().clone() for name, p in params.named_parameters()}


def _worker(rank: int, world: int, data: dict[str, Tensor]) -> dict[str, object]:
    local = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results: dict[str, object] = {
        "world_size": distributed.world_size(),
        "rank": distributed.rank(),
        "offset": distributed.rank_offset(N_LOCAL),
        "gathered": distributed.gather(data["z1"][local]),
    }
    for kind in KINDS:
        for gather in (True, False):
            results[f"{kind}/gather={gather}"] = _loss_and_grads(kind, gather, data["z1"][local], data["z2"][local])
        ddp = DistributedDataParallel(_linear(data))
        results[f"{kind}/ddp"] = _ddp_step_grads(kind, ddp, data["x1"][local], data["x2"][local])
    return results


@pytest.mark.slow
def test_gather_distributed_matches_single_process(tmp_path: Path) -> None:
    data = _make_data()
    results = run_gloo(_worker, WORLD, tmp_path, data, timeout_s=TIMEOUT_S)

    for r, res in enumerate(results):
        assert (res["world_size"], res["rank"], res["offset"]) == (WORLD, r, r * N_LOCAL)
        torch.testing.assert_close(res["gathered"], data["z1"])

    for kind in KINDS:
        ref = _loss_and_grads(kind, False, data["z1"], data["z2"])  # one process, whole batch
        local = [res[f"{kind}/gather=True"] for res in results]

        # (a) the mean over ranks of the local losses is the single-process loss
        mean_loss = torch.stack([x["loss"] for x in local]).mean()
        torch.testing.assert_close(mean_loss, ref["loss"], msg=f"{kind}: loss")
        assert not torch.allclose(local[0]["loss"], local[1]["loss"])  # the ranks really saw different data

        # (b) local gradients / world size (DDP's averaging) are the slices of the single-process gradient
        for key in ("g1", "g2"):
            grad = torch.cat([x[key] for x in local]) / WORLD
            torch.testing.assert_close(grad, ref[key], msg=f"{kind}: {key}")

        # Control: without gathering, each rank only sees its own negatives and the result differs.
        ungathered = torch.stack([res[f"{kind}/gather=False"]["loss"] for res in results]).mean()
        assert not torch.allclose(ungathered, ref["loss"], rtol=1e-3)

        # (c) DDP end to end: the averaged parameter gradients equal one step on the whole batch
        ref_grads = _ddp_step_grads(kind, _linear(data), data["x1"], data["x2"])
        for res in results:
            ddp_grads = res[f"{kind}/ddp"]
            assert ddp_grads.keys() == ref_grads.keys()
            for name in ref_grads:
                torch.testing.assert_close(ddp_grads[name], ref_grads[name], msg=f"{kind}: DDP grad of {name}")
