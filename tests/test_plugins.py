"""The plug-in seam and ASCL: references, identity settings, the compatibility matrix, validation, whole runs.

The ASCL references below are written from the paper's equations (and the official code's BYOL variant) with plain
NumPy loops, independently of :mod:`contrastkit.losses.ascl`: values from the full computation, gradients by
central differences of the loss with the targets held fixed (so "no gradient reaches the targets" is part of the
comparison). The multi-process check (MoCo, BYOL and SimCLR with ASCL, 2 gloo processes = 1) is a case of
tests/test_methods_distributed.py.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from contrastkit.cli import main
from contrastkit.config import load_config
from contrastkit.errors import ConfigError
from contrastkit.losses import (
    ASCLLoss,
    ASCLNormalizedMSELoss,
    InBatchASCLLoss,
    InfoNCELoss,
    NormalizedMSELoss,
    QueueInfoNCELoss,
    ascl_targets,
)
from contrastkit.plugins import PLUGINS, Plugin, StepContext
from contrastkit.plugins.registry import host_rows

sys.path.insert(0, str(Path(__file__).parent))
from plugin_reference import (  # noqa: E402
    FIXTURE, HOSTS, assert_config_refused, assert_resume_exact, bench_records, per_step_losses)
from plugin_reference import numeric_grad as _np_grad  # noqa: E402

TARGETS = ["ascl", "ahcl", "hard", "normal"]


# ------------------------------------------------------------------------------------------- NumPy references
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_targets(key: np.ndarray, cands: np.ndarray, k: int, tt: float, kind: str) -> np.ndarray:
    """Targets of one query over [positive, candidates...]: the paper's y, normalised."""
    d = np.array([key @ c for c in cands])
    e = np.exp(d / tt - np.max(d / tt))
    r = e / e.sum()
    h = -sum(x * math.log(x) for x in r if x > 0)
    c = 1 - h / math.log(len(cands)) if len(cands) >= 2 else 0.0
    y = np.zeros(len(cands) + 1)
    y[0] = 1.0
    top = np.argsort(-d, kind="stable")[:k]
    for j in range(len(cands)):
        if kind == "ascl":
            y[j + 1] = min(1.0, k * c * r[j])
        elif kind == "ahcl":
            y[j + 1] = c if j in top else 0.0
        elif kind == "hard":
            y[j + 1] = 1.0 if j in top else 0.0
    return y / y.sum()


def _np_soft_ce(anchor: np.ndarray, pos: np.ndarray, cands: np.ndarray, y: np.ndarray, t: float) -> float:
    logits = np.array([anchor @ pos] + [anchor @ c for c in cands]) / t
    logp = logits - np.max(logits) - math.log(np.exp(logits - np.max(logits)).sum())
    return float(-(y * logp).sum())


def np_queue_loss(q, k, queue, t, tt, nb, kind, ys=None):
    """MoCo + ASCL: mean over queries; ``ys`` fixes the targets (for the gradient)."""
    qn, kn, bank = _unit(q), _unit(k), _unit(queue)
    total = 0.0
    for i in range(len(q)):
        y = _np_targets(kn[i], bank, nb, tt, kind) if ys is None else ys[i]
        total += _np_soft_ce(qn[i], kn[i], bank, y, t)
    return total / len(q)


def np_in_batch_loss(z1, z2, t, tt, nb, kind, ys=None):
    """SimCLR + ASCL: 2N anchors, candidates the 2N-2 others, targets from the positive's similarities."""
    z = _unit(np.concatenate([z1, z2]))
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        cands = np.stack([z[j] for j in range(2 * n) if j not in (a, p)])
        y = _np_targets(z[p], cands, nb, tt, kind) if ys is None else ys[a]
        total += _np_soft_ce(z[a], z[p], cands, y, t)
    return total / (2 * n)


