"""Reports, pictures, export / load / embed of the backbone, the feature cache, checkpoint safety, online probe."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import contrastkit
from contrastkit.checkpoint import load_module
from contrastkit.cli import main
from contrastkit.config import load_config
from contrastkit.data import load_dataset
from contrastkit.errors import ContrastkitError, DataError
from contrastkit.evaluation import CheckpointEvaluator, extract_features, knn_evaluate
from contrastkit.evaluation import offline as offline_mod
from contrastkit.export import export_backbone, load_backbone, read_backbone_info, sidecar_path
from contrastkit.methods import METHODS
from contrastkit.report import build_report, read_metrics_csv
from contrastkit.training.module import SSLModule
from contrastkit.training.run import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(run_dir: Path, *extra: str) -> list[str]:
    """A seconds-long run on 512 synthetic 16 px images (as tests/conftest.py's tiny_overrides)."""
    return [
        "data.name=synthetic", "data.image_size=16", "data.options={n: 512, channels: 3}",
        "views.common={blur_prob: 0.0}", "model.backbone=small_resnet", "model.widths=[16, 32]",
        "model.stem_stride=1", "method.proj_hidden_dim=64", "method.proj_out_dim=32", "optim.batch_size=64",
        "optim.lr=0.1", "train.epochs=2", "train.accelerator=cpu", "train.devices=1", "train.progress_bar=false",
        "train.knn_k=20", "train.log_every_n_steps=2", "eval.batch_size=256", f"train.run_dir={run_dir}", *extra,
    ]


#: The second run's method: Barlow Twins where that method is available, else SimCLR (with another loss).
SECOND_METHOD = "barlow" if "barlow" in METHODS else "simclr"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two short finished runs: SimCLR+DCL and SECOND_METHOD (InfoNCE)."""
    root = tmp_path_factory.mktemp("runs")
    a = train(load_config(None, _tiny(root / "run_a", "method.loss=dcl"))).run_dir
    second_loss = [] if SECOND_METHOD == "barlow" else ["method.loss=infonce"]  # Barlow Twins has its own loss
    b = train(load_config(None, _tiny(root / "run_b", f"method.name={SECOND_METHOD}", *second_loss))).run_dir
    return {"simclr": a, "second": b}


@pytest.fixture
def ckpt(runs, tmp_path) -> Path:
    """A private copy of the SimCLR run's last checkpoint (its cache folder starts empty)."""
    dst = tmp_path / "model.ckpt"
    shutil.copy2(runs["simclr"] / "checkpoints" / "last.ckpt", dst)
    return dst


def _is_png(path: Path) -> bool:
    from PIL import Image

    if not path.is_file() or path.read_bytes()[:8] != PNG_MAGIC:
        return False
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size[0] > 100 and im.size[1] > 100


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# export / load_backbone


def _backbone_module(tmp_path: Path, channels: int = 3, *model: str) -> tuple[SSLModule, Path]:
    """An SSLModule with the backbone ``model`` overrides describe and non-trivial BN statistics, saved in the
    Lightning checkpoint layout."""
    cfg = load_config(None, [*model, "data.name=synthetic", "data.image_size=16"])
    torch.manual_seed(0)
    mean, std = [0.4, 0.5, 0.6][:channels], [0.2, 0.25, 0.3][:channels]
    module = SSLModule(cfg.to_dict(), channels, 16, mean, std, steps_per_epoch=1)
    with torch.no_grad():
        for m in module.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path / "backbone.ckpt"
    torch.save({"epoch": 0, "global_step": 0, "state_dict": module.state_dict(),
                "hyper_parameters": dict(module.hparams)}, path)
    return module.eval(), path


def _resnet18_module(tmp_path: Path) -> tuple[SSLModule, Path]:
    """A resnet18 (CIFAR stem) SSLModule with non-trivial BN statistics, saved in the Lightning checkpoint layout."""
    return _backbone_module(tmp_path, 3, "model.backbone=resnet18", "model.cifar_stem=true")


#: Every backbone contrastkit builds, with non-default arguments: (image channels, model overrides).
EVERY_BACKBONE = {
    "resnet18-cifar-1ch": (1, ["model.backbone=resnet18", "model.cifar_stem=true"]),
    "resnet18-imagenet-stem-2ch": (2, ["model.backbone=resnet18", "model.cifar_stem=false"]),
    "resnet18-imagenet-stem-3ch": (3, ["model.backbone=resnet18", "model.cifar_stem=false"]),
    "resnet50-cifar-3ch": (3, ["model.backbone=resnet50", "model.cifar_stem=true"]),
    "small_resnet": (1, ["model.backbone=small_resnet", "model.widths=[8, 12, 20]", "model.blocks=2",
                         "model.stem_stride=1"]),
    "convnet-default": (1, ["model.backbone=convnet"]),
    "convnet": (3, ["model.backbone=convnet", "model.widths=[8, 16, 24]"]),
}


@pytest.mark.parametrize("name", list(EVERY_BACKBONE))
def test_export_of_every_backbone_loads_back(name, tmp_path):
    channels, overrides = EVERY_BACKBONE[name]
    module, path = _backbone_module(tmp_path, channels, *overrides)
    out, side = export_backbone(path, tmp_path / "export" / "backbone.pt")
    info = json.loads(side.read_text())
    x = torch.randn(2, channels, 16, 16)
    with torch.no_grad():
        expected = module.backbone.to(memory_format=torch.contiguous_format)(x)
        assert info["feature_dim"] == expected.shape[1]
        got = contrastkit.load_backbone(out)(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        if info["torchvision"] is not None:  # a fresh torchvision model built exactly as the sidecar says
            recipe = info["torchvision"]
            scope = {"torchvision": torchvision, "nn": nn}
            tv = eval(recipe["constructor"], scope)
            for part in ("conv1", "maxpool", "fc"):
                if recipe[part] != "unchanged":
                    setattr(tv, part, eval(recipe[part], scope))
            tv.load_state_dict(torch.load(out, weights_only=True))  # strict: same keys and shapes
            torch.testing.assert_close(tv.eval()(x), expected, rtol=0, atol=0)
        else:  # contrastkit's own classes take the sidecar's args as they are
            from contrastkit.models import ConvNet, SmallResNet

            cls = {"convnet": ConvNet, "small_resnet": SmallResNet}[info["architecture"]]
            net = cls(**info["args"])
            net.load_state_dict(torch.load(out, weights_only=True))
            torch.testing.assert_close(net.eval()(x), expected, rtol=0, atol=0)


def test_small_resnet_stem_stride_default_is_the_configs():
    import inspect

    from contrastkit.config import ModelConfig
    from contrastkit.models import SmallResNet, build_backbone

    default = ModelConfig().stem_stride
    assert inspect.signature(SmallResNet).parameters["stem_stride"].default == default
    assert inspect.signature(build_backbone).parameters["stem_stride"].default == default


def test_export_resnet18_loads_into_plain_torchvision(tmp_path, capsys):
    module, path = _resnet18_module(tmp_path)
    out = tmp_path / "export" / "backbone.pt"
    assert main(["export", str(path), "--out", str(out)]) == 0
    info = json.loads(sidecar_path(out).read_text())
    assert info["architecture"] == "resnet18" and info["args"] == {"in_channels": 3, "cifar_stem": True}
    assert info["mean"] == [0.4, 0.5, 0.6] and info["std"] == [0.2, 0.25, 0.3] and info["feature_dim"] == 512

    # plain torchvision + torch, exactly as docs/evaluation.md describes: no contrastkit code
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and not any(k.startswith("fc.") for k in state)
    tv = torchvision.models.resnet18(weights=None)
    tv.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    tv.maxpool = nn.Identity()
    tv.fc = nn.Identity()
    tv.load_state_dict(state)  # strict: same keys, same shapes
    tv.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # the trained module runs channels-last (model.channels_last); a plain torchvision model is channels-first,
        # and the two memory formats pick different conv kernels: identical outputs are compared in one format
        trained_cl = module.backbone(x)
        expected = module.backbone.to(memory_format=torch.contiguous_format)(x)
        torch.testing.assert_close(trained_cl, expected, rtol=1e-4, atol=1e-5)  # float32 summation order
        torch.testing.assert_close(tv(x), expected, rtol=0, atol=0)
        # load_backbone from the export and from the checkpoint
        for src in (out, path):
            m = load_backbone(src)
            assert not m.training
            torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob(".*.tmp"))


def test_export_small_resnet_from_a_lightning_checkpoint(ckpt, tmp_path):
    from contrastkit.models import SmallResNet

    out, side = export_backbone(ckpt, tmp_path / "small.pt")
    info = json.loads(side.read_text())
    assert info["architecture"] == "small_resnet" and info["torchvision"] is None
    net = SmallResNet(**info["args"])  # only the model class
    net.load_state_dict(torch.load(out, weights_only=True))
    net.eval()
    reference = load_module(ckpt).backbone.eval().to(memory_format=torch.contiguous_format)  # as trained: channels-last
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(contrastkit.load_backbone(out)(x), reference(x), rtol=0, atol=0)
    assert read_backbone_info(out).input_size == 16
    assert read_backbone_info(ckpt).feature_dim == 32


def test_load_backbone_refuses_mismatched_or_missing_sidecar(ckpt, tmp_path):
    out, side = export_backbone(ckpt, tmp_path / "b.pt")
    state = torch.load(out, weights_only=True)
    state[next(iter(state))] += 1.0
    torch.save(state, out)  # other weights, old sidecar
    with pytest.raises(ContrastkitError, match="SHA-256"):
        load_backbone(out)
    side.unlink()
    with pytest.raises(ContrastkitError, match="sidecar"):
        load_backbone(out)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": _Evil(marker)}, bad)
    legacy = tmp_path / "evil_legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))

    for path in (bad, legacy):
        with pytest.raises(ContrastkitError, match="refusing to load"):
            load_backbone(path)
        for args in (["export", str(path), "--out", str(tmp_path / "x.pt")], ["eval", "knn", str(path)],
                     ["embed", str(path), "synthetic", "--out", str(tmp_path / "f.npy")],
                     ["plot", "neighbours", str(path), "--out", str(tmp_path / "n.png")]):
            assert main(args) == 2
            assert "refusing to load" in _one_line_error(capsys)
    assert not marker.exists()
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "f.npy").exists()

    # control: the file really runs code when unpickled without weights_only
    control = tmp_path / "control"
    torch.save({"x": _Evil(control)}, tmp_path / "control.ckpt")
    torch.load(tmp_path / "control.ckpt", weights_only=False)
    assert control.exists()


