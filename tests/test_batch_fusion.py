"""Adaptive batch fusion (contrastkit.plugins.batch_fusion): the core against a NumPy reference, where information
flows (across the batch, never across views, student only), the identity setting, options, evaluation and export,
DDP, resume, composition, bench.

The reference below is written from the module docstring's equations with plain loops over patches, positions and
heads, independently of :mod:`contrastkit.models.batch_fusion`; values are compared in float64 and gradients by
central differences of the reference.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from contrastkit.config import load_config
from contrastkit.errors import ConfigError
from contrastkit.models import backbone_stages
from contrastkit.models.batch_fusion import BatchFusionLayer, BatchLinear
from contrastkit.plugins import PLUGINS, StepContext
from contrastkit.plugins.batch_fusion import BatchFusion
from contrastkit.plugins.registry import host_rows

sys.path.insert(0, str(Path(__file__).parent))
from distributed_utils import run_gloo  # noqa: E402
from plugin_reference import (  # noqa: E402
    HOSTS, assert_config_refused, assert_resume_exact, bench_records, per_step_losses)
from plugin_reference import numeric_grad as _np_grad  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread):
    yield


# ------------------------------------------------------------------------------------------- NumPy reference
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().copy()


def np_layer(x: np.ndarray, layer: BatchFusionLayer, heads: int = 1) -> np.ndarray:
    """One Embedding Layer with plain loops: zero-pad, embed each patch, mix the batch at each position, restore."""
    p = layer.patch_size
    b, c, hh, ww = x.shape
    hp, wp = -(-hh // p) * p, -(-ww // p) * p
    xp = np.zeros((b, c, hp, wp))
    xp[:, :, :hh, :ww] = x
    ew, eb = _np(layer.embed.weight), _np(layer.embed.bias)  # E x C x p x p, E
    rw, rb = _np(layer.restore.weight), _np(layer.restore.bias)  # E x C x p x p (transposed conv), C
    dim = ew.shape[0]
    h, w = hp // p, wp // p
    e = np.zeros((b, dim, h, w))
    for n in range(b):
        for i in range(h):
            for j in range(w):
                patch = xp[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                for o in range(dim):
                    e[n, o, i, j] = float((ew[o] * patch).sum()) + eb[o]
    m = np.zeros_like(e)
    for i in range(h):
        for j in range(w):
            tok = e[:, :, i, j]  # B x E: the batch at one position
            if isinstance(layer.mixer, BatchLinear):
                wm = _np(layer.mixer.mix.weight)
                for n in range(b):
                    m[n, :, i, j] = sum(wm[n, k] * tok[k] for k in range(b))
                continue
            ln, attn = layer.mixer.norm, layer.mixer.attn
            mu, var = tok.mean(1, keepdims=True), tok.var(1, keepdims=True)
            t = (tok - mu) / np.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)
            wi, bi = _np(attn.in_proj_weight), _np(attn.in_proj_bias)
            q, k, v = (t @ wi[s * dim:(s + 1) * dim].T + bi[s * dim:(s + 1) * dim] for s in range(3))
            d = dim // heads
            out = np.zeros((b, dim))
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                for n in range(b):
                    scores = np.array([q[n, sl] @ k[o, sl] / math.sqrt(d) for o in range(b)])
                    a = np.exp(scores - scores.max())
                    a /= a.sum()
                    out[n, sl] = sum(a[o] * v[o, sl] for o in range(b))
            m[:, :, i, j] = out @ _np(attn.out_proj.weight).T + _np(attn.out_proj.bias)
    r = np.zeros((b, c, hp, wp))
    for n in range(b):
        for i in range(h):
            for j in range(w):
                for ch in range(c):
                    r[n, ch, i * p:(i + 1) * p, j * p:(j + 1) * p] = (
                        sum(m[n, o, i, j] * rw[o, ch] for o in range(dim)) + rb[ch])
    return r[:, :, :hh, :ww]


def np_fuse(x: np.ndarray, plugin: BatchFusion, alphas: list[float]) -> np.ndarray:
    """x_l = x_{l-1} + alpha_l F_l(x_{l-1})."""
    for layer, a in zip(plugin.layers, alphas):
        x = x + a * np_layer(x, layer, plugin.options.heads)
    return x


class _Host(nn.Module):
    """The smallest thing a plug-in attaches to: a backbone (and optionally a teacher)."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.Flatten())


