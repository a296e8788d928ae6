"""Optimisers and schedule, backbones and heads, configuration loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from contrastkit.config import Config, load_config, scaled_lr
from contrastkit.errors import ConfigError
from contrastkit.methods.base import ParamGroup
from contrastkit.models import build_backbone, mlp
from contrastkit.training.optim import LARS, build_optimizer, split_decay, warmup_cosine


# ------------------------------------------------------------------------------------------------ schedule and lr
def test_warmup_cosine_values():
    f = warmup_cosine(total_steps=110, warmup_steps=10, start_factor=0.0, min_factor=0.1)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # clamped after the end
    vals = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("rule, expected", [("linear", 0.3 * 4), ("sqrt", 0.3 * 2), ("none", 0.3)])
def test_lr_scaling_rule(rule, expected):
    cfg = load_config(None, [f"optim.lr_scaling={rule}", "optim.lr=0.3", "optim.batch_size=256"])
    assert scaled_lr(cfg, world_size=4) == pytest.approx(expected)
    cfg.optim.accumulate_grad_batches = 2
    ratio = {"linear": 8, "sqrt": math.sqrt(8), "none": 1}[rule]
    assert scaled_lr(cfg, world_size=4) == pytest.approx(0.3 * ratio)


# ------------------------------------------------------------------------------------------------ parameter groups
def test_no_weight_decay_on_bn_and_bias():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(2, 3, 5, 5))
    head = nn.Linear(2, 2)
    groups = split_decay([ParamGroup("backbone", list(net.parameters())), ParamGroup("predictor", list(head.parameters()), 10.0)],
                         lr=0.5, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "predictor", "predictor_no_decay"}
    assert all(p.ndim > 1 for p in by_name["backbone"]["params"]) and by_name["backbone"]["weight_decay"] == 1e-4
    assert all(p.ndim <= 1 for p in by_name["backbone_no_decay"]["params"])
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    assert by_name["predictor"]["lr"] == pytest.approx(5.0)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(net.parameters())) + 2
    with pytest.raises(ValueError):
        split_decay([ParamGroup("a", list(head.parameters())), ParamGroup("b", list(head.parameters()))], 0.1, 0.0)


def _lars_reference(w, g, buf, lr, wd, eta, momentum, clip, adapt=True, eps=1e-8):
    """One LARS step in float64 NumPy, written from solo-learn's update rule (solo/utils/lars.py): a zero weight or
    gradient norm gets neither weight decay nor adaptation; the clipped ratio at lr = 0 is its limit, 1."""
    if not adapt:  # biases and BN: SGD with weight decay
        d = g + wd * w
    elif np.linalg.norm(w) == 0 or np.linalg.norm(g) == 0:
        d = g
    else:
        ratio = eta * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w) + eps)
        if clip:
            ratio = 1.0 if lr == 0 else min(ratio / lr, 1.0)
        d = ratio * (g + wd * w)
    buf = d.copy() if buf is None else momentum * buf + d
    return w - lr * buf, buf


# step: (lr, which weights are zeroed before the step, which gradients are zero)
LARS_STEPS = [(0.7, (), ()), (0.0, (), ()), (0.7, ("w0",), ()), (0.5, (), ("w",)), (0.0, ("w0",), ("b",)),
              (0.3, (), ())]


@pytest.mark.parametrize("clip", [True, False])
def test_lars_matches_reference(clip):
    """LARS against the NumPy reference over steps with lr = 0, zero weights and zero gradients (with momentum, so
    each step's buffer carries into the next)."""
    torch.manual_seed(0)
    init = {"w": torch.randn(7, 5, dtype=torch.float64), "w0": torch.randn(4, 3, dtype=torch.float64),
            "b": torch.randn(5, dtype=torch.float64)}
    params = {k: nn.Parameter(v.clone()) for k, v in init.items()}
    opt = LARS([dict(params=[params["w"], params["w0"]], weight_decay=1e-3, lars_adapt=True),
                dict(params=[params["b"]], weight_decay=1e-4, lars_adapt=False)],
               lr=0.7, momentum=0.9, eta=0.02, clip_lr=clip)
    ref = {k: v.numpy().copy() for k, v in init.items()}
    bufs: dict[str, np.ndarray | None] = dict.fromkeys(init)
    for lr, zero_weights, zero_grads in LARS_STEPS:
        for group in opt.param_groups:
            group["lr"] = lr
        for k in zero_weights:
            with torch.no_grad():
                params[k].zero_()
            ref[k] = np.zeros_like(ref[k])
        grads = {k: torch.zeros_like(v) if k in zero_grads else torch.randn_like(v) for k, v in init.items()}
        for k, p in params.items():
            p.grad = grads[k].clone()
        opt.step()
        for k in init:
            wd = 1e-4 if k == "b" else 1e-3
            ref[k], bufs[k] = _lars_reference(ref[k], grads[k].numpy(), bufs[k], lr, wd, 0.02, 0.9, clip,
                                              adapt=k != "b")
            np.testing.assert_allclose(params[k].detach().numpy(), ref[k], rtol=1e-12, atol=1e-14, err_msg=k)
            np.testing.assert_allclose(opt.state[params[k]]["momentum_buffer"].numpy(), bufs[k], rtol=1e-12,
                                       atol=1e-14, err_msg=f"{k} momentum buffer")
    assert not np.array_equal(ref["w0"], np.zeros_like(ref["w0"]))  # the zeroed weight moved again afterwards


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    cfg = load_config(None, [f"optim.name={name}"])
    opt = build_optimizer([ParamGroup("all", list(nn.Linear(3, 3).parameters()))], cfg.optim, lr=0.1)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_backbones(name, dim, channels):
    net, d = build_backbone(name, channels, cifar_stem=True)
    assert d == dim
    out = net.eval()(torch.randn(2, channels, 32, 32))
    assert out.shape == (2, dim)
    # the CIFAR stem keeps 32 px resolution into layer1 (3x3 stride-1 conv, no max-pool)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)


def test_resnet_state_dict_loads_into_torchvision():
    net, _ = build_backbone("resnet18", 3, cifar_stem=False)
    tv = torchvision.models.resnet18(weights=None)
    tv.fc = nn.Identity()
    tv.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv.eval()(x), net.eval()(x))


