"""Batch curation (contrastkit.plugins.curation): the criteria against brute-force / scipy references, the pool
sampler, BatchNorm statistics, the identity settings, resume, composition with every host and ASCL, options.

The references are written separately from the implementation: plain Python loops over pairs for the pair
criterion, NumPy with ``scipy.linalg.sqrtm`` (a general Schur-based matrix square root) for the Frechet distance.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from contrastkit.cli import main
from contrastkit.config import load_config
from contrastkit.plugins import PLUGINS, StepContext
from contrastkit.plugins.curation import (
    curation_strength,
    frechet_distance,
    pair_scores,
    select_frd,
    select_pairs,
    sqrtm_psd,
    trace_sqrt_product,
)
from contrastkit.plugins.registry import host_rows
from contrastkit.training.module import PoolBatchSampler, SSLModule, index_loader

sys.path.insert(0, str(Path(__file__).parent))
from plugin_reference import (  # noqa: E402
    HOSTS, assert_config_refused, assert_resume_exact, bench_records, per_step_losses)
from test_training_distributed import OVERRIDES  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread):
    yield


def _unit_pairs(seed: int, m: int, p: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = F.normalize(torch.randn(m, p, generator=g, dtype=dtype), dim=1)
    z2 = F.normalize(z1 + 0.8 * torch.randn(m, p, generator=g, dtype=dtype), dim=1)
    return z1, z2


# --------------------------------------------------------------------------------------- pair criterion reference
def brute_force_pairs(z1: np.ndarray, z2: np.ndarray, keep: int, q: float, drop_fn: bool) -> list[int]:
    """The pair criterion with loops: drop the floor(q M) lowest agreements (ties by position), optionally the
    pairs whose hardest negative beats the positive, keep the survivors with the largest margin, fill with the
    dropped ones with the largest margin; return the kept positions in pool order."""
    m = len(z1)
    s = [float(z1[i] @ z2[i]) for i in range(m)]
    hard = []
    for i in range(m):
        others = [float(z1[i] @ z1[j]) for j in range(m) if j != i] + [float(z1[i] @ z2[j]) for j in range(m) if j != i]
        hard.append(max(others) if others else -math.inf)
    by_s = sorted(range(m), key=lambda i: (s[i], i))
    dropped = set(by_s[: int(math.floor(q * m))])
    if drop_fn:
        dropped |= {i for i in range(m) if hard[i] > s[i]}
    ranked = sorted(range(m), key=lambda i: (i in dropped, -(s[i] - hard[i]), i))
    return sorted(ranked[:keep])


@pytest.mark.parametrize("m,keep,q,drop_fn", [(12, 6, 0.25, False), (12, 6, 0.25, True), (9, 3, 0.5, False),
                                              (10, 10, 0.3, True), (8, 6, 0.0, False), (16, 4, 0.9, True)])
def test_pair_selection_matches_the_brute_force_reference(m, keep, q, drop_fn):
    for seed in range(3):
        z1, z2 = _unit_pairs(seed, m, 5)
        s, hard = pair_scores(z1, z2)
        kept, dropped = select_pairs(s, hard, keep, q, drop_fn)
        assert kept.tolist() == brute_force_pairs(z1.numpy(), z2.numpy(), keep, q, drop_fn)
        assert len(set(kept.tolist())) == keep


def test_pair_scores_match_loops():
    z1, z2 = _unit_pairs(7, 6, 4)
    s, hard = pair_scores(z1, z2)
    a, b = z1.numpy(), z2.numpy()
    for i in range(6):
        assert s[i].item() == pytest.approx(a[i] @ b[i], rel=1e-12)
        ref = max(max(a[i] @ a[j], a[i] @ b[j]) for j in range(6) if j != i)
        assert hard[i].item() == pytest.approx(ref, rel=1e-12)


def test_ties_and_the_fill_are_deterministic():
    z = F.normalize(torch.ones(6, 3, dtype=torch.float64), dim=1)  # every score ties
    s, hard = pair_scores(z, z)
    kept, dropped = select_pairs(s, hard, 3, 0.5, False)
    assert dropped.tolist() == [True, True, True, False, False, False] and kept.tolist() == [3, 4, 5]
    kept, _ = select_pairs(s, hard, 5, 0.5, False)  # 3 survivors: 2 dropped ones fill, first positions first
    assert kept.tolist() == [0, 1, 3, 4, 5]


# ------------------------------------------------------------------------------------------------------ FRD
def _psd(seed: int, p: int, rank: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rank, p))
    return x.T @ x / rank


@pytest.mark.parametrize("p,rank", [(4, 10), (6, 3), (8, 8)])
def test_matrix_square_root_and_trace_match_scipy(p, rank):
    s1, s2 = _psd(p, p, rank), _psd(p + 1, p, rank + 2)
    root = sqrtm_psd(torch.tensor(s1)).numpy()
    np.testing.assert_allclose(root, np.real(scipy.linalg.sqrtm(s1)), atol=1e-6)
    got = trace_sqrt_product(torch.tensor(s1), torch.tensor(s2)).item()
    assert got == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real, rel=1e-6, abs=1e-7)


def np_frd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2))))


def test_frechet_distance_matches_numpy_and_scipy():
    z1, z2 = _unit_pairs(3, 20, 5)
    assert frechet_distance(z1, z2).item() == pytest.approx(np_frd(z1.numpy(), z2.numpy()), rel=1e-6)
    assert frechet_distance(z1, z1).item() == pytest.approx(0.0, abs=1e-7)
    z1, z2 = _unit_pairs(4, 6, 12, dtype=torch.float32)  # P > n: singular covariances, float32 input
    assert frechet_distance(z1, z2).dtype == torch.float64
    assert frechet_distance(z1, z2).item() == pytest.approx(np_frd(z1.double().numpy(), z2.double().numpy()),
                                                            rel=1e-5)


def test_frd_keeps_the_best_candidate_or_the_host_batch_under_the_threshold():
    z1, z2 = _unit_pairs(5, 12, 4)
    z2[4:8] = z1[4:8]  # candidate 1 (positions 4..7): identical views, FRD 0
    kept, frds, c = select_frd(z1, z2, 4, None)
    refs = [np_frd(z1[i:i + 4].numpy(), z2[i:i + 4].numpy()) for i in (0, 4, 8)]
    np.testing.assert_allclose(frds.numpy(), refs, rtol=1e-6, atol=1e-7)  # scipy: ~1e-8 off at 0
    assert c == 1 and kept.tolist() == [4, 5, 6, 7]
    assert select_frd(z1, z2, 4, threshold=refs[0] + 1e-3)[2] == 0  # the host's batch passes the filter
    assert select_frd(z1, z2, 4, threshold=refs[0] / 2)[2] == 1  # a bad host batch is replaced by the best


def test_schedules():
    assert curation_strength("constant", 0.0) == 1.0
    assert curation_strength("linear", 0.25) == 0.25 and curation_strength("linear", 2.0) == 1.0
    assert curation_strength("cosine", 0.0) == 0.0 and curation_strength("cosine", 0.5) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ the sampler
def test_pool_sampler_extends_the_host_batches():
    host = list(index_loader(100, 8, seed=3, num_replicas=1, rank=0))
    pools = list(index_loader(100, 8, seed=3, num_replicas=1, rank=0, pool_factor=3))
    assert len(pools) == len(host) == 12
    order = torch.cat(host).tolist()
    for t, pool in enumerate(pools):
        assert pool.shape == (24,) and len(set(pool.tolist())) == 24  # no image twice in a pool
        assert pool[:8].tolist() == host[t].tolist()  # the host's batch first
        assert pool[8:16].tolist() == host[(t + 1) % 12].tolist() or t == 11
    loader = index_loader(100, 8, seed=3, num_replicas=1, rank=0, pool_factor=3)
    loader.batch_sampler.sampler.set_epoch(1)  # what Lightning calls: a new order per epoch
    assert next(iter(loader))[:8].tolist() != pools[0][:8].tolist()
    assert sorted(order) == sorted(set(order))


def test_a_pool_larger_than_the_shard_is_refused():
    from torch.utils.data import DistributedSampler

    from contrastkit.errors import DataError
    from contrastkit.training.module import IndexDataset

    with pytest.raises(DataError, match="candidate pool"):
        PoolBatchSampler(DistributedSampler(IndexDataset(20), num_replicas=1, rank=0), 8, 3)


# --------------------------------------------------------------------------------------------- BN statistics
def _module(method: str, extra: list[str] = ()) -> SSLModule:
    cfg = load_config(None, [f"method.name={method}", "model.widths=[8, 16]", "optim.batch_size=8",
                             "method.proj_hidden_dim=16", "method.proj_out_dim=8", "method.pred_hidden_dim=16",
                             "method.proj_hidden_bn=true", "data.name=synthetic", "data.image_size=16",
                             "plugins.curation={warmup_epochs: 0}", *extra])
    module = SSLModule(cfg.to_dict(), 3, 16, [0.5] * 3, [0.25] * 3, steps_per_epoch=4)
    module.attach_images(torch.randint(0, 255, (64, 3, 16, 16), dtype=torch.uint8))
    module._aug_gen = torch.Generator().manual_seed(0)
    return module


@pytest.mark.parametrize("method,bn", [("simclr", "eval"), ("simclr", "batch"), ("moco", "eval"), ("byol", "batch")])
def test_scoring_leaves_batchnorm_statistics_and_modes_untouched(method, bn):
    module = _module(method, [f"plugins.curation.bn={bn}"])
    module.train()
    plugin = module.method.plugins.items["curation"]
    if method != "simclr":  # the teacher embeds where the host has one
        assert plugin.networks(module.method)[0] is module.method.teacher.backbone
    before = {k: v.clone() for k, v in module.state_dict().items()}
    modes = {n: m.training for n, m in module.named_modules()}
    ctx = StepContext(generator=module._aug_gen)
    kept = plugin.select_batch(torch.arange(16), ctx, module)
    assert kept.shape == (8,) and plugin.batch_views()[0].shape == (8, 3, 16, 16)
    assert plugin.batch_views() is None  # handed over once
    after = module.state_dict()
    assert any("running_mean" in k for k in after)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"{k} changed by scoring")
    assert {n: m.training for n, m in module.named_modules()} == modes


def test_batch_mode_uses_batch_statistics():
    module = _module("simclr")
    plugin = module.method.plugins.items["curation"]
    views = module.make_views(module.images[:8], module._aug_gen)
    _, z_eval = plugin.embed(module.method, views)
    plugin.options.bn = "batch"
    _, z_batch = plugin.embed(module.method, views)
    assert not torch.allclose(z_eval[0], z_batch[0])  # fresh running statistics (0, 1) differ from the batch's


# ------------------------------------------------------------------------------------------ identity settings
CURATED = "plugins.curation={pool_factor: 1, drop_quantile: 0.0, warmup_epochs: 0}"


@pytest.mark.slow
@pytest.mark.parametrize("host", ["simclr_infonce", "moco_infonce"])
def test_a_pool_of_one_batch_is_the_host_exactly(host, tmp_path):
    """pool_factor=1 scores every step (the full path: views from the generator, a no-grad forward with the
    teacher for MoCo) and keeps everything: the per-step losses are the host's, bit for bit. With pool_factor=2
    and the whole run in the warm-up, the host's batches are trained: also the host exactly."""
    plain = per_step_losses(HOSTS[host], tmp_path / "plain")
    assert per_step_losses(HOSTS[host] + [CURATED], tmp_path / "one") == plain
    assert per_step_losses(HOSTS[host] + ["plugins.curation={warmup_epochs: 5}"], tmp_path / "warm") == plain