def make_plugin(batch_size: int = 3, channels: int = 2, **options) -> BatchFusion:
    plugin = BatchFusion(BatchFusion.parse_options(options), batch_size=batch_size)
    plugin.attach(_Host(channels))
    return plugin.double()


# ------------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("mixer,heads,layers", [("attention", 2, 2), ("attention", 1, 1), ("linear", 1, 2)])
def test_fusion_matches_numpy_reference_value_and_gradient(mixer, heads, layers):
    plugin = make_plugin(patch_size=2, embed_dim=4, heads=heads, mixer=mixer, layers=layers, strength="both",
                         max_strength=0.4)
    with torch.no_grad():
        for i, g in enumerate(plugin.gates):
            g.fill_(0.3 - 0.5 * i)
    progress = 0.5
    alphas = [0.3 - 0.5 * i + 0.4 * progress for i in range(layers)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)  # 5 px: padded to 6
    weights = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64)
    out = plugin.fuse(x, progress)
    ref = np_fuse(_np(x), plugin, alphas)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    (out * weights).sum().backward()
    grad = _np_grad(lambda v: float((np_fuse(v, plugin, alphas) * weights.numpy()).sum()), _np(x))
    np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-5, atol=1e-7)
    logs = plugin.logs()
    assert logs["strength"].item() == pytest.approx(sum(alphas) / layers)
    rel = np.linalg.norm(ref - _np(x)) / np.linalg.norm(_np(x))
    assert logs["relative_norm"].item() == pytest.approx(rel, rel=1e-6) and plugin.logs() == {}


def test_strength_modes_follow_the_schedule():
    ramp = make_plugin(strength="ramp", max_strength=0.8, layers=2)
    assert [ramp.strength(i, t) for i in (0, 1) for t in (0.0, 0.5, 1.0, 2.0)] == [0.0, 0.4, 0.8, 0.8] * 2
    assert len(ramp.gates) == 0 and sum(p.numel() for p in ramp.parameters()) > 0
    learned = make_plugin(strength="learned")
    assert learned.strength(0, 0.7) is learned.gates[0] and learned.gates[0].item() == 0.0  # starts as the host
    both = make_plugin(strength="both", max_strength=2.0)
    assert both.strength(0, 0.25).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------- information flow
@pytest.mark.parametrize("mixer", ["attention", "linear"])
def test_each_output_depends_on_the_other_samples(mixer):
    plugin = make_plugin(batch_size=4, mixer=mixer, strength="ramp", patch_size=2, embed_dim=4)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    out = plugin.fuse(x, progress=1.0)
    (grad,) = torch.autograd.grad(out[0].sum(), x, retain_graph=True)
    assert all(grad[j].abs().sum() > 1e-6 for j in range(4))  # sample 0 hears every sample of its batch
    # patch positions do not talk to each other: the output's top-left patch ignores the bottom-right input patch
    (grad,) = torch.autograd.grad(out[:, :, :2, :2].sum(), x)
    assert torch.count_nonzero(grad[:, :, 2:, 2:]) == 0


def _module(*overrides: str, method: str = "simclr"):
    from contrastkit.training.module import SSLModule

    cfg = load_config(None, [f"method.name={method}", "model.widths=[8, 16]", "optim.batch_size=6",
                             "method.proj_hidden_dim=16", "method.proj_out_dim=8", "method.pred_hidden_dim=16",
                             "method.queue_size=24", "data.name=synthetic", "data.image_size=16", *overrides])
    torch.manual_seed(0)
    return SSLModule(cfg.to_dict(), 3, 16, [0.5] * 3, [0.25] * 3, steps_per_epoch=4)