# ---------------------------------------------------------------------------------------------------------------
# embed and the feature cache


def test_embed_writes_features_and_labels(ckpt, tmp_path, capsys):
    out = tmp_path / "emb" / "features.npy"
    assert main(["embed", str(ckpt), "synthetic", "--split", "test", "--out", str(out), "--device", "cpu"]) == 0
    feats = np.load(out)
    labels = np.load(tmp_path / "emb" / "features.labels.npy")
    ds = load_dataset("synthetic", split="test", image_size=16, n=512, channels=3)
    assert feats.shape == (512, 32) and feats.dtype == np.float32
    assert labels.shape == (512,) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, ds.labels.numpy())
    module = load_module(ckpt)
    hp = module.hparams
    ref = extract_features(module.backbone, ds.images, hp["mean"], hp["std"])
    np.testing.assert_allclose(feats, ref.numpy(), rtol=1e-5, atol=1e-5)

    npz = tmp_path / "emb.npz"
    assert main(["embed", str(ckpt), "synthetic", "--split", "train", "--out", str(npz), "--features", "projector",
                 "--device", "cpu"]) == 0
    with np.load(npz) as z:
        assert z["features"].shape == (512, 32) and z["labels"].shape == (512,)
    assert main(["embed", str(ckpt), "synthetic", "--out", str(tmp_path / "f.csv")]) == 2
    assert ".npy or .npz" in _one_line_error(capsys)