# --------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("override,needle", [
    ("plugins.curation.criterion=best", "plugins.curation.criterion"),
    ("plugins.curation.pool_factor=0", "plugins.curation.pool_factor"),
    ("plugins.curation.pool_factor=1.5", "plugins.curation.pool_factor"),
    ("plugins.curation.drop_quantile=1", "plugins.curation.drop_quantile"),
    ("plugins.curation.drop_quantile=-0.1", "plugins.curation.drop_quantile"),
    ("plugins.curation.frd_threshold=-1", "plugins.curation.frd_threshold"),
    ("plugins.curation.warmup_epochs=-1", "plugins.curation.warmup_epochs"),
    ("plugins.curation.schedule=step", "plugins.curation.schedule"),
    ("plugins.curation.encoder=teacher", "plugins.curation.encoder"),
    ("plugins.curation.bn=train", "plugins.curation.bn"),
    ("plugins.curation.monitor_every_n_steps=-1", "plugins.curation.monitor_every_n_steps"),
    ("plugins.curation.monitor_bank_size=0", "plugins.curation.monitor_bank_size"),
    ("plugins.curation.monitor_every_n_steps=50", "multiple of train.log_every_n_steps=20"),  # never logged
    ("plugins.curation.drop_false_negatives=maybe", "plugins.curation.drop_false_negatives"),
    ("plugins.curation.quantile=0.2", "plugins.curation.quantile"),
])
def test_bad_options_are_refused_in_one_line(override, needle):
    assert_config_refused(["method.name=simclr", override], needle)