@pytest.mark.parametrize("placement", ["input", "stem", "stage1", "stage2"])
def test_views_are_fused_on_their_own_in_the_student_only(placement):
    """In eval mode (BN from running statistics, so the backbone alone treats samples independently) the student's
    feature of sample 0 of view 0 depends on the other samples of view 0 through the fusion, and never on view 1."""
    module = _module(f"plugins.batch_fusion={{placement: {placement}, strength: ramp}}").double().eval()
    method = module.method
    method.plugins.begin_step(StepContext(progress=1.0))
    views = [torch.randn(6, 3, 16, 16, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    feats = method.encode_views(views)  # V x (B x D), both views in one backbone call
    g0, g1 = torch.autograd.grad(feats[0][0].sum(), views)
    assert all(g0[j].abs().sum() > 0 for j in range(6)) and torch.count_nonzero(g1) == 0
    stage = backbone_stages(method.backbone)[placement][0] if placement != "input" else None
    assert stage is None or not stage._forward_hooks  # the hook lives only during the student's call
    plain = module.method.backbone(views[0])  # the backbone alone: sample 0 only
    (g,) = torch.autograd.grad(plain[0].sum(), views[0])
    assert torch.count_nonzero(g[1:]) == 0


def test_teacher_sees_plain_views_unless_asked():
    for teacher in (False, True):
        module = _module(f"plugins.batch_fusion={{strength: ramp, teacher: {str(teacher).lower()}}}", method="byol")
        method = module.method.double().eval()
        method.plugins.begin_step(StepContext(progress=1.0))
        views = [torch.randn(6, 3, 16, 16, dtype=torch.float64) for _ in range(2)]
        got = method.encode_views(views, method.teacher.backbone)
        plain = [method.teacher.backbone(v) for v in views]
        same = all(torch.equal(a, b) for a, b in zip(got, plain))
        assert same is (not teacher)
    with pytest.raises(ConfigError, match="teacher=true needs a host with a momentum teacher"):
        _module("plugins.batch_fusion={teacher: true}", method="simclr")


# ------------------------------------------------------------------------------------------- options, matrix
@pytest.mark.parametrize("override,needle", [
    ("plugins.batch_fusion.patch_size=0", "plugins.batch_fusion.patch_size"),
    ("plugins.batch_fusion.embed_dim=2.5", "plugins.batch_fusion.embed_dim"),
    ("plugins.batch_fusion.layers=0", "plugins.batch_fusion.layers"),
    ("plugins.batch_fusion.heads=3", "plugins.batch_fusion.heads"),  # 32 is not divisible by 3
    ("plugins.batch_fusion.mixer=conv", "plugins.batch_fusion.mixer"),
    ("plugins.batch_fusion.strength=fixed", "plugins.batch_fusion.strength"),
    ("plugins.batch_fusion.max_strength=-1", "plugins.batch_fusion.max_strength"),
    ("plugins.batch_fusion.max_strength=.inf", "plugins.batch_fusion.max_strength"),
    ("plugins.batch_fusion.placement=layer1", "plugins.batch_fusion.placement"),
    ("plugins.batch_fusion.placement=stage3", "stem, stage1, stage2"),  # the configured backbone has 2 stages
    ("plugins.batch_fusion={placement: stage1, teacher: true}", "plugins.batch_fusion.teacher"),
    ("plugins.batch_fusion={placement: stage1}", "train.compile"),
    ("plugins.batch_fusion.lr_factor=0", "plugins.batch_fusion.lr_factor"),
    ("plugins.batch_fusion.gate=1", "plugins.batch_fusion.gate"),
    ("plugins.batch_fusion.mixer=linear", "method.options.bn_splits=8"),  # MoCo's emulated shuffling BN
])
def test_bad_options_are_refused_in_one_line(override, needle):
    extra = ["train.compile=true"] if "compile" in needle else []
    assert_config_refused(["method.name=moco", "model.widths=[8, 16]", override, *extra], needle)


def test_valid_stage_names_and_linear_mixer_on_moco_without_groups():
    load_config(None, ["model.backbone=resnet18", "plugins.batch_fusion.placement=stage4"])
    load_config(None, ["model.backbone=convnet", "plugins.batch_fusion.placement=stage4"])
    with pytest.raises(ConfigError, match="input or a stage of model.backbone=convnet"):
        load_config(None, ["model.backbone=convnet", "plugins.batch_fusion.placement=stem"])
    for ok in ("method.shuffle_bn=none", "method.options={bn_splits: 1}"):
        load_config(None, ["method.name=moco", "plugins.batch_fusion.mixer=linear", ok])


@pytest.mark.parametrize("method,loss", host_rows())
def test_every_host_is_compatible(method, loss):
    cfg = load_config(None, [f"method.name={method}", "plugins.batch_fusion={}"] + ([f"method.loss={loss}"] if loss
                                                                                   else []))
    assert cfg.plugins == {"batch_fusion": {}}


def test_stages_of_every_backbone_have_the_declared_channels():
    from contrastkit.models import build_backbone, stage_names

    for name, kw in [("small_resnet", {"widths": (8, 12, 20), "blocks": 2}), ("convnet", {"widths": (8, 16)}),
                     ("resnet18", {"cifar_stem": True}), ("resnet50", {})]:
        net, _ = build_backbone(name, in_channels=3, **kw)
        stages = backbone_stages(net)
        model_cfg = load_config(None, [f"model.backbone={name}"]).model
        model_cfg.widths = list(kw.get("widths", model_cfg.widths))
        assert list(stages) == stage_names(name, model_cfg)
        seen = {}
        handles = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out.shape[1]))
                   for n, (m, _) in stages.items()]
        net.eval()(torch.zeros(1, 3, 32, 32))
        for h in handles:
            h.remove()
        assert seen == {n: c for n, (_, c) in stages.items()}