def np_byol_loss(pred, target, tt, nb, kind, ys=None):
    """BYOL + ASCL (official code's variant, with the mean): 2 - 2 sum_j y_ij <h_i, k_j>."""
    h, k = _unit(pred), _unit(target)
    total = 0.0
    for i in range(len(h)):
        others = np.stack([k[j] for j in range(len(k)) if j != i])
        y = _np_targets(k[i], others, nb, tt, kind) if ys is None else ys[i]
        total += 2 - 2 * (y[0] * (h[i] @ k[i]) + sum(y[j + 1] * (h[i] @ others[j]) for j in range(len(others))))
    return total / len(h)


def _data(seed: int, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in shapes]


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread):
    yield


# ------------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("kind", TARGETS)
def test_queue_ascl_matches_numpy_reference(kind):
    q, k, bank = _data(0, (5, 4), (5, 4), (7, 4))
    t, tt, nb = 0.2, 0.3, 2
    loss_fn = ASCLLoss(temperature=t, target_temperature=tt, neighbours=nb, targets=kind)
    tq = torch.tensor(q, requires_grad=True)
    loss = loss_fn(tq, torch.tensor(k), torch.tensor(bank))
    loss.backward()
    assert loss.item() == pytest.approx(np_queue_loss(q, k, bank, t, tt, nb, kind), rel=1e-10)
    ys = [_np_targets(kk, _unit(bank), nb, tt, kind) for kk in _unit(k)]
    grad = _np_grad(lambda x: np_queue_loss(x, k, bank, t, tt, nb, kind, ys), q)
    np.testing.assert_allclose(tq.grad.numpy(), grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", TARGETS)
def test_in_batch_ascl_matches_numpy_reference(kind):
    z1, z2 = _data(1, (4, 3), (4, 3))
    t, tt, nb = 0.3, 0.4, 2
    loss_fn = InBatchASCLLoss(temperature=t, target_temperature=tt, neighbours=nb, targets=kind)
    a, b = torch.tensor(z1, requires_grad=True), torch.tensor(z2, requires_grad=True)
    loss = loss_fn(a, b)
    loss.backward()
    assert loss.item() == pytest.approx(np_in_batch_loss(z1, z2, t, tt, nb, kind), rel=1e-10)
    z = _unit(np.concatenate([z1, z2]))
    n = len(z1)
    ys = [_np_targets(z[(i + n) % (2 * n)], np.stack([z[j] for j in range(2 * n) if j not in (i, (i + n) % (2 * n))]),
                      nb, tt, kind) for i in range(2 * n)]
    g1 = _np_grad(lambda x: np_in_batch_loss(x, z2, t, tt, nb, kind, ys), z1)
    g2 = _np_grad(lambda x: np_in_batch_loss(z1, x, t, tt, nb, kind, ys), z2)
    np.testing.assert_allclose(a.grad.numpy(), g1, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(b.grad.numpy(), g2, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", TARGETS)
def test_byol_ascl_matches_numpy_reference(kind):
    p, k = _data(2, (5, 4), (5, 4))
    tt, nb = 0.3, 2
    loss_fn = ASCLNormalizedMSELoss(target_temperature=tt, neighbours=nb, targets=kind)
    tp, tk = torch.tensor(p, requires_grad=True), torch.tensor(k, requires_grad=True)
    loss = loss_fn(tp, tk)
    loss.backward()
    assert loss.item() == pytest.approx(np_byol_loss(p, k, tt, nb, kind), rel=1e-10)
    kn = _unit(k)
    ys = [_np_targets(kn[i], np.stack([kn[j] for j in range(5) if j != i]), nb, tt, kind) for i in range(5)]
    np.testing.assert_allclose(tp.grad.numpy(), _np_grad(lambda x: np_byol_loss(x, k, tt, nb, kind, ys), p),
                               rtol=1e-5, atol=1e-8)
    assert tk.grad is None or torch.count_nonzero(tk.grad) == 0  # keys are targets: no gradient


def test_first_moco_step_uses_the_other_keys_as_candidates():
    q, k = _data(3, (5, 4), (5, 4))
    loss = ASCLLoss(temperature=0.2, target_temperature=0.3, neighbours=2)(torch.tensor(q), torch.tensor(k), None)
    kn = _unit(k)
    ref = 0.0
    for i in range(5):  # the query's own key is its positive, the other 4 keys its candidates
        others = np.stack([kn[j] for j in range(5) if j != i])
        ref += _np_soft_ce(_unit(q)[i], kn[i], others, _np_targets(kn[i], others, 2, 0.3, "ascl"), 0.2)
    assert loss.item() == pytest.approx(ref / 5, rel=1e-10)


# ------------------------------------------------------------------------------------------ identity settings
def _grads(loss_fn, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    loss = loss_fn(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def test_normal_targets_equal_the_host_losses():
    g = torch.Generator().manual_seed(0)
    q, k, bank = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for negatives in (bank, None):
        a = _grads(lambda x: ASCLLoss(temperature=0.2, targets="normal")(x, k, negatives), q)
        b = _grads(lambda x: QueueInfoNCELoss(temperature=0.2)(x, k, negatives), q)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    a = _grads(InBatchASCLLoss(temperature=0.2, targets="normal"), q, k)
    b = _grads(InfoNCELoss(temperature=0.2), q, k)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    a = _grads(lambda x: ASCLNormalizedMSELoss(targets="normal")(x, k), q)
    b = _grads(lambda x: NormalizedMSELoss()(x, k), q)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_ascl_losses_raise_value_error_on_a_shape_mismatch():
    """A shape mismatch inside a forward pass is a programming error (ValueError with a traceback), not a user's
    configuration error, as for the host losses."""
    a, b = torch.randn(4, 6), torch.randn(4, 5)
    for call in (lambda: ASCLNormalizedMSELoss()(a, b), lambda: ASCLLoss()(a, b, None),
                 lambda: InBatchASCLLoss()(a, b)):
        with pytest.raises(ValueError, match="shape") as e:
            call()
        assert not isinstance(e.value, ConfigError)


def test_uniform_similarities_give_zero_confidence_and_moco():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    bank = torch.randn(1, 6, generator=g, dtype=torch.float64).repeat(9, 1)  # every key equally similar to all
    loss_fn = ASCLLoss(temperature=0.2, neighbours=5, targets="ascl")
    a = _grads(lambda x: loss_fn(x, k, bank), q)
    stats = loss_fn.pop_stats()
    assert stats["confidence"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["mass"].item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(a, _grads(lambda x: QueueInfoNCELoss(temperature=0.2)(x, k, bank), q))
    assert loss_fn.pop_stats() == {}  # popped


def test_peaked_similarities_move_mass_to_the_neighbour():
    k = torch.eye(4, dtype=torch.float64)
    bank = torch.cat([torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64)])  # key i = row i
    y, c = ascl_targets(k @ bank.T, neighbours=1, target_temperature=0.01)
    assert torch.all(c > 0.99)
    half = 0.5 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(y[:, 1:5], half, atol=1e-6, rtol=0)  # y = [1, ~1 on its copy] / 2
    assert torch.allclose(y.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_no_gradient_reaches_the_targets():
    sim = torch.randn(3, 5, requires_grad=True)
    y, c = ascl_targets(sim, neighbours=2, target_temperature=0.1)
    assert not y.requires_grad and not c.requires_grad


# -------------------------------------------------------------------------------------- config and matrix
@pytest.mark.parametrize("method,loss", [r for r in host_rows()])
def test_every_matrix_cell_is_refused_or_accepted_as_declared(method, loss):
    overrides = [f"method.name={method}", "plugins.ascl={}"] + ([f"method.loss={loss}"] if loss else [])
    compatible = method in ("moco", "simclr", "byol") and loss in (None, "infonce")
    if compatible:
        assert load_config(None, overrides).plugins == {"ascl": {}}
    else:
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        msg = str(e.value)
        assert "\n" not in msg and "plugins.ascl" in msg
        assert (f"method.name={method}" in msg and "byol, moco, simclr" in msg) or (
            f"method.loss={loss}" in msg and "infonce" in msg)


@pytest.mark.parametrize("override,needle", [
    ("plugins.ascl.neighbours=0", "plugins.ascl.neighbours"),
    ("plugins.ascl.neighbours=2.5", "plugins.ascl.neighbours"),
    ("plugins.ascl.target_temperature=0", "plugins.ascl.target_temperature"),
    ("plugins.ascl.targets=soft", "plugins.ascl.targets"),
    ("plugins.ascl.k=3", "plugins.ascl.k"),
    ("plugins.nope={}", "plugins.nope"),
    ("plugins.ascl=5", "plugins.ascl"),
    ("plugins.ascl.neighbours.x=1", "plugins.NAME.OPTION"),
])
def test_plugin_options_are_validated_by_name(override, needle):
    assert_config_refused(["method.name=moco", "method.loss=infonce", override], needle)


def test_plugins_section_overrides_and_round_trip(tmp_path):
    cfg = load_config("configs/fmnist_moco_ascl.yaml", ["plugins.ascl.neighbours=5"])
    assert cfg.plugins == {"ascl": {"neighbours": 5, "target_temperature": 0.05, "targets": "ascl"}}
    assert load_config("configs/fmnist_moco_ascl.yaml", ["plugins.ascl=null"]).plugins == {}
    assert load_config(None, []).plugins == {}  # absent = off
    from contrastkit.config import config_from_dict

    assert config_from_dict(cfg.to_dict()).plugins == cfg.plugins
    load_config("configs/cifar10_moco_ascl_resnet18.yaml")  # the official recipe validates


def test_incompatible_run_is_refused_before_the_run_directory_exists(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "configs/fmnist_moco_ascl.yaml", "method.loss=dcl", f"train.run_dir={run_dir}"])
    assert code == 2 and not run_dir.exists()
    err = capsys.readouterr().err.strip()
    assert err == ("error: plugins.ascl does not work with method.loss=dcl on moco; compatible losses: infonce, "
                   "ntxent")


def test_cli_prints_the_matrix(capsys):
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["host", *sorted(PLUGINS)]
    column = -len(PLUGINS) + sorted(PLUGINS).index("ascl")  # the cells of the ascl column, counted from the right
    table = {line.split("  ")[0].strip(): line.split()[column] for line in lines[2:]}
    assert table["moco + infonce"] == "yes" and table["simclr + infonce"] == "yes" and table["byol"] == "yes"
    assert table["moco + dcl"] == "-" and table["nnclr + infonce"] == "-" and table["barlow"] == "-"
    for name, cls in PLUGINS.items():  # every column says what the plug-in's check says
        col = -len(PLUGINS) + sorted(PLUGINS).index(name)
        for line, (method, loss) in zip(lines[2:], host_rows()):
            accepted = method in cls.hosts and (cls.hosts[method] is None or loss in cls.hosts[method])
            assert line.split()[col] == ("yes" if accepted else "-"), (name, line)
    fusion = -len(PLUGINS) + sorted(PLUGINS).index("batch_fusion")
    assert all(line.split()[fusion] == "yes" for line in lines[2:])  # batch fusion works with every host


# ------------------------------------------------------------------------------------------ the seam itself
class _Probe(Plugin):
    """A test plug-in that uses every hook: a learnable input scale, a batch filter, an extra loss, a counter."""

    name = "probe"
    hosts = {"byol": None, "simclr": None}
    lr_factor = 3.0

    def __init__(self, options) -> None:
        super().__init__(options)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.seen: list[tuple[str, object]] = []

    def select_batch(self, indices, ctx, module):
        self.seen.append(("batch", ctx.global_step))
        return indices[: len(indices) // 2]

    def transform_input(self, view, ctx):
        self.seen.append(("input", tuple(view.shape)))
        return view * self.scale

    def extra_losses(self, outputs, ctx):
        self.seen.append(("extra", ctx.indices.numel()))
        return {"reg": (0.5, (self.scale - 2.0) ** 2)}

    def after_optimizer_step(self, ctx):
        self.steps += 1


@pytest.fixture
def probe_plugin(monkeypatch):
    monkeypatch.setitem(PLUGINS, "probe", _Probe)
    return _Probe


def test_hooks_act_in_order_on_the_student_only(probe_plugin, tmp_path):
    from contrastkit.training.module import SSLModule

    cfg = load_config(None, ["method.name=byol", "plugins.probe={}", "model.widths=[8, 16]", "optim.batch_size=8",
                             "method.proj_hidden_dim=16", "method.proj_out_dim=8", "method.pred_hidden_dim=16",
                             "data.name=synthetic", "data.image_size=16"])
    module = SSLModule(cfg.to_dict(), 3, 16, [0.5] * 3, [0.25] * 3, steps_per_epoch=4)
    module.attach_images(torch.randint(0, 255, (32, 3, 16, 16), dtype=torch.uint8))
    module._aug_gen = torch.Generator().manual_seed(0)
    probe = module.method.plugins.items["probe"]
    module.method.plugins.begin_step(StepContext(indices=torch.arange(8)))
    kept = module.method.plugins.select_batch(torch.arange(8), module)
    views = module.make_views(module.images[kept])
    out = module.method.plugins.add_extra_losses(module.method.forward_loss(views, 0.0))
    # the batch hook first, then the input hook on the student's two views only (BYOL's teacher sees plain views),
    # then the extra loss, which sees the kept batch
    assert probe.seen == [("batch", 0), ("input", (4, 3, 16, 16)), ("input", (4, 3, 16, 16)), ("extra", 4)]
    assert out["probe_reg"].item() == pytest.approx(1.0)
    out["loss"].backward()
    assert probe.scale.grad is not None  # the input transform trains (student path)
    groups = {g.name: g for g in module.method.parameter_groups()}
    assert groups["plugins.probe"].params == [probe.scale] and groups["plugins.probe"].lr_factor == 3.0
    assert "plugins" not in groups
    assert "method.plugins.items.probe.steps" in module.state_dict()  # plug-in state is checkpointed
    opt = module.configure_optimizers()["optimizer"]
    lrs = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # peak lr
    backbone_lr = lrs[id(next(module.method.backbone.parameters()))]
    assert backbone_lr > 0 and lrs[id(probe.scale)] == pytest.approx(3.0 * backbone_lr)


def test_predictor_lr_factor_is_one_case_of_the_group_rule():
    from contrastkit.training.module import SSLModule

    cfg = load_config(None, ["method.name=byol", "optim.predictor_lr_factor=10", "model.widths=[8, 16]",
                             "method.proj_hidden_dim=16", "method.proj_out_dim=8", "method.pred_hidden_dim=16"])
    module = SSLModule(cfg.to_dict(), 3, 16, [0.5] * 3, [0.25] * 3, steps_per_epoch=4)
    opt = module.configure_optimizers()["optimizer"]
    lrs = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # peak lr
    ratio = lrs[id(next(module.method.predictor.parameters()))] / lrs[id(next(module.method.backbone.parameters()))]
    assert ratio == pytest.approx(10.0)


# ----------------------------------------------------------------------------------------------- whole runs
@pytest.mark.slow
def test_runs_without_plugins_equal_the_code_before_plugins(tmp_path):
    """Per-step losses of every host equal those of commit 66473b5 (tests/fixtures/no_plugin_losses.json).

    Compared to 1e-6 relative rather than bit for bit: the fixture was written on this machine with one thread, and
    the same code gave the identical numbers here; another CPU's kernels may round differently, while any change of
    the run (another random draw, another parameter order, another loss) moves the losses by 1e-3 or more."""
    ref = json.loads(FIXTURE.read_text())["losses"]
    for name, overrides in HOSTS.items():
        got = per_step_losses(overrides, tmp_path / name)
        assert got == pytest.approx(ref[name], rel=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("host", ["simclr_infonce", "moco_infonce", "byol"])
def test_short_run_of_every_compatible_host_with_ascl(host, tmp_path):
    plain = per_step_losses(HOSTS[host], tmp_path / "plain")
    ascl = per_step_losses(HOSTS[host] + ["plugins.ascl={neighbours: 5, target_temperature: 0.5}",
                                         "train.log_every_n_steps=1"], tmp_path / "a")
    assert all(math.isfinite(x) for x in ascl) and ascl != pytest.approx(plain, rel=1e-4)
    log = (tmp_path / "a" / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = log[0].split(",")
    col = header.index("train/ascl_confidence")
    values = [float(row.split(",")[col]) for row in log[1:] if row.split(",")[col]]
    assert len(values) == len(ascl) and all(0 <= v <= 1 for v in values)
    assert "train/ascl_mass" in header
    from contrastkit.report import build_report

    md = build_report([tmp_path / "plain", tmp_path / "a"], tmp_path / "report").read_text()
    assert "ascl_confidence.png" in md and (tmp_path / "report" / "ascl_mass.png").is_file()
    assert "| a | " in md and "| ascl |" in md  # the plug-ins column


@pytest.mark.slow
def test_resume_continues_exactly_with_ascl(tiny_overrides, tmp_path):
    weights = assert_resume_exact(tiny_overrides + [
        "train.epochs=2", "train.knn_every_n_epochs=0", "eval.knn=false", "method.name=moco", "method.loss=infonce",
        "method.queue_size=256", "plugins.ascl={neighbours: 5}"], tmp_path)
    assert "method.queue.keys" in weights


@pytest.mark.slow
def test_bench_throughput_runs_the_host_with_and_without_the_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = ["method.loss=infonce", "plugins.ascl.neighbours=3"]
    records = bench_records(["--method", "moco", "--plugin", "ascl"], overrides, capsys)
    assert [r["plugins"] for r in records] == ["-", "ascl"]
    assert not any(o.startswith("plugins") for o in records[0]["overrides"])
    assert "plugins.ascl.neighbours=3" in records[1]["overrides"]
    assert all(r["model_images_per_sec"] > 0 for r in records)


def test_compare_repeats_takes_medians_and_ratios_to_the_host() -> None:
    from contrastkit.bench import compare_repeats

    base = {"method": "moco", "backbone": "convnet", "dataset": "fashion-mnist"}
    speeds = {"-": [100.0, 90.0, 120.0], "ascl": [80.0, 99.0, 45.0]}  # alternating runs, as --repeats makes them
    records = [{**base, "plugins": p, "repeat": i, "end_to_end_images_per_sec": speeds[p][i]}
               for i in range(3) for p in ("-", "ascl")]
    rows = {r["plugins"]: r for r in compare_repeats(records)}
    assert rows["-"]["end_to_end_images_per_sec"] == 100.0 and rows["-"]["ratio_to_host"] == 1.0
    assert rows["ascl"]["end_to_end_images_per_sec"] == 80.0 and rows["ascl"]["ratio_to_host"] == 0.8
    assert (rows["ascl"]["min"], rows["ascl"]["max"], rows["ascl"]["n"]) == (45.0, 99.0, 3)


@pytest.mark.slow
def test_bench_repeats_alternate_over_methods_and_plugins(tmp_path, monkeypatch, capsys):
    # each round runs every method with and without the plug-in, so a drift of the machine hits all of them alike
    monkeypatch.chdir(tmp_path)
    records = bench_records(["--method", "simclr", "barlow", "--plugin", "batch_fusion", "--repeats", "2"], [],
                            capsys)
    assert [(r["repeat"], r["method"], r["plugins"]) for r in records] == [
        (k, m, p) for k in (0, 1) for m in ("simclr", "barlow") for p in ("-", "batch_fusion")]


@pytest.mark.slow
def test_bench_repeats_alternate_host_and_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "throughput", "--backbone", "small_resnet", "--dataset", "synthetic", "--method", "moco",
                 "--batch-size", "16", "--steps", "1", "--warmup", "0", "--plugin", "ascl", "--repeats", "2",
                 "model.widths=[8,16]", "method.loss=infonce"]) == 0
    out = capsys.readouterr().out
    assert "median of 2" in out and "x the host" in out
