"""Two processes (gloo, CPU, DDP) on half batches must train exactly like one process on the whole batch, for MoCo,
NNCLR, BYOL, Barlow Twins and All4One, and for MoCo, BYOL and SimCLR with the ASCL plug-in: same losses, same
(DDP-averaged) gradients over two optimizer steps, same momentum teacher, and a global queue identical on both ranks and equal to the single-process queue.

BatchNorm: with local statistics, BN makes half batches differ from the whole batch by design, so most cases use
BN-free backbones and heads; what they test is the communication (gathered negatives, global queue, all-reduced
Barlow statistics, MoCo's shuffle/unshuffle). The ``moco-bn`` case keeps BN in the backbone and projector: MoCo's
shuffling BN on 2 processes must equal its single-device emulation with ``bn_splits=2`` (same permutation, drawn
from the same seeded generator), which checks both the DDP shuffle and the emulation.

The first test wraps the method in a hand-built DDP (``broadcast_buffers=False``) to check the methods' own
communication step by step; the second trains MoCo, NNCLR and All4One through Lightning's DDP strategy exactly as
``contrastkit train`` does, which is where the queues must survive DDP's buffer broadcast; MoCo + ASCL is checked
there too (its soft targets read the same queue).

All4One runs with transformer dropout 0: with dropout every process draws its masks from the same generator state,
so 2 processes equal 1 only in distribution (contrastkit.methods.all4one).

One spawn per test runs every case; the workers write their results to ``tmp_path`` and the parent process asserts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from contrastkit.config import load_config
from contrastkit.methods import SSLMethod, build_method
from contrastkit.models import MemoryQueue
from contrastkit.plugins import build_plugins

from distributed_utils import fixed_view_module, run_gloo

WORLD = 2
N = 8  # global batch; N / WORLD per process
IMAGE = (1, 4, 4)
STEPS = 2
LR = 0.2
TIMEOUT_S = 120

NO_BN = ["method.proj_hidden_bn=false", "method.proj_last_bn=false", "method.proj_hidden_dim=12",
         "method.proj_out_dim=6", "method.pred_hidden_dim=10", "method.temperature=0.3"]
CASES: dict[str, list[str]] = {
    # queue_size 12 < 16 keys per step: wrap-around and overwrite within a step
    "moco-shuffle-dcl": NO_BN + ["method.name=moco", "method.loss=dcl", "method.shuffle_bn=shuffle",
                                 "method.queue_size=12"],
    "moco-asym-dclw": NO_BN + ["method.name=moco", "method.loss=dclw", "method.symmetric=false",
                               "method.shuffle_bn=none", "method.queue_size=32"],
    "moco-bn": NO_BN + ["method.name=moco", "method.loss=infonce", "method.shuffle_bn=shuffle",
                        "method.proj_hidden_bn=true", "method.queue_size=32", "method.options={bn_splits: 2}"],
    "nnclr": NO_BN + ["method.name=nnclr", "method.loss=infonce", "method.queue_size=10"],
    "nnclr-dcl": NO_BN + ["method.name=nnclr", "method.loss=dcl", "method.queue_size=64"],
    "byol": NO_BN + ["method.name=byol", "method.momentum_base=0.9"],
    "barlow": NO_BN + ["method.name=barlow", "method.proj_layers=3", "method.barlow_scale=1.0"],
    # global queue (step 0: the own projections, step 1: 3 neighbours among 8), gathered columns, global feature term
    "all4one": NO_BN + ["method.name=all4one", "method.loss=infonce", "method.queue_size=10",
                        "method.momentum_base=0.9", "method.options={neighbours: 3, transformer_heads: 2, "
                        "transformer_dropout: 0.0}"],
    # ASCL plug-in: MoCo (targets from the global queue; step 0: from the gathered keys), BYOL and SimCLR (in-batch
    # targets over the global batch); a high target temperature keeps the targets far from one-hot
    "moco-ascl": NO_BN + ["method.name=moco", "method.loss=infonce", "method.shuffle_bn=shuffle",
                          "method.queue_size=12", "plugins.ascl={neighbours: 2, target_temperature: 0.5}"],
    "byol-ascl": NO_BN + ["method.name=byol", "method.momentum_base=0.9", "plugins.ascl={target_temperature: 0.5}"],
    "simclr-ascl": NO_BN + ["method.name=simclr", "method.loss=infonce",
                            "plugins.ascl={neighbours: 3, target_temperature: 0.5}"],
}
BN_CASES = {"moco-bn"}


def _backbone(bn: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(16, 12)]
    if bn:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.ReLU(), nn.Linear(12, 8)]
    return nn.Sequential(*layers)


def _build(case: str, overrides: list[str] | None = None) -> SSLMethod:
    cfg = load_config(None, CASES[case] + (overrides or []))
    torch.manual_seed(0)
    method = build_method(_backbone(case in BN_CASES), 8, cfg.method)
    method.use_plugins(build_plugins(cfg))
    return method.double()


def _data() -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(STEPS):
        x = torch.randn(N, *IMAGE, generator=g, dtype=torch.float64)
        steps.append([x + 0.3 * torch.randn(N, *IMAGE, generator=g, dtype=torch.float64) for _ in range(2)])
    return steps


class _Loss(nn.Module):
    """DDP hooks ``forward``; this one computes the method's loss."""

    def __init__(self, method: SSLMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: list[Tensor]) -> Tensor:
        return self.method.forward_loss(views, 0.5)["loss"]