def test_convnet_layout_and_small_inputs():
    net, d = build_backbone("convnet", 1)
    assert d == 256
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    # floor-mode pools: 28 -> 14 -> 7 -> 3 -> 1, i.e. the last block sees 3x3 maps
    sizes = []
    net.features[-1].register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
    net.features[-4].register_forward_hook(lambda m, i, o: sizes.append(tuple(i[0].shape[-2:])))
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 256)
    assert sizes == [(3, 3), (1, 1)]
    with pytest.raises(ValueError, match="at least 16 px") as e:  # a caller's mistake: not a user error
        net(torch.randn(2, 1, 8, 8))
    assert not isinstance(e.value, ConfigError)


def test_convnet_crops_too_small_are_refused_when_the_run_is_set_up():
    from contrastkit.config import load_config
    from contrastkit.training.module import SSLModule

    cfg = load_config(None, ["model.backbone=convnet", "views.crop_size=12"])
    with pytest.raises(ConfigError, match="at least 16 px, got 12 px crops"):
        SSLModule(cfg.to_dict(), 1, 28, [0.5], [0.25], steps_per_epoch=1)
    cfg = load_config(None, ["model.backbone=convnet", "model.widths=[8, 16, 32]", "views.crop_size=12"])
    SSLModule(cfg.to_dict(), 1, 28, [0.5], [0.25], steps_per_epoch=1)  # 3 blocks need 8 px


def test_small_resnet_shapes():
    net, d = build_backbone("small_resnet", 1, widths=[8, 16, 32], blocks=2, stem_stride=2)
    assert d == 32
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 32)
    with pytest.raises(ConfigError, match="backbone"):
        build_backbone("vgg", 3)


def test_mlp_head_layout():
    head = mlp(16, 32, 8, num_layers=3, hidden_bn=True, last_bn=True, last_bn_affine=False)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[-1].affine is False
    assert head(torch.randn(4, 16)).shape == (4, 8)
    assert [type(m).__name__ for m in mlp(16, 32, 8, num_layers=1)] == ["Linear"]


# ------------------------------------------------------------------------------------------------ config
def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\n  name: adamw\nmethod:\n  loss: dclw\n")
    cfg = load_config(p, ["optim.lr=2e-3", "model.widths=[8, 16]", "train.devices=2"])
    assert cfg.optim.name == "adamw" and cfg.optim.lr == pytest.approx(2e-3)
    assert cfg.method.loss == "dclw" and cfg.model.widths == [8, 16] and cfg.train.devices == 2


@pytest.mark.parametrize("bad", ["optim.lr=0", "method.temperature=-1", "optim.name=rmsprop", "model.widths=3",
                                 "train.epochs=1.5", "views.num_views=1", "optim.nope=1", "optim=3", "lr=0.1"])
def test_config_rejects_bad_values(bad):
    key = bad.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1] if "." in key else key):
        load_config(None, [bad])


def test_presets_load():
    for preset in ["configs/fmnist_simclr_dcl.yaml", "configs/cifar10_simclr_resnet18.yaml"]:
        cfg = load_config(preset)
        assert isinstance(cfg, Config)