def test_feature_cache_is_reused_and_invalidated(ckpt, monkeypatch):
    calls = []
    real = offline_mod.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(offline_mod, "extract_features", counting)
    first = CheckpointEvaluator(ckpt, device="cpu").features("test")
    assert len(calls) == 1 and not first.from_cache
    cache = ckpt.with_name(ckpt.name + ".features") / "synthetic-test-backbone.pt"
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))

    # a second evaluator (a new process, in effect) does not run the model
    second = CheckpointEvaluator(ckpt, device="cpu").features("test")
    assert len(calls) == 1 and second.from_cache
    torch.testing.assert_close(second.features, first.features, rtol=0, atol=0)
    assert torch.equal(second.labels, first.labels)
    # another kind is another cache entry
    CheckpointEvaluator(ckpt, device="cpu").features("test", "projector")
    assert len(calls) == 2

    # the checkpoint changes (a later epoch overwrites last.ckpt): stale, recomputed
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = CheckpointEvaluator(ckpt, device="cpu").features("test")
    assert len(calls) == 3 and not third.from_cache
    # ... and cached again
    CheckpointEvaluator(ckpt, device="cpu").features("test")
    assert len(calls) == 3
    # no cache when asked
    CheckpointEvaluator(ckpt, device="cpu", cache=False).features("test")
    assert len(calls) == 4