def _state(method: SSLMethod) -> dict[str, Tensor]:
    state = {}
    if hasattr(method, "queue"):
        q = method.queue
        state.update({"queue.keys": q.keys.clone(), "queue.ptr": q.ptr.clone(), "queue.filled": q.filled.clone(),
                      "queue.len": torch.tensor(len(q))})
    if hasattr(method, "teacher"):
        state.update({f"teacher.{k}": v.clone() for k, v in method.teacher.named_parameters()})
    return state


def _train(method: SSLMethod, step_views: list[list[Tensor]], ddp: bool) -> dict[str, object]:
    """STEPS optimizer steps; per step the loss and the (DDP-averaged) gradients; the final queue and teacher."""
    module: nn.Module = _Loss(method)
    if ddp:
        module = DistributedDataParallel(module, broadcast_buffers=False)  # each rank keeps its own queue
    opt = torch.optim.SGD([p for g in method.parameter_groups() for p in g.params], lr=LR)
    out: dict[str, object] = {}
    for step, views in enumerate(step_views):
        opt.zero_grad()
        torch.manual_seed(100 + step)  # MoCo's shuffle permutation: the same on rank 0 and in one process
        loss = module(views)
        loss.backward()
        out[f"loss{step}"] = loss.detach()
        out[f"grads{step}"] = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        opt.step()
        method.after_optimizer_step(0.5)
    out["state"] = _state(method)
    return out


def _worker(rank: int, world: int) -> dict[str, object]:
    n = N // world
    local = [[v[rank * n : (rank + 1) * n] for v in views] for views in _data()]
    results = {case: _train(_build(case), local, ddp=True) for case in CASES}
    # control: Barlow with local statistics (gather_distributed=false) must NOT match one process
    results["barlow-local"] = _train(_build("barlow", ["method.gather_distributed=false"]), local, ddp=True)
    return results