def test_linear_mixer_refuses_another_batch_size():
    plugin = make_plugin(batch_size=4, mixer="linear", strength="ramp")
    plugin.fuse(torch.randn(4, 2, 8, 8, dtype=torch.float64), 0.5)
    with pytest.raises(ConfigError) as e:
        plugin.fuse(torch.randn(3, 2, 8, 8, dtype=torch.float64), 0.5)
    assert "mixer=linear maps batches of exactly 4 samples but got 3" in str(e.value) and "\n" not in str(e.value)


def test_parameters_train_in_their_own_group():
    module = _module("plugins.batch_fusion={layers: 2, lr_factor: 0.5}")
    groups = {g.name: g for g in module.method.parameter_groups()}
    plugin = module.method.plugins.items["batch_fusion"]
    assert groups["plugins.batch_fusion"].lr_factor == 0.5
    assert {id(p) for p in groups["plugins.batch_fusion"].params} == {id(p) for p in plugin.parameters()}
    assert not any(id(p) in {id(q) for q in plugin.parameters()} for p in groups["backbone"].params)
    assert "method.plugins.items.batch_fusion.gates.1" in module.state_dict()


# ------------------------------------------------------------------------------------------------ whole runs
#: The hosts of the identity test: every host of the plug-in tests, and All4One (one line per new host).
IDENTITY_HOSTS = {**HOSTS, "all4one": ["method.name=all4one", "method.loss=infonce", "method.queue_size=128"]}


@pytest.mark.slow
@pytest.mark.parametrize("host", list(IDENTITY_HOSTS))
def test_strength_zero_is_the_host_step_by_step(host, tmp_path):
    """``strength: ramp, max_strength: 0`` (the fused part is computed and multiplied by 0): the per-step losses of
    every host equal the host's own, exactly; the learned gate starts at 0, so its first step is the host's too."""
    overrides = IDENTITY_HOSTS[host]
    plain = per_step_losses(overrides, tmp_path / "plain")
    zero = per_step_losses(overrides + ["plugins.batch_fusion={strength: ramp, max_strength: 0, layers: 2}"],
                           tmp_path / "zero")
    assert zero == plain
    if host in ("simclr_infonce", "moco_infonce"):
        staged = per_step_losses(overrides + ["plugins.batch_fusion={strength: ramp, max_strength: 0, "
                                              "placement: stage1}"], tmp_path / "stage")
        assert staged == plain
        learned = per_step_losses(overrides + ["plugins.batch_fusion={strength: learned}"], tmp_path / "gate")
        assert learned[0] == plain[0] and learned != plain