# ---------------------------------------------------------------------------------------------------------------
# eval commands


def test_eval_knn_grid_and_linear_cli(ckpt, capsys):
    module = load_module(ckpt)
    hp = module.hparams
    # the checkpoint's defaults: the validation split against the training split without it
    bank = load_dataset("synthetic", split="train-minus-val", image_size=16, n=512, channels=3)
    query = load_dataset("synthetic", split="val", image_size=16, n=512, channels=3)
    fb = extract_features(module.backbone, bank.images, hp["mean"], hp["std"])
    fq = extract_features(module.backbone, query.images, hp["mean"], hp["std"])
    expected = knn_evaluate(fb, bank.labels, fq, query.labels, 10, k=20, temperature=0.1)

    assert main(["eval", "knn", str(ckpt), "--k", "20", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["top1"] == pytest.approx(expected["top1"]) and res["top5"] == pytest.approx(expected["top5"])
    assert res["features"] == "backbone" and res["k"] == 20
    assert (res["bank_split"], res["query_split"]) == ("train-minus-val", "val")

    assert main(["eval", "knn", str(ckpt), "--grid", "--ks", "5", "20", "--temperatures", "0.1", "0.2", "--json",
                 "--device", "cpu"]) == 0
    grid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(grid["grid"]) == 2 * 2 + 2  # cosine: k x T; euclidean: one row per k
    row = next(r for r in grid["grid"] if r["metric"] == "cosine" and r["k"] == 20 and r["temperature"] == 0.1)
    assert row["top1"] == pytest.approx(expected["top1"])

    assert main(["eval", "knn", str(ckpt), "--k", "20", "--features", "projector", "--json", "--device", "cpu"]) == 0
    proj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert proj["features"] == "projector"

    assert main(["eval", "linear", str(ckpt), "--epochs", "2", "--augmented", "--aug-passes", "2", "--json",
                 "--device", "cpu"]) == 0
    lin = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= lin["top1"] <= 100 and lin["augmented"]["passes"] == 2 and len(lin["grid"]) == 24
    cache = ckpt.with_name(ckpt.name + ".features")
    assert (cache / "synthetic-train_minus_val-backbone-aug0.pt").is_file()
    assert (cache / "synthetic-train_minus_val-backbone-aug1.pt").is_file()
    assert not (cache / "synthetic-train_minus_val-backbone-aug2.pt").exists()
    # an augmented 2-epoch probe is not the run's own protocol: stored apart from results-linear.json
    assert not (cache / "results-linear.json").exists()
    (saved,) = cache.glob("results-linear-*.json")
    assert json.loads(saved.read_text())["top1"] == lin["top1"]


def test_augmented_passes_are_seeded_and_distinct(ckpt):
    ev = CheckpointEvaluator(ckpt, device="cpu", cache=False)
    a0 = ev.augmented_features("train", pass_index=0).features
    a0_again = ev.augmented_features("train", pass_index=0).features
    a1 = ev.augmented_features("train", pass_index=1).features
    plain = ev.features("train").features
    torch.testing.assert_close(a0, a0_again, rtol=0, atol=0)
    assert not torch.allclose(a0, a1) and not torch.allclose(a0, plain)
    assert a0.shape == plain.shape == (512, 32)


# ---------------------------------------------------------------------------------------------------------------
# plots


def test_plot_embedding_and_neighbours(ckpt, tmp_path, capsys):
    emb = tmp_path / "emb.png"
    assert main(["plot", "embedding", str(ckpt), "--out", str(emb), "--num-points", "120", "--device", "cpu"]) == 0
    assert _is_png(emb)
    nb = tmp_path / "nb.png"
    assert main(["plot", "neighbours", str(ckpt), "--out", str(nb), "--queries", "3", "--k", "4",
                 "--device", "cpu"]) == 0
    assert _is_png(nb)
    assert "neighbours share the class" in capsys.readouterr().out
    try:
        import umap  # noqa: F401
    except ImportError:
        assert main(["plot", "embedding", str(ckpt), "--method", "umap", "--out", str(tmp_path / "u.png")]) == 2
        assert "umap-learn" in _one_line_error(capsys)
        assert not (tmp_path / "u.png").exists()


def test_plot_writes_the_format_of_its_extension(ckpt, tmp_path, capsys, monkeypatch):
    jpg = tmp_path / "nb.jpg"
    assert main(["plot", "neighbours", str(ckpt), "--out", str(jpg), "--queries", "2", "--k", "2",
                 "--device", "cpu"]) == 0
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    svg = tmp_path / "nb.svg"
    assert main(["plot", "neighbours", str(ckpt), "--out", str(svg), "--queries", "2", "--k", "2",
                 "--device", "cpu"]) == 0
    assert b"<svg" in svg.read_bytes()[:1000]

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation started before --out was checked")

    monkeypatch.setattr(offline_mod.CheckpointEvaluator, "__init__", no_work)
    assert main(["plot", "embedding", str(ckpt), "--out", str(tmp_path / "e.xyz")]) == 2
    err = _one_line_error(capsys)
    assert "e.xyz" in err and ".png" in err and ".jpg" in err
    assert not (tmp_path / "e.xyz").exists()


def test_unwritable_out_is_refused_before_any_work(runs, ckpt, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation started before --out was checked")

    monkeypatch.setattr(offline_mod.CheckpointEvaluator, "__init__", no_work)
    for args in (["export", str(ckpt), "--out", f"{blocker}/b.pt"],
                 ["embed", str(ckpt), "synthetic", "--out", f"{blocker}/f.npy"],
                 ["plot", "embedding", str(ckpt), "--out", f"{blocker}/e.png"],
                 ["plot", "neighbours", str(ckpt), "--out", f"{blocker}/n.png"],
                 ["report", str(runs["simclr"]), "--out", f"{blocker}/report"]):
        assert main(args) == 2, args
        err = _one_line_error(capsys)
        assert f"{blocker}/" in err and "cannot write" in err, err


def test_embed_error_names_its_own_flag(ckpt, capsys):
    assert main(["embed", str(ckpt), "imagefolder", "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert "--root" in err and "data.root" not in err, err


def test_neighbour_grid_marks_wrong_classes(ckpt, tmp_path):
    from contrastkit.evaluation.plots import plot_neighbours

    ev = CheckpointEvaluator(ckpt, device="cpu")
    _, info = plot_neighbours(ev, tmp_path / "n.png", num_queries=4, k=5)
    train_labels = ev.features("train-minus-val").labels.cpu()  # the default bank and query splits
    test_labels = ev.features("val").labels.cpu()
    wrong = sum(int(train_labels[n] != test_labels[q]) for q, row in zip(info["queries"], info["neighbours"])
                for n in row)
    assert info["wrong"] == wrong and len(info["neighbours"]) == 4 and all(len(r) == 5 for r in info["neighbours"])


# ---------------------------------------------------------------------------------------------------------------
# report


def _table(md: str) -> list[list[str]]:
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[2:]]  # skip header and separator


def test_report_compares_two_runs(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs["simclr"]), str(runs["second"]), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    rows = _table(md)
    assert [r[0] for r in rows] == ["run_a", "run_b"]
    assert [r[1] for r in rows] == ["simclr", SECOND_METHOD]
    assert [r[2] for r in rows] == ["-", "-"]  # no plug-ins
    assert rows[0][3] == "dcl" and rows[1][3] == ("barlow twins" if SECOND_METHOD == "barlow" else "infonce")
    for row, key in zip(rows, ("simclr", "second")):
        res = json.loads((runs[key] / "results.json").read_text())
        assert row[6] == "64" and row[7] == "2"
        assert row[8] == f"{res['knn_top1_val']:.2f}" and row[9] == f"{res['knn_top1_test']:.2f}"
        assert row[12] == f"{res['images_per_sec']:.0f}"
    for name in ("loss.png", "knn_top1.png", "lr.png"):
        assert _is_png(out / name), name
        assert f"]({name})" in md
    assert not list(out.glob(".*.tmp"))


def test_report_counts_only_the_runs_own_protocol_as_its_linear_top1(runs, tmp_path, capsys):
    # A 2-epoch transfer probe on another dataset is listed with its settings, never as the run's linear top-1;
    # the probe on the run's own protocol (its dataset, eval.linear_epochs epochs) is, and is not replaced.
    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(runs["simclr"], run)  # copy2 keeps last.ckpt's mtime
    ckpt = run / "checkpoints" / "last.ckpt"
    other = tmp_path / "other"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (other / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(other / split / c / f"{i}.png")
    assert main(["eval", "linear", str(ckpt), "data.monitor_query_split=test", "--epochs", "100", "--device", "cpu",
                 "--json"]) == 0
    own = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "linear", str(ckpt), "data.name=imagefolder", f"data.root={other}", "data.image_size=16",
                 "data.options={}", "--epochs", "2", "--device", "cpu"]) == 0
    assert "not the run's own protocol" in capsys.readouterr().err
    md = build_report([run], tmp_path / "r").read_text()
    assert _table(md)[0][10] == f"{own['top1']:.2f} (eval)"
    other_lines = [ln for ln in md.splitlines() if ln.startswith("- `run`: linear top-1")]
    assert len(other_lines) == 1 and "on imagefolder val (bank train-minus-val), 2 epochs, backbone features" in other_lines[0]

    # Without the own-protocol probe, the table has no linear top-1 at all.
    (ckpt.with_name(ckpt.name + ".features") / "results-linear.json").unlink()
    md = build_report([run], tmp_path / "r").read_text()
    assert _table(md)[0][10] == "-" and "Other evaluations" in md


def test_report_marks_incomplete_runs_and_refuses_non_runs(runs, tmp_path, capsys):
    running = tmp_path / "still_running"
    shutil.copytree(runs["second"], running)
    (running / "results.json").unlink()
    md = build_report([runs["simclr"], running], tmp_path / "r").read_text()
    rows = _table(md)
    assert len(rows) == 2 and "incomplete" in rows[1][7] and rows[1][8] == "-"
    assert "Incomplete runs" in md

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r2")]) == 2
    assert "not a contrastkit run directory" in _one_line_error(capsys)
    assert not (tmp_path / "r2" / "report.md").exists()


def test_metrics_csv_epochs(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,knn/top1,step,train/loss,train/lr\n0,,1,5.0,0.1\n0,,3,4.0,0.2\n0,50.0,3,,\n"
                   "1,,5,3.0,0.1\n1,,7,2.0,0.0\n1,60.0,7,,\n")
    curves = read_metrics_csv(csv)
    assert curves["train/loss"] == [(0.5, 5.0), (1.0, 4.0), (1.5, 3.0), (2.0, 2.0)]
    assert curves["knn/top1"] == [(1.0, 50.0), (2.0, 60.0)]


# ---------------------------------------------------------------------------------------------------------------
# online linear probe


class _GradRecorder(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                           if p.grad is not None})


def _probe_run(tmp_path: Path, name: str, *extra: str, callbacks=()):
    rec = _GradRecorder()
    cfg = load_config(None, _tiny(tmp_path / name, "train.epochs=1", "train.knn_every_n_epochs=0", "eval.knn=false",
                                  "train.log_every_n_steps=1", *extra))
    res = train(cfg, callbacks=[rec, *callbacks])
    state = torch.load(res.last_checkpoint, weights_only=True)["state_dict"]
    return rec.grads, state, res


class _LeakyProbe(L.Callback):
    """Control: a probe that runs the backbone in train mode (BN statistics move) must be detected."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            pl_module.backbone(pl_module.images[batch].float() / 255)


def test_online_linear_probe_leaves_ssl_gradients_unchanged(tmp_path):
    g_off, s_off, _ = _probe_run(tmp_path, "off")
    g_on, s_on, res = _probe_run(tmp_path, "on", "train.online_linear=true")
    assert len(g_off) == len(g_on) == 8 and g_off[0]
    for step, (a, b) in enumerate(zip(g_off, g_on)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"step {step}: gradient of {k} changed")
    assert s_off.keys() == s_on.keys()  # the probe is not part of the model
    for k in s_off:
        torch.testing.assert_close(s_off[k], s_on[k], rtol=0, atol=0, msg=f"{k} changed")
    # it did train and log
    assert 0 <= res.metrics["online_linear_top1"] <= 100
    curves = read_metrics_csv(res.run_dir / "logs" / "csv" / "metrics.csv")
    assert len(curves["online_linear/acc"]) == 1
    head = torch.load(res.last_checkpoint, weights_only=True)["callbacks"]["OnlineLinearProbe"]["head"]
    assert head["1.weight"].abs().sum() > 0
    # control: the comparison does catch a probe that disturbs the model
    _, s_leak, _ = _probe_run(tmp_path, "leak", callbacks=[_LeakyProbe()])
    assert any(not torch.equal(s_off[k], s_leak[k]) for k in s_off)


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_online_linear_probe_resumes_exactly(tmp_path):
    base = _tiny(tmp_path / "x", "train.knn_every_n_epochs=0", "eval.knn=false", "train.online_linear=true")
    full = train(load_config(None, base + [f"train.run_dir={tmp_path / 'full'}"]))
    train(load_config(None, base + [f"train.run_dir={tmp_path / 'part'}"]), callbacks=[_StopAfterFirstEpoch()])
    resumed = train(load_config(None, base + [f"train.run_dir={tmp_path / 'part'}", "train.resume=last"]))
    assert resumed.metrics["online_linear_history"] == full.metrics["online_linear_history"]
    a, b = (torch.load(r.last_checkpoint, weights_only=True)["callbacks"]["OnlineLinearProbe"] for r in (full, resumed))
    for k in a["head"]:
        torch.testing.assert_close(a["head"][k], b["head"][k], rtol=0, atol=0)


def test_online_linear_needs_a_labelled_train_split(tmp_path):
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 50, 10, 10)).save(folder / f"{i}.png")
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={folder}", "data.image_size=16",
                             f"data.options={{cache_dir: {tmp_path / 'cache'}}}", "data.monitor_bank_split=null",
                             "data.monitor_query_split=null", "eval.knn=false", "train.online_linear=true",
                             "train.accelerator=cpu", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="train.online_linear"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_evaluation_matches_cpu(ckpt, tmp_path):
    cpu = CheckpointEvaluator(ckpt, device="cpu", cache=False)
    gpu = CheckpointEvaluator(ckpt, device="cuda", cache=False)
    f = gpu.features("test")
    assert f.features.device.type == "cuda" and f.labels.device.type == "cuda"
    torch.testing.assert_close(f.features.cpu(), cpu.features("test").features, rtol=1e-3, atol=1e-3)
    assert abs(gpu.knn(k=20)["top1"] - cpu.knn(k=20)["top1"]) <= 1.0
    assert gpu.augmented_features("train", pass_index=0).features.device.type == "cuda"
    assert 0 <= gpu.linear(epochs=1, lr=0.01, weight_decay=0.0)["top1"] <= 100
    res = train(load_config(None, _tiny(tmp_path / "gpu", "train.accelerator=gpu", "train.epochs=1",
                                        "train.online_linear=true", "train.knn_every_n_epochs=0", "eval.knn=false")))
    assert 0 <= res.metrics["online_linear_top1"] <= 100
