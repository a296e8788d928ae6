"""All4One (contrastkit.methods.all4one): each term against plain-loop / NumPy references written here (value and
gradient), the position code against a loop written from the ``positional-encodings`` package's definition, the
shift construction, the fallback of the first step, the reduction to NNCLR with a momentum encoder, the fixed
learning rate of the transformer, the options' validation, and short whole runs (training, CLI, bench).

The transformer layers themselves are PyTorch's ``nn.TransformerEncoder``; the references call the method's encoder
on sequences they build themselves (position code, shift, read-out), and compute everything else on their own."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit.config import load_config
from contrastkit.errors import ConfigError
from contrastkit.losses import FeatureContrastLoss
from contrastkit.methods import NNCLR, All4One, build_method
from contrastkit.models import CentroidTransformer, build_backbone, sinusoidal_token_code

sys.path.insert(0, str(Path(__file__).parent))
from plugin_reference import assert_config_refused, bench_records  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["method.name=all4one", "method.proj_hidden_dim=32", "method.proj_out_dim=16", "method.pred_hidden_dim=24",
        "method.queue_size=50"]


# ---------------------------------------------------------------------------------------------------- references
def ref_token_code(k: int, dim: int) -> list[list[float]]:
    """The ``positional-encodings`` package's PositionalEncoding1D(k) applied to a ``(1, dim, k)`` tensor (its
    "positions" are our features, its "channels" our tokens), transposed back: one Python loop per entry."""
    channels = int(math.ceil(k / 2) * 2)
    inv_freq = [1.0 / (10000 ** (j / channels)) for j in range(0, channels, 2)]
    emb = [[0.0] * channels for _ in range(dim)]  # position x channel
    for pos in range(dim):
        for i, f in enumerate(inv_freq):
            emb[pos][2 * i] = math.sin(pos * f)
            emb[pos][2 * i + 1] = math.cos(pos * f)
    return [[emb[pos][t] for pos in range(dim)] for t in range(k)]  # token x feature


def ref_normalise(v: Tensor) -> Tensor:
    return v / torch.sqrt(torch.sum(v * v))


def ref_cross_entropy(rows: list[Tensor], cols: list[Tensor], t: float) -> Tensor:
    """mean_i [ -u_i.v_i/t + log sum_j exp(u_i.v_j/t) ] on normalised vectors, one scalar at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for i, u in enumerate(rows):
        logits = [torch.dot(ref_normalise(u), ref_normalise(v)) / t for v in cols]
        total = total - logits[i] + torch.log(sum(torch.exp(x) for x in logits))
    return total / len(rows)


def ref_feature(zm_a: Tensor, z_b: Tensor, zm_b: Tensor, z_a: Tensor, scale: float) -> Tensor:
    """The feature term with loops over features and samples (autograd-able, float64)."""
    n, d = zm_a.shape

    def col_norm(z: Tensor) -> list[Tensor]:
        return [torch.sqrt(sum(z[b, i] * z[b, i] for b in range(n))) for i in range(d)]

    def corr(m: Tensor, o: Tensor) -> list[list[Tensor]]:
        nm, no = col_norm(m), col_norm(o)
        return [[sum(m[b, i] / nm[i] * o[b, j] / no[j] for b in range(n)) for j in range(d)] for i in range(d)]

    c1, c2 = corr(zm_a, z_b), corr(zm_b, z_a)
    on = sum((c[i][i] - 1) ** 2 for c in (c1, c2) for i in range(d)) / (2 * d)
    off = sum(c[i][j] ** 2 for c in (c1, c2) for i in range(d) for j in range(d) if i != j) / (2 * d * (d - 1))
    return scale * (torch.sqrt(on) + torch.sqrt(off)) / 2


def numpy_feature(zm_a, z_b, zm_b, z_a, scale: float) -> float:
    def corr(m, o):
        return (m / np.linalg.norm(m, axis=0)).T @ (o / np.linalg.norm(o, axis=0))

    c1, c2 = corr(zm_a, z_b), corr(zm_b, z_a)
    off = ~np.eye(c1.shape[0], dtype=bool)
    on = np.sqrt(0.5 * (np.mean((np.diag(c1) - 1) ** 2) + np.mean((np.diag(c2) - 1) ** 2)))
    offd = np.sqrt(0.5 * (np.mean(c1[off] ** 2) + np.mean(c2[off] ** 2)))
    return float(scale * 0.5 * (on + offd))