@pytest.mark.slow
def test_fused_run_exports_a_plain_backbone(tmp_path):
    """A run with fusion at a stage: the checkpoint's backbone evaluates and exports plain; the export loads into a
    fresh backbone and gives the training module's own backbone outputs exactly; fusion is logged."""
    from contrastkit.checkpoint import load_module
    from contrastkit.export import export_backbone, load_backbone
    from contrastkit.models import SmallResNet
    from plugin_reference import tiny

    run = tmp_path / "run"
    from contrastkit.training.run import train

    train(load_config(None, tiny(run) + ["method.name=byol", "train.log_every_n_steps=1",
                                         "plugins.batch_fusion={placement: stage1, strength: both}"]))
    ckpt = run / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    plugin = module.method.plugins.items["batch_fusion"]
    assert plugin.gates[0].item() != 0.0  # the gate trained
    backbone = module.backbone.eval().to(memory_format=torch.contiguous_format)
    assert not any(m._forward_hooks for m in backbone.modules())
    out, side = export_backbone(ckpt, tmp_path / "backbone.pt")
    state = torch.load(out, weights_only=True)
    assert not any("batch_fusion" in k or "plugins" in k for k in state)
    net = SmallResNet(**json.loads(side.read_text())["args"])
    net.load_state_dict(state)  # strict
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), backbone(x), rtol=0, atol=0)
        torch.testing.assert_close(load_backbone(out)(x), backbone(x), rtol=0, atol=0)
    header, *rows = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    cols = header.split(",")
    for key in ("train/batch_fusion_strength", "train/batch_fusion_relative_norm"):
        values = [float(r.split(",")[cols.index(key)]) for r in rows if r.split(",")[cols.index(key)]]
        assert len(values) == 4 and all(math.isfinite(v) for v in values)
    from contrastkit.report import build_report

    md = build_report([run], tmp_path / "report").read_text()
    assert "batch_fusion_strength.png" in md and (tmp_path / "report" / "batch_fusion_relative_norm.png").is_file()