def _close(a: Tensor, b: Tensor, msg: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=msg)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path: Path) -> None:
    results = run_gloo(_worker, WORLD, tmp_path, timeout_s=TIMEOUT_S)
    data = _data()
    for case in CASES:
        ref = _train(_build(case), data, ddp=False)  # one process, whole batch
        ranks = [res[case] for res in results]
        for step in range(STEPS):
            losses = torch.stack([r[f"loss{step}"] for r in ranks])
            if case.startswith("barlow"):  # every process computes the global loss
                _close(losses[0], ref[f"loss{step}"], f"{case} step {step}: rank 0 loss")
                _close(losses[1], ref[f"loss{step}"], f"{case} step {step}: rank 1 loss")
            else:  # local means over equal halves
                _close(losses.mean(), ref[f"loss{step}"], f"{case} step {step}: mean loss")
                assert not torch.allclose(losses[0], losses[1])  # the ranks really saw different data
            ref_grads = ref[f"grads{step}"]
            for r in ranks:
                assert r[f"grads{step}"].keys() == ref_grads.keys()
                for name, g in ref_grads.items():
                    _close(r[f"grads{step}"][name], g, f"{case} step {step}: DDP gradient of {name}")
        for name, value in ref["state"].items():
            # the queue (keys, pointer, count) and the teacher are identical on both ranks and equal one process's
            assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{case}: {name} differs by rank"
            _close(ranks[0]["state"][name], value, f"{case}: {name}")
        if "queue.len" in ref["state"]:
            assert int(ref["state"]["queue.len"]) > 0

    # the control: local Barlow statistics give another loss (so the comparisons above can fail)
    local = torch.stack([res["barlow-local"]["loss0"] for res in results]).mean()
    ref = _train(_build("barlow"), data, ddp=False)
    assert not torch.allclose(local, ref["loss0"], rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# The same through Lightning's DDP strategy, as training runs it (contrastkit.training.run.build_trainer)
# ----------------------------------------------------------------------------------------------------------------------
# MoCo, NNCLR, All4One and MoCo + ASCL trained by SSLModule under build_trainer's trainer with train.strategy=ddp on 2
# gloo processes (launched like torchrun, see distributed_utils), with views that are a fixed function of each image
# and BN-free networks in float64 (Lightning's 64-true precision plugin). Global queue: the 2 processes equal one
# process on the whole batch (losses, DDP-averaged gradients, parameters, teacher, queue). gather_distributed=false:
# each rank's queue holds exactly its own keys (before the queues were excluded from DDP's buffer broadcast, rank 0's
# queue overwrote rank 1's before every forward).

L_STEPS = 3
L_CASES = {
    "moco": NO_BN + ["method.name=moco", "method.loss=infonce", "method.shuffle_bn=shuffle", "method.queue_size=12",
                     "method.momentum_base=0.9", "method.momentum_final=0.9"],
    "nnclr": NO_BN + ["method.name=nnclr", "method.loss=infonce", "method.queue_size=10"],
    # the ASCL plug-in's soft targets come from the same queue: global or per rank, as the host's
    "moco-ascl": NO_BN + ["method.name=moco", "method.loss=infonce", "method.shuffle_bn=shuffle",
                          "method.queue_size=12", "method.momentum_base=0.9", "method.momentum_final=0.9",
                          "plugins.ascl={neighbours: 2, target_temperature: 0.5}"],
    "all4one": NO_BN + ["method.name=all4one", "method.loss=infonce", "method.queue_size=10",
                        "method.momentum_base=0.9",
                        "method.options={neighbours: 3, transformer_heads: 2, transformer_dropout: 0.0}"],
}


def _lightning_cfg(case: str, world: int, tmp: Path, extra: list[str] | None = None):
    devices = ["train.devices=2", "train.strategy=ddp"] if world == 2 else ["train.devices=1"]
    return load_config(None, L_CASES[case] + devices + (extra or []) + [
        "train.accelerator=cpu", "optim.name=sgd", "optim.lr=0.2", "optim.lr_scaling=none",
        "optim.warmup_epochs=0", f"optim.batch_size={N // world}", "train.epochs=1", "train.progress_bar=false",
        "train.knn_every_n_epochs=0", "model.widths=[4, 8]", f"train.run_dir={tmp}"])


def _fit(cfg, rank: int, world: int) -> dict[str, object]:
    """Fit through build_trainer; rank ``r`` of ``world`` gets rows ``[r * n, (r + 1) * n)`` of every global batch."""
    import lightning as L
    from lightning.pytorch.plugins import DoublePrecision

    from contrastkit.training.run import build_trainer

    module = fixed_view_module(cfg, N * L_STEPS, L_STEPS)
    pushed: list[Tensor] = []
    push = module.method.queue.push
    module.method.queue.push = lambda keys, *a, **k: (pushed.append(keys.detach().clone()), push(keys, *a, **k))[1]
    n = N // world
    order = torch.randperm(N * L_STEPS, generator=torch.Generator().manual_seed(5))
    batches = [order[s * N: (s + 1) * N][rank * n: (rank + 1) * n] for s in range(L_STEPS)]
    record: dict[str, object] = {"losses": [], "grads": []}

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record["losses"].append(outputs["loss"].detach().clone())

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after DDP's gradient averaging
            record["grads"].append({k: p.grad.clone() for k, p in pl_module.method.named_parameters()
                                    if p.grad is not None})

        def on_train_end(self, trainer, pl_module):
            ddp = trainer.strategy.model  # DDP's wrapper under DDP: the buffers it broadcasts before each forward
            if world > 1:
                record["broadcast_buffers"] = sorted(ddp.named_module_buffers)

    trainer = build_trainer(cfg, [Recorder()], Path(cfg.train.run_dir), checkpoints=False)
    trainer.strategy.precision_plugin = DoublePrecision()  # Lightning's precision=64-true, for exact comparisons
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    method = module.method
    record.update(pushed=pushed, params={k: v.detach().clone() for k, v in method.named_parameters()},
                  queue={k: v.clone() for k, v in method.queue.state_dict().items()},
                  teacher={k: v.clone() for k, v in method.teacher.state_dict().items()} if hasattr(method, "teacher")
                  else {})
    return record


def _lightning_worker(rank: int, world: int, tmp: str) -> dict[str, object]:
    out = {}
    for case in L_CASES:
        out[case] = _fit(_lightning_cfg(case, world, Path(tmp) / f"{case}{rank}"), rank, world)
        local = ["method.gather_distributed=false"]
        out[case + "-local"] = _fit(_lightning_cfg(case, world, Path(tmp) / f"{case}-local{rank}", local), rank, world)
    return out


@pytest.mark.slow
def test_lightning_ddp_queues_two_processes(tmp_path: Path) -> None:
    results = run_gloo(_lightning_worker, WORLD, tmp_path, str(tmp_path), timeout_s=300, launcher="lightning")
    for case in L_CASES:
        ref = _fit(_lightning_cfg(case, 1, tmp_path / f"{case}-ref"), 0, 1)
        ranks = [res[case] for res in results]
        for step in range(L_STEPS):
            _close((ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2, ref["losses"][step],
                   f"{case} step {step}: mean loss")
            for r in ranks:
                assert r["grads"][step].keys() == ref["grads"][step].keys() and ref["grads"][step]
                for k, g in ref["grads"][step].items():
                    _close(r["grads"][step][k], g, f"{case} step {step}: DDP gradient of {k}")
        for r in ranks:
            # DDP's per-forward broadcast leaves the queues alone (the model's other buffers are still broadcast)
            assert not any(".queue." in name for name in r["broadcast_buffers"]), r["broadcast_buffers"]
            for part in ("params", "teacher", "queue"):
                assert r[part].keys() == ref[part].keys()
                for k, v in ref[part].items():
                    _close(r[part][k], v, f"{case}: {part} {k}")
        keys_per_step = N * (2 if case.startswith("moco") else 1)  # MoCo (symmetric) enqueues both views' keys
        assert int(ref["queue"]["filled"]) == min(int(ref["queue"]["keys"].shape[0]), L_STEPS * keys_per_step)
        assert torch.equal(ranks[0]["queue"]["keys"], ranks[1]["queue"]["keys"])

        # per-rank queues: each rank's queue is exactly the FIFO of its own keys, and the two differ
        local = [res[case + "-local"] for res in results]
        size = int(local[0]["queue"]["keys"].shape[0])
        for r in local:
            replay = MemoryQueue(size, r["queue"]["keys"].shape[1], gather_distributed=False).double()
            for keys in r["pushed"]:
                replay.push(keys)
            for k, v in replay.state_dict().items():
                assert torch.equal(r["queue"][k], v), f"{case}: a rank's own queue was overwritten ({k})"
            assert all(keys.shape[0] == N // WORLD for keys in r["pushed"])  # no gathering
        assert not torch.allclose(local[0]["queue"]["keys"], local[1]["queue"]["keys"])
        for k, v in local[0]["params"].items():
            assert torch.equal(v, local[1]["params"][k])  # DDP still keeps the parameters in sync