def ref_topk(query: Tensor, bank: Tensor, k: int) -> list[Tensor]:
    """The k bank rows of highest cosine similarity to ``query``, by sorting Python floats."""
    sims = [float(torch.dot(ref_normalise(query), ref_normalise(b))) for b in bank]
    order = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
    return [bank[j] for j in order]


def value_and_grads(fn, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    for p in params:
        p.grad = None
    value = fn()
    value.backward()
    return value.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


# ---------------------------------------------------------------------------------------------------- the parts
@pytest.mark.parametrize("k,dim", [(5, 16), (5, 7), (1, 4), (2, 6), (6, 8)])
def test_token_code_is_the_packages_permuted_encoding(k: int, dim: int) -> None:
    code = sinusoidal_token_code(k, dim)
    assert code.shape == (k, dim) and code.dtype == torch.float32
    torch.testing.assert_close(code, torch.tensor(ref_token_code(k, dim), dtype=torch.float32))
    if k == 5:  # the documented rows: sin(d), cos(d), ..., sin(d * 10000^(-2/3))
        d = torch.arange(dim, dtype=torch.float64)
        torch.testing.assert_close(code[0], torch.sin(d).float())
        torch.testing.assert_close(code[1], torch.cos(d).float())
        torch.testing.assert_close(code[4], torch.sin(d * 10000 ** (-2 / 3)).float())
    assert len({tuple(row.tolist()) for row in code}) == k  # a distinct code per token


class _Recorder(nn.Module):
    """Stands in for the transformer encoder: records its input, returns it unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.clone())
        return x


def test_centroid_reads_the_first_token_and_shifts_own_embedding_in() -> None:
    torch.manual_seed(0)
    k, dim, b = 4, 8, 3
    centroid = CentroidTransformer(dim, tokens=k, heads=2).eval()  # no dropout: two calls give the same
    nbrs, own = torch.randn(b, k, dim), torch.randn(b, dim)
    out = centroid(nbrs)
    assert out.shape == (b, dim)
    torch.testing.assert_close(centroid.shifted(own, nbrs), centroid(torch.cat([own[:, None], nbrs[:, :3]], 1)))
    recorder = _Recorder()
    centroid.encoder = recorder
    code = torch.tensor(ref_token_code(k, dim))
    torch.testing.assert_close(centroid(nbrs), nbrs[:, 0] + code[0])  # the output at the first token
    shifted = centroid.shifted(own, nbrs)
    seq = recorder.inputs[-1] - code  # B x k x D: own, then the k - 1 nearest neighbours, the last one dropped
    for i in range(b):
        torch.testing.assert_close(seq[i, 0], own[i])
        for j in range(1, k):
            torch.testing.assert_close(seq[i, j], nbrs[i, j - 1])
    torch.testing.assert_close(shifted, own + code[0])
    # a bfloat16 prediction joins float32 neighbours in float32 (autocast gives the predictor's output in bf16)
    assert centroid.shifted(own.bfloat16(), nbrs).dtype == torch.float32


def test_centroid_transformer_configuration_and_errors() -> None:
    t = CentroidTransformer(16)  # the official sizes at width 16: 3 layers, 8 heads, feed-forward 2 x 16, dropout 0.1
    layers = list(t.encoder.layers)
    assert len(layers) == 3 and layers[0].self_attn.num_heads == 8 and layers[0].linear1.out_features == 32
    assert layers[0].dropout.p == 0.1 and layers[0].self_attn.batch_first
    assert "position_code" not in t.state_dict()  # fixed: rebuilt, not checkpointed
    assert CentroidTransformer(16, ffn_dim=7).encoder.layers[0].linear1.out_features == 7
    with pytest.raises(ValueError, match="divisible"):
        CentroidTransformer(10, heads=4)
    with pytest.raises(ValueError, match="tokens must have shape"):
        t(torch.randn(2, 4, 16))
    with pytest.raises(ConfigError):
        CentroidTransformer(16, tokens=0)


@pytest.mark.parametrize("n,d,scale", [(6, 5, 10.0), (9, 3, 1.0), (4, 8, 2.5)])
def test_feature_loss_matches_numpy_and_loop_references(n: int, d: int, scale: float) -> None:
    g = torch.Generator().manual_seed(n * d)
    z = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4)]
    z[0] = F.normalize(z[0] + z[1], dim=1)  # momentum projections, correlated with the online ones
    z[2] = F.normalize(z[2] + z[3], dim=1)
    loss = FeatureContrastLoss(scale=scale)
    value, grads = value_and_grads(lambda: loss(*z), [x.requires_grad_() for x in z])
    ref, ref_grads = value_and_grads(lambda: ref_feature(*z, scale), z)
    assert value.item() == pytest.approx(numpy_feature(*(x.detach().numpy() for x in z), scale), rel=1e-12)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)
    on, off = loss.components(*z)
    torch.testing.assert_close(scale * (on + off) / 2, value)


def test_feature_loss_zero_at_the_identity_and_float32_and_errors() -> None:
    q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))  # orthonormal columns: C = I
    assert FeatureContrastLoss()(q, q, q, q).item() == pytest.approx(0.0, abs=1e-7)
    x = torch.randn(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FeatureContrastLoss()(x, x.bfloat16(), x, x).dtype == torch.float32
    with pytest.raises(ValueError):
        FeatureContrastLoss()(x, x[:5], x, x)
    with pytest.raises(ValueError, match="at least 2 features"):
        FeatureContrastLoss()(x[:, :1], x[:, :1], x[:, :1], x[:, :1])
    with pytest.raises(ConfigError):
        FeatureContrastLoss(scale=0)


# ---------------------------------------------------------------------------------------------------- the method
def _method(*overrides: str, backbone: nn.Module | None = None, dim: int = 0) -> All4One:
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    if backbone is None:
        backbone, dim = build_backbone("small_resnet", 1, widths=[8, 16], stem_stride=1)
    return build_method(backbone, dim, cfg.method)  # type: ignore[return-value]


def _views(seed: int = 0, n: int = 12, side: int = 6) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, side, side, generator=g)
    return [x + 0.3 * torch.randn(n, 1, side, side, generator=g) for _ in range(2)]


def ref_all4one(m: All4One, views: list[Tensor], bank: Tensor, k: int, weights: tuple[float, float, float],
                t_nn: float, t_c: float, scale: float) -> Tensor:
    """The whole per-step loss from the method's networks, every other step written out here."""
    x1, x2 = views
    h = m.backbone(torch.cat([x1, x2]))  # the backbone sees both views (BN-free here)
    z1, z2 = m.projector(h[: len(x1)]), m.projector(h[len(x1):])
    with torch.no_grad():
        hm = m.teacher.backbone(torch.cat([x1, x2]))
        zm1, zm2 = [F.normalize(m.teacher.projector(part), dim=1) for part in (hm[: len(x1)], hm[len(x1):])]
    code = torch.tensor(ref_token_code(k, z1.shape[1]), dtype=torch.float32).double()  # the code is kept in float32
    nbrs = [[ref_topk(q, bank, k) for q in zm] for zm in (zm1, zm2)]  # view x sample x k rows
    p = [m.predictor(z) for z in (z1, z2)]
    q = [m.centroid_predictor(z) for z in (z1, z2)]

    def centroid(tokens: list[Tensor]) -> Tensor:
        return torch.stack([tokens[j] + code[j] for j in range(k)])  # k x D, position code added

    cent = [m.centroid.encoder(torch.stack([centroid(s) for s in nbrs[v]]))[:, 0] for v in (0, 1)]
    shift = [m.centroid.encoder(torch.stack([centroid([q[v][i]] + s[: k - 1]) for i, s in enumerate(nbrs[v])]))[:, 0]
             for v in (0, 1)]
    l_nn = (ref_cross_entropy([s[0] for s in nbrs[0]], list(p[1]), t_nn)
            + ref_cross_entropy([s[0] for s in nbrs[1]], list(p[0]), t_nn)) / 2
    l_c = (ref_cross_entropy(list(cent[0]), list(shift[1]), t_c)
           + ref_cross_entropy(list(cent[1]), list(shift[0]), t_c)) / 2
    l_f = ref_feature(zm1, z2, zm2, z1, scale)
    return weights[0] * l_nn + weights[1] * l_c + weights[2] * l_f


@pytest.mark.parametrize("options,temperature", [
    ("{neighbours: 3, transformer_heads: 4, transformer_dropout: 0.0}", 0.2),  # the official weights and temperatures
    ("{neighbours: 5, transformer_heads: 2, transformer_dropout: 0.0, neighbour_weight: 0.7, centroid_weight: 0.3, "
     "feature_weight: 0.2, feature_scale: 4.0, centroid_temperature: 0.15, transformer_layers: 2}", 0.5),
])
def test_forward_loss_matches_the_reference_in_value_and_gradient(options: str, temperature: float) -> None:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(36, 20), nn.ReLU(), nn.Linear(20, 10))
    m = _method(f"method.options={options}", f"method.temperature={temperature}", backbone=backbone, dim=10).double()
    o = m.options
    with torch.no_grad():  # a teacher that differs from the student: the neighbours must come from the teacher
        for p in m.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    m.queue.push(torch.randn(20, 16, generator=g, dtype=torch.float64))
    bank = m.queue.get()
    views = [v.double() for v in _views()]
    params = [p for p in m.parameters() if p.requires_grad]
    out: dict[str, Tensor] = {}

    def run() -> Tensor:
        out.update(m.forward_loss(views, 0.0))
        return out["loss"]

    value, grads = value_and_grads(run, params)
    weights = (o.neighbour_weight, o.centroid_weight, o.feature_weight)
    ref, ref_grads = value_and_grads(
        lambda: ref_all4one(m, views, bank, o.neighbours, weights, temperature, o.centroid_temperature,
                            o.feature_scale), params)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    for (name, _), a, b in zip([(n, p) for n, p in m.named_parameters() if p.requires_grad], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11, msg=name)
    reached = {n.split(".")[0] for (n, p), gr in zip([(n, p) for n, p in m.named_parameters() if p.requires_grad],
                                                      grads) if gr.abs().sum() > 0}
    assert reached == {"backbone", "projector", "predictor", "centroid_predictor", "centroid"}
    # the logged terms are the unweighted terms of the sum
    total = sum(w * out[key] for w, key in zip(weights, ("neighbour_loss", "centroid_loss", "feature_loss")))
    torch.testing.assert_close(total, value)
    assert m.queue.staged == 1