@pytest.mark.slow
def test_fused_resnet18_exports_into_plain_torchvision(tmp_path):
    from contrastkit.export import export_backbone

    module = _module("model.backbone=resnet18", "model.cifar_stem=true",
                     "plugins.batch_fusion={placement: stage2, strength: both}")
    module.method.plugins.begin_step(StepContext(progress=0.5))
    views = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    module.method.forward_loss(views, 0.5)["loss"].backward()  # a fused training forward, then evaluation
    path = tmp_path / "m.ckpt"
    torch.save({"epoch": 0, "global_step": 0, "state_dict": module.state_dict(),
                "hyper_parameters": dict(module.hparams)}, path)
    out, _ = export_backbone(path, tmp_path / "backbone.pt")
    tv = torchvision.models.resnet18(weights=None)
    tv.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    tv.maxpool, tv.fc = nn.Identity(), nn.Identity()
    tv.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = module.backbone.eval().to(memory_format=torch.contiguous_format)(x)
        torch.testing.assert_close(tv.eval()(x), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_resume_continues_exactly_with_batch_fusion(tiny_overrides, tmp_path):
    base = tiny_overrides + ["train.epochs=2", "train.knn_every_n_epochs=0", "eval.knn=false", "method.name=moco",
                             "method.loss=infonce", "method.queue_size=256",
                             "plugins.batch_fusion={strength: both, max_strength: 0.5, layers: 2}"]
    weights = assert_resume_exact(base, tmp_path)
    assert weights["method.plugins.items.batch_fusion.gates.0"].item() != 0.0  # the gate trained


@pytest.mark.slow
def test_composes_with_curation(tmp_path):
    """Curation picks the batch, fusion transforms the student's kept views (the scoring forward sees plain views):
    at strength 0 fusion leaves a curated run unchanged; with ASCL as well all three run and log together."""
    curated = ["plugins.curation={pool_factor: 2, warmup_epochs: 0, monitor_every_n_steps: 0}"]
    plain = per_step_losses(HOSTS["moco_infonce"] + curated, tmp_path / "cur")
    zero = per_step_losses(HOSTS["moco_infonce"] + curated + ["plugins.batch_fusion={strength: ramp, max_strength: 0}"],
                           tmp_path / "zero")
    assert zero == plain
    three = per_step_losses(HOSTS["moco_infonce"] + curated + ["plugins.ascl={}", "train.log_every_n_steps=1",
                                                               "plugins.batch_fusion={mixer: linear, strength: both}",
                                                               "method.options={bn_splits: 1}"], tmp_path / "all")
    assert all(math.isfinite(x) for x in three) and three != plain
    header = (tmp_path / "all" / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/curation_rejected", "train/ascl_confidence", "train/batch_fusion_strength"} <= set(header)


@pytest.mark.slow
def test_composes_with_ascl(tmp_path):
    plain = per_step_losses(HOSTS["moco_infonce"] + ["plugins.ascl={neighbours: 3}"], tmp_path / "ascl")
    both = per_step_losses(HOSTS["moco_infonce"] + ["plugins.ascl={neighbours: 3}",
                                                    "plugins.batch_fusion={strength: ramp, max_strength: 0}"],
                           tmp_path / "both")
    assert both == plain  # fusion at strength 0 leaves ASCL's run unchanged
    fused = per_step_losses(HOSTS["byol"] + ["plugins.ascl={}", "plugins.batch_fusion={strength: both}",
                                             "train.log_every_n_steps=1"], tmp_path / "byol")
    assert all(math.isfinite(x) for x in fused)
    header = (tmp_path / "byol" / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/ascl_confidence" in header and "train/batch_fusion_strength" in header


def _ddp_worker(rank: int, world: int, tmp: str, fusion: str) -> dict:
    from contrastkit.training.run import train

    from test_training_distributed import OVERRIDES

    res = train(load_config(None, OVERRIDES + [f"train.run_dir={Path(tmp) / 'run'}", "train.epochs=1",
                                               f"plugins.batch_fusion={fusion}"]))
    ckpt = torch.load(Path(tmp) / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    return {"steps": res.metrics["steps"],
            "fusion": {k: v for k, v in ckpt["state_dict"].items() if "batch_fusion" in k}}


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["{strength: ramp, max_strength: 0}", "{strength: learned, placement: stage1}"])
def test_ddp_with_a_zero_strength_trains(fusion, tmp_path):
    """2 gloo processes through Lightning's DDP strategy: a zero strength (all fusion parameters in the graph with
    zero gradients) and a gate starting at 0 train without DDP's unused-parameter error."""
    results = run_gloo(_ddp_worker, 2, tmp_path, str(tmp_path), fusion, timeout_s=400, launcher="lightning")
    assert [r["steps"] for r in results] == [256 // 2 // 32] * 2
    assert results[0]["fusion"] and all(torch.isfinite(v).all() for v in results[0]["fusion"].values())


@pytest.mark.slow
def test_bench_throughput_runs_with_and_without_fusion(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    records = bench_records(["--method", "simclr", "--plugins", "batch_fusion"], ["plugins.batch_fusion.layers=2"],
                            capsys)
    assert [r["plugins"] for r in records] == ["-", "batch_fusion"]
    assert "plugins.batch_fusion.layers=2" in records[1]["overrides"]
    assert all(r["model_images_per_sec"] > 0 for r in records)


def test_registered():
    assert PLUGINS["batch_fusion"] is BatchFusion