@pytest.mark.parametrize("method,loss", host_rows())
def test_curation_works_with_every_two_view_host(method, loss):
    overrides = [f"method.name={method}", "plugins.curation={criterion: frd}"]
    overrides += [f"method.loss={loss}"] if loss else []
    assert load_config(None, overrides).plugins == {"curation": {"criterion": "frd"}}


def test_a_pool_larger_than_the_data_is_refused_before_training(tiny_overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", *tiny_overrides, f"train.run_dir={run_dir}", "plugins.curation.pool_factor=9"])
    assert code == 2 and not run_dir.exists()
    err = capsys.readouterr().err.strip()
    assert "candidate pool of 576 images" in err and "\n" not in err


# ----------------------------------------------------------------------------------------------- whole runs
def _log_columns(run_dir: Path) -> dict[str, list[float]]:
    lines = (run_dir / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    return {h: [float(r[i]) for r in rows if r[i]] for i, h in enumerate(header)}


class _TrainedSizes:
    """Records the size of what each step trained (the kept indices) and what the loader delivered."""

    def __new__(cls):
        import lightning as L

        class Recorder(L.Callback):
            def __init__(self) -> None:
                self.pool, self.trained = [], []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                self.pool.append(int(batch.shape[0]))
                self.trained.append(int(pl_module.trained_indices.shape[0]))

        return Recorder()


@pytest.mark.slow
@pytest.mark.parametrize("host", sorted(HOSTS))
def test_short_run_of_every_host_with_curation(host, tmp_path):
    from contrastkit.training.run import train

    from plugin_reference import tiny

    plain = per_step_losses(HOSTS[host], tmp_path / "plain")
    criterion = "frd" if host in ("byol", "moco_infonce") else "pair"
    rec = _TrainedSizes()
    res = train(load_config(None, tiny(tmp_path / "c") + HOSTS[host] + [
        f"plugins.curation={{criterion: {criterion}, warmup_epochs: 0.125, drop_false_negatives: true}}",
        "train.log_every_n_steps=1", f"train.online_linear={host == 'simclr_infonce'}"]), callbacks=[rec])
    assert rec.pool == [64] * 4 and rec.trained == [32] * 4
    cols = _log_columns(tmp_path / "c")
    losses = cols["train/loss"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(plain[0], rel=1e-6)  # step 0 is the warm-up: the host's batch
    assert losses[1:] != pytest.approx(plain[1:], rel=1e-4)
    assert cols["train/curation_rejected"] == [0.0, 0.5, 0.5, 0.5]
    assert len(cols["train/curation_agreement_kept"]) == 3
    if criterion == "frd":
        assert all(k <= h + 1e-9 for k, h in zip(cols["train/curation_frd_kept"], cols["train/curation_frd_host"]))
    else:
        assert all(k >= r for k, r in zip(cols["train/curation_agreement_kept"],
                                          cols["train/curation_agreement_rejected"]))
    assert res.metrics["steps"] == 4


@pytest.mark.slow
def test_curation_composes_with_ascl_and_checks_the_premise(tiny_overrides, tmp_path):
    """MoCo + ASCL + curation with the kNN monitor bank: both plug-ins log, and the premise check runs on the
    steps it is due (labels are read for it only)."""
    from contrastkit.training.run import train

    cfg = load_config(None, tiny_overrides + [
        "method.name=moco", "method.loss=infonce", "method.queue_size=256", "train.epochs=1", "eval.knn=false",
        "train.knn_every_n_epochs=1", "plugins.ascl={neighbours: 3}", "train.log_every_n_steps=1",
        "plugins.curation={warmup_epochs: 0, monitor_every_n_steps: 2, monitor_bank_size: 64, schedule: linear}"])
    train(cfg)
    cols = _log_columns(tmp_path / "run")
    assert len(cols["train/ascl_confidence"]) == len(cols["train/loss"]) == 8
    assert cols["train/curation_rejected"][0] == 0.0 and cols["train/curation_rejected"][-1] > 0.4  # the ramp
    for key in ("train/curation_knn_error_kept", "train/curation_knn_error_rejected"):
        assert cols[key] and all(0 <= v <= 1 for v in cols[key])


@pytest.mark.slow
def test_the_premise_check_reaches_the_log_when_steps_are_logged_sparsely(tiny_overrides, tmp_path):
    """With a log interval above 1, the premise check runs on the steps Lightning writes (steps 2, 4, 6, 8 of 8
    with an interval of 2): every logged row after the first curated step holds its kNN errors."""
    from contrastkit.training.run import train

    train(load_config(None, tiny_overrides + [
        "train.epochs=1", "eval.knn=false", "train.knn_every_n_epochs=1", "train.log_every_n_steps=2",
        "plugins.curation={warmup_epochs: 0, monitor_every_n_steps: 2, monitor_bank_size: 64}"]))
    lines = (tmp_path / "run" / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line.split(",")[header.index("train/loss")]]
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7]
    assert all(r["train/curation_knn_error_kept"] and r["train/curation_knn_error_rejected"] for r in rows)


@pytest.mark.slow
def test_resume_continues_exactly_with_curation(tiny_overrides, tmp_path):
    assert_resume_exact(tiny_overrides + [
        "train.epochs=2", "train.knn_every_n_epochs=0", "eval.knn=false", "method.name=moco", "method.loss=infonce",
        "method.queue_size=256", "plugins.curation={warmup_epochs: 0.5, drop_false_negatives: true}"], tmp_path)


@pytest.mark.slow
def test_bench_throughput_runs_curation_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    records = bench_records(["--method", "simclr", "--plugin", "curation"], ["plugins.curation.pool_factor=3"], capsys)
    assert [r["plugins"] for r in records] == ["-", "curation"]
    on = records[1]["overrides"]
    assert on[0] == "plugins.curation={warmup_epochs: 0}" and "plugins.curation.pool_factor=3" in on[1:]
    assert all(r["end_to_end_images_per_sec"] > 0 for r in records)


def test_the_clock_counts_the_trained_images_not_the_pool():
    from types import SimpleNamespace

    from contrastkit.training.callbacks import TrainClock

    clock = TrainClock()
    trainer = SimpleNamespace(world_size=2)
    clock.on_train_batch_end(trainer, SimpleNamespace(trained_indices=torch.arange(16)), None, torch.arange(48), 0)
    clock.on_train_batch_end(trainer, SimpleNamespace(), None, torch.arange(48), 1)  # a module without selection
    assert clock.images == 2 * 16 + 2 * 48


def test_curation_is_registered_with_its_hosts():
    assert set(PLUGINS["curation"].hosts) == {"simclr", "moco", "nnclr", "byol", "barlow", "all4one"}


# ------------------------------------------------------------------------------------------------ distributed
DDP = [*OVERRIDES, "method.loss=infonce", "plugins.curation={warmup_epochs: 0.5, pool_factor: 3}"]  # 4 steps/epoch


def _ddp_worker(rank: int, world: int, tmp: str) -> dict:
    import lightning as L

    from contrastkit.training.run import train

    class Record(L.Callback):
        def __init__(self) -> None:
            self.pools, self.kept = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.pools.append(batch.tolist())
            self.kept.append(pl_module.trained_indices.tolist())

    class Stop(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            trainer.should_stop = True

    rec = Record()
    full = train(load_config(None, DDP + [f"train.run_dir={Path(tmp) / 'full'}"]), callbacks=[rec])
    train(load_config(None, DDP + [f"train.run_dir={Path(tmp) / 'part'}"]), callbacks=[Stop()])
    resumed = train(load_config(None, DDP + [f"train.run_dir={Path(tmp) / 'part'}", "train.resume=last"]))
    return {"pools": rec.pools, "kept": rec.kept, "steps": (full.metrics["steps"], resumed.metrics["steps"])}


@pytest.mark.slow
def test_under_ddp_each_process_curates_its_own_shard_and_resume_is_exact(tmp_path):
    from distributed_utils import run_gloo

    results = run_gloo(_ddp_worker, 2, tmp_path, str(tmp_path), timeout_s=400, launcher="lightning")
    spe = 256 // 2 // 32
    for rank, res in enumerate(results):
        assert res["steps"] == (2 * spe, 2 * spe)
        loaders = [index_loader(256, 32, 0, 2, rank, pool_factor=3) for _ in range(2)]
        for epoch, loader in enumerate(loaders):
            loader.batch_sampler.sampler.set_epoch(epoch)
            assert res["pools"][epoch * spe:(epoch + 1) * spe] == [b.tolist() for b in loader]  # its own shard
        for pool, kept in zip(res["pools"], res["kept"]):
            assert len(kept) == 32 and set(kept) <= set(pool)
        assert res["kept"][:spe // 2] == [p[:32] for p in res["pools"][:spe // 2]]  # the warm-up: host batches
    shards = [{i for p in res["pools"][:spe] for i in p} for res in results]
    assert not shards[0] & shards[1]  # epoch 0: disjoint shards, no communication needed
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after the resume"