def test_first_step_neighbours_are_the_own_momentum_projection() -> None:
    m = _method("method.options={neighbours: 3}")
    zm = F.normalize(torch.randn(4, 16), dim=1)
    own = m.neighbours(zm, m.queue.get())
    assert own.shape == (4, 3, 16) and torch.equal(own, zm[:, None].expand(-1, 3, -1))
    m.queue.push(torch.randn(2, 16))  # fewer than k rows: still the projection itself
    assert torch.equal(m.neighbours(zm, m.queue.get()), own)
    m.queue.push(torch.randn(5, 16))
    bank = m.queue.get()
    got = m.neighbours(zm, bank)
    for i in range(4):
        for j, row in enumerate(ref_topk(zm[i], bank, 3)):
            torch.testing.assert_close(got[i, j], row)
    out = m.forward_loss(_views(n=8, side=12), 0.0)  # the first step of a run is finite and stages view 1
    assert torch.isfinite(out["loss"]) and set(out) == {"loss", "neighbour_loss", "centroid_loss", "feature_loss"}


def test_zero_centroid_and_feature_weights_are_nnclr_with_a_momentum_encoder() -> None:
    """Momentum 0 (the teacher equals the student after every step), centroid and feature weights 0, neighbour weight
    1: All4One trains exactly like NNCLR (same losses, weights and support set over several SGD steps). With the
    default weights it does not (the control)."""
    common = ["method.momentum_base=0.0", "method.momentum_final=0.0", "method.temperature=0.2",
              "method.proj_layers=3", "method.proj_last_bn=true", "method.queue_size=40"]
    reduced = "method.options={neighbour_weight: 1.0, centroid_weight: 0.0, feature_weight: 0.0}"
    runs = {}
    for name, overrides in (("nnclr", ["method.name=nnclr"]), ("all4one", [reduced]), ("control", [])):
        m = _method(*common, *overrides)
        opt = torch.optim.SGD([p for g in m.parameter_groups() for p in g.params], lr=0.1, momentum=0.9)
        losses = []
        for step in range(4):
            opt.zero_grad()
            loss = m.forward_loss(_views(step, n=16, side=12), step / 4)["loss"]
            loss.backward()
            opt.step()
            m.after_optimizer_step(step / 4)
            losses.append(loss.detach())
        runs[name] = (torch.stack(losses), m)
    (ref, nnclr), (got, a4o), (control, _) = runs["nnclr"], runs["all4one"], runs["control"]
    assert isinstance(nnclr, NNCLR) and isinstance(a4o, All4One)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(nnclr.backbone.named_parameters(), a4o.backbone.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(a4o.queue.get(), nnclr.queue.get(), rtol=1e-5, atol=1e-6)
    assert len(a4o.queue) == 40
    assert not torch.allclose(control[1:], ref[1:], rtol=1e-2)


def test_transformer_group_has_a_fixed_learning_rate() -> None:
    from contrastkit.training.module import SSLModule

    def peak_lrs(*overrides: str) -> dict[str, float]:
        cfg = load_config(None, [*TINY, "model.widths=[8, 16]", "optim.lr=0.4", "optim.lr_scaling=linear",
                                 *overrides])
        module = SSLModule(cfg.to_dict(), 3, 16, [0.5] * 3, [0.25] * 3, steps_per_epoch=4)
        opt = module.configure_optimizers()["optimizer"]
        return {g["name"]: g["initial_lr"] for g in opt.param_groups}

    small, large = peak_lrs("optim.batch_size=64"), peak_lrs("optim.batch_size=512")
    assert small["backbone"] == pytest.approx(0.1) and large["backbone"] == pytest.approx(0.8)  # 0.4 x B / 256
    for lrs in (small, large):
        assert lrs["centroid"] == lrs["centroid_no_decay"] == pytest.approx(0.1)  # official code: 0.1, not scaled
        assert lrs["centroid_predictor"] == lrs["backbone"]
    assert peak_lrs("optim.batch_size=512", "method.options.centroid_lr=null")["centroid"] == pytest.approx(0.8)
    assert peak_lrs("optim.batch_size=64", "method.options.centroid_lr=0.3")["centroid"] == pytest.approx(0.3)


@pytest.mark.parametrize("override,needle", [
    ("method.options.neighbours=0", "method.options.neighbours"),
    ("method.options.neighbours=51", "method.options.neighbours"),  # more than the queue holds
    ("method.options.neighbours=2.5", "method.options.neighbours"),
    ("method.options.transformer_heads=3", "method.options.transformer_heads"),  # 16 is not divisible by 3
    ("method.options.transformer_layers=0", "method.options.transformer_layers"),
    ("method.options.transformer_ffn_dim=0", "method.options.transformer_ffn_dim"),
    ("method.options.transformer_dropout=1.0", "method.options.transformer_dropout"),
    ("method.options.centroid_weight=-0.1", "method.options.centroid_weight"),
    ("method.options.feature_weight=.inf", "method.options.feature_weight"),
    ("method.options={neighbour_weight: 0, centroid_weight: 0, feature_weight: 0}", "at least one"),
    ("method.options.centroid_temperature=0", "method.options.centroid_temperature"),
    ("method.options.feature_scale=-1", "method.options.feature_scale"),
    ("method.options.centroid_lr=0", "method.options.centroid_lr"),
    ("method.options.temperature=0.1", "unknown option method.options.temperature"),
    ("method.options=[1]", "method.options"),
])
def test_options_are_validated_with_the_config(override: str, needle: str) -> None:
    assert_config_refused([*TINY, override], needle)


def test_option_defaults_are_the_official_ones() -> None:
    o = _method().options
    assert (o.neighbours, o.neighbour_weight, o.centroid_weight, o.feature_weight) == (5, .5, .5, .5)
    assert o.feature_scale == 10
    assert (o.centroid_temperature, o.transformer_layers, o.transformer_heads, o.transformer_dropout) == (.1, 3, 8, .1)
    assert o.transformer_ffn_dim is None and o.centroid_lr == 0.1
    cfg = load_config(None, ["method.name=all4one"]).method
    assert (cfg.momentum_base, cfg.momentum_final, cfg.contrastive_loss) == (0.99, 1.0, "infonce")


# ---------------------------------------------------------------------------------------------------- whole runs
SYNTHETIC = ["data.name=synthetic", "data.image_size=16", "data.options={n: 256, channels: 1}", "views.preset=gray",
             "model.widths=[8, 16]", "model.stem_stride=1", "method.name=all4one", "method.proj_hidden_dim=32",
             "method.proj_out_dim=16", "method.pred_hidden_dim=32", "method.queue_size=128", "optim.batch_size=32",
             "train.epochs=1", "train.max_steps=5", "train.accelerator=cpu", "train.devices=1",
             "train.log_every_n_steps=1", "train.knn_every_n_epochs=0", "eval.batch_size=128", "train.knn_k=10"]


@pytest.mark.slow
def test_cli_trains_all4one_and_logs_every_term(tmp_path) -> None:
    from contrastkit.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", *SYNTHETIC, f"train.run_dir={run_dir}", "train.progress_bar=false"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "all4one" and results["steps"] == 5 and math.isfinite(results["knn_top1"])
    log = (run_dir / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = log[0].split(",")
    for term in ("train/neighbour_loss", "train/centroid_loss", "train/feature_loss"):
        col = header.index(term)
        values = [float(row.split(",")[col]) for row in log[1:] if row.split(",")[col]]
        assert len(values) == 5 and all(math.isfinite(v) and v > 0 for v in values), term
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(ckpt["method.queue.filled"]) == 128  # 5 steps x 32 keys of view 1 fill the 128 rows
    assert any(k.startswith("method.teacher.projector.") for k in ckpt)
    assert any(k.startswith("method.centroid.encoder.") for k in ckpt)


@pytest.mark.slow
def test_bench_throughput_compares_all4one_and_nnclr_side_by_side(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    records = bench_records(["--method", "all4one", "nnclr"], ["method.loss=infonce", "method.queue_size=64"], capsys)
    assert [r["method"] for r in records] == ["all4one", "nnclr"]
    assert all(r["model_images_per_sec"] > 0 for r in records)


def test_plugin_hooks_reach_all4one_like_any_two_view_host(monkeypatch) -> None:
    """The seam batch fusion and curation plug in at: the input hook sees the student's two views only (the
    momentum encoder sees the plain views), extra losses add to All4One's, and plug-ins refuse or accept all4one by
    their declared hosts (ASCL, whose targets are undefined on a neighbour positive, refuses it)."""
    from contrastkit.plugins import Plugin, build_plugins
    from contrastkit.plugins.registry import PLUGINS

    class Probe(Plugin):
        name = "probe"
        hosts = {"all4one": None}

        def __init__(self, options) -> None:
            super().__init__(options)
            self.scale = nn.Parameter(torch.ones(()))
            self.shapes: list[tuple[int, ...]] = []

        def transform_input(self, view, ctx):
            self.shapes.append(tuple(view.shape))
            return view * self.scale

        def extra_losses(self, outputs, ctx):
            return {"reg": (0.5, (self.scale - 2.0) ** 2)}

    monkeypatch.setitem(PLUGINS, "probe", Probe)
    cfg = load_config(None, [*TINY, "plugins.probe={}"])
    m = _method("plugins.probe={}")
    m.use_plugins(build_plugins(cfg))
    probe = m.plugins.items["probe"]
    views = _views(n=8, side=12)
    out = m.plugins.add_extra_losses(m.forward_loss(views, 0.0))
    assert probe.shapes == [(8, 1, 12, 12)] * 2  # the student's two views, not the teacher's
    assert out["probe_reg"].item() == pytest.approx(1.0) and "neighbour_loss" in out
    out["loss"].backward()
    assert probe.scale.grad is not None and probe.scale.grad.abs() > 0
    assert "plugins.probe" in [g.name for g in m.parameter_groups()]
    with pytest.raises(ConfigError, match="plugins.ascl does not work with method.name=all4one"):
        load_config(None, [*TINY, "plugins.ascl={}"])


@pytest.mark.slow
def test_short_run_with_batch_curation_composed(tmp_path) -> None:
    """All4One as a host of the batch-curation plug-in (its momentum teacher scores the pool): a short synthetic
    run trains the kept half of a 2x pool after a one-step warm-up, logs both sets of terms and stays finite."""
    from contrastkit.training.run import train

    run_dir = tmp_path / "run"
    train(load_config(None, [*SYNTHETIC, f"train.run_dir={run_dir}", "train.progress_bar=false", "eval.knn=false",
                             "data.monitor_bank_split=null", "data.monitor_query_split=null",
                             "plugins.curation={pool_factor: 2, warmup_epochs: 0.125}"]))
    lines = (run_dir / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]

    def column(name: str) -> list[float]:
        return [float(r[header.index(name)]) for r in rows if r[header.index(name)]]

    assert column("train/curation_rejected") == [0.0, 0.5, 0.5, 0.5, 0.5]  # 256 images / 32: warm-up is 1 step
    for term in ("train/loss", "train/neighbour_loss", "train/centroid_loss", "train/feature_loss"):
        assert len(column(term)) == 5 and all(math.isfinite(v) for v in column(term)), term
