"""Tests of contrastkit.losses: values and gradients against plain-loop float64 references, invariances, mixed
precision, configuration errors and the single-process behaviour of the distributed helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from contrastkit import distributed
from contrastkit.errors import ConfigError
from contrastkit.losses import (
    DCLLoss,
    DCLWLoss,
    InfoNCELoss,
    build_loss,
    contrastive_from_logits,
    dclw_weights,
)

BATCH_SIZES = [2, 5, 16]
TEMPERATURES = [0.07, 0.1, 0.5, 1.0]
SIGMAS = [0.1, 0.5, 2.0]
DIM = 8


# ----------------------------------------------------------------------------------------------------------------------
# Independent reference: explicit loops over anchors and candidates, float64, autograd for the gradient
# ----------------------------------------------------------------------------------------------------------------------


def reference_loss(z1: Tensor, z2: Tensor, temperature: float, kind: str, sigma: float = 0.5) -> Tensor:
    """Loss of ``kind`` in {"infonce", "dcl", "dclw"} written as the paper's sums, one anchor at a time."""
    n = z1.shape[0]
    u = [z1[i] / torch.sqrt(torch.sum(z1[i] * z1[i])) for i in range(n)]
    u += [z2[i] / torch.sqrt(torch.sum(z2[i] * z2[i])) for i in range(n)]

    weights = [1.0] * n
    if kind == "dclw":  # detached: computed from Python floats
        sims = [float(torch.dot(u[j], u[n + j]).detach()) for j in range(n)]
        denom = sum(math.exp(s / sigma) for s in sims)
        weights = [2.0 - n * math.exp(s / sigma) / denom for s in sims]

    total = torch.zeros((), dtype=torch.float64)
    for a in range(2 * n):
        p = a + n if a < n else a - n
        pos = torch.dot(u[a], u[p]) / temperature
        neg_sum = torch.zeros((), dtype=torch.float64)
        for k in range(2 * n):
            if k not in (a, p):
                neg_sum = neg_sum + torch.exp(torch.dot(u[a], u[k]) / temperature)
        if kind == "infonce":
            loss_a = -pos + torch.log(torch.exp(pos) + neg_sum)
        else:
            loss_a = -weights[a % n] * pos + torch.log(neg_sum)
        total = total + loss_a
    return total / (2 * n)


def make_loss(kind: str, temperature: float, sigma: float = 0.5) -> torch.nn.Module:
    if kind == "infonce":
        return InfoNCELoss(temperature=temperature)
    if kind == "dcl":
        return DCLLoss(temperature=temperature)
    return DCLWLoss(temperature=temperature, sigma=sigma)


def random_views(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    z2 = z1 + 0.8 * torch.randn(n, DIM, generator=g, dtype=torch.float64)  # correlated views, unequal similarities
    z1 = z1 * (0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64))  # unnormalised inputs
    return z1.to(dtype), z2.to(dtype)


def value_and_grads(loss_fn, z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    z1 = z1.detach().clone().requires_grad_(True)
    z2 = z2.detach().clone().requires_grad_(True)
    loss = loss_fn(z1, z2)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad


def check_against_reference(kind: str, n: int, temperature: float, sigma: float = 0.5, seed: int = 0) -> None:
    z1, z2 = random_views(n, seed)
    loss, g1, g2 = value_and_grads(make_loss(kind, temperature, sigma), z1, z2)  # float32 inputs
    ref, r1, r2 = value_and_grads(lambda a, b: reference_loss(a, b, temperature, kind, sigma), z1.double(), z2.double())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    # Gradients scale like 1/(t * N); compare with a tolerance relative to their size.
    scale = max(r1.abs().max().item(), r2.abs().max().item())
    torch.testing.assert_close(g1.double(), r1, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(g2.double(), r2, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["infonce", "dcl"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_matches_reference(kind: str, n: int, temperature: float) -> None:
    check_against_reference(kind, n, temperature, seed=n)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_dclw_matches_reference(n: int, temperature: float, sigma: float) -> None:
    check_against_reference("dclw", n, temperature, sigma, seed=100 + n)


@pytest.mark.parametrize("loss_cls", [InfoNCELoss, DCLLoss])
def test_gradcheck_float64(loss_cls) -> None:
    # Float64 inputs stay float64 inside, so the analytical gradient can be checked by finite differences.
    # (DCLW is left out: its weights are detached on purpose, so finite differences disagree by design.)
    z1, z2 = random_views(4, seed=7, dtype=torch.float64)
    loss_fn = loss_cls(temperature=0.2)
    assert torch.autograd.gradcheck(loss_fn, (z1.requires_grad_(), z2.requires_grad_()))


def test_float64_inputs_match_reference_tightly() -> None:
    z1, z2 = random_views(6, seed=3, dtype=torch.float64)
    for kind in ["infonce", "dcl", "dclw"]:
        loss = make_loss(kind, 0.1)(z1, z2)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, reference_loss(z1, z2, 0.1, kind), rtol=1e-12, atol=1e-12)


def test_dclw_weights_are_detached_in_gradient() -> None:
    # With detached weights the gradient of DCLW is that of a DCL whose positive terms are scaled by constants:
    # compare with the reference, whose weights are Python floats, and check it differs from a non-detached version.
    z1, z2 = random_views(5, seed=11)
    _, g1, _ = value_and_grads(DCLWLoss(temperature=0.1, sigma=0.5), z1, z2)

    def non_detached(a: Tensor, b: Tensor) -> Tensor:
        ua, ub = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        w = 2 - a.shape[0] * torch.softmax((ua * ub).sum(1) / 0.5, dim=0)  # with gradient
        loss_dcl = DCLLoss(temperature=0.1)(a, b)
        pos = (ua * ub).sum(1) / 0.1
        return loss_dcl + ((1 - w) * pos).mean()  # same value as DCLW, gradient also through w

    _, h1, _ = value_and_grads(non_detached, z1, z2)
    _, r1, _ = value_and_grads(lambda a, b: reference_loss(a, b, 0.1, "dclw", 0.5), z1.double(), z2.double())
    torch.testing.assert_close(g1.double(), r1, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(g1, h1, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["infonce", "dcl", "dclw"])
def test_invariant_to_input_scale(kind: str) -> None:
    z1, z2 = random_views(8, seed=5)
    loss_fn = make_loss(kind, 0.1)
    torch.testing.assert_close(loss_fn(3.0 * z1, 0.25 * z2), loss_fn(z1, z2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_infonce_above_dcl(n: int) -> None:
    z1, z2 = random_views(n, seed=20 + n)
    for temperature in TEMPERATURES:
        infonce = InfoNCELoss(temperature)(z1, z2)
        dcl = DCLLoss(temperature)(z1, z2)
        assert infonce > dcl
        # InfoNCE = mean_i [DCL_i + log(1 + exp(pos_i - lse(neg_i)))], so the gap is positive and at most that term.
        assert infonce - dcl < math.log(1 + math.exp(2 / temperature)) + 1e-4


def test_dclw_equals_dcl_when_positive_similarities_are_equal() -> None:
    g = torch.Generator().manual_seed(9)
    n, cos = 6, 0.6
    z1 = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1)
    v = torch.randn(n, DIM, generator=g)
    v = torch.nn.functional.normalize(v - (v * z1).sum(1, keepdim=True) * z1, dim=1)  # orthogonal to z1, unit
    z2 = cos * z1 + math.sqrt(1 - cos**2) * v  # <z1_i, z2_i> = cos for every pair
    torch.testing.assert_close((z1 * z2).sum(1), torch.full((n,), cos), rtol=0, atol=1e-6)
    for sigma in SIGMAS:
        torch.testing.assert_close(DCLWLoss(0.1, sigma=sigma)(z1, 2 * z2), DCLLoss(0.1)(z1, z2))
    # ... and differs from DCL when the similarities differ.
    a, b = random_views(n, seed=10)
    assert not torch.allclose(DCLWLoss(0.1)(a, b), DCLLoss(0.1)(a, b), rtol=1e-3)


def test_dclw_weights() -> None:
    z1, z2 = random_views(7, seed=12)
    u1, u2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    w = dclw_weights(u1.requires_grad_(), u2, sigma=0.5)
    assert w.shape == (7,) and not w.requires_grad
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    sims = (u1 * u2).sum(1).detach()
    expected = 2 - torch.exp(sims / 0.5) / torch.exp(sims / 0.5).mean()
    torch.testing.assert_close(w, expected)
    assert w[sims.argmax()] == w.min()  # the easiest pair gets the smallest weight


def test_views_are_symmetric() -> None:
    z1, z2 = random_views(6, seed=13)
    for kind in ["infonce", "dcl", "dclw"]:
        loss_fn = make_loss(kind, 0.2)
        torch.testing.assert_close(loss_fn(z1, z2), loss_fn(z2, z1))


def test_perfect_alignment_gives_low_infonce() -> None:
    # Identical views of orthogonal embeddings: the positive dominates at a low temperature.
    z = torch.eye(4, DIM)
    assert InfoNCELoss(0.05)(z, z) < 1e-6
    torch.testing.assert_close(DCLLoss(0.05)(z, z), torch.tensor(-1 / 0.05 + math.log(6)))


# ----------------------------------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------------------------------


def test_contrastive_from_logits_with_queue_negatives() -> None:
    g = torch.Generator().manual_seed(14)
    pos, neg, w = torch.randn(3, generator=g), torch.randn(3, 10, generator=g), torch.rand(3, generator=g)
    for decoupled in (False, True):
        for weight in (None, w):
            out = contrastive_from_logits(pos, neg, decoupled=decoupled, pos_weight=weight)
            assert out.shape == (3,)
            for i in range(3):
                terms = [math.exp(x) for x in neg[i].tolist()] + ([] if decoupled else [math.exp(pos[i].item())])
                wi = 1.0 if weight is None else weight[i].item()
                assert out[i].item() == pytest.approx(-wi * pos[i].item() + math.log(sum(terms)), rel=1e-5)


def test_contrastive_from_logits_ignores_masked_negatives() -> None:
    pos, neg = torch.tensor([1.0, 2.0]), torch.tensor([[0.5, float("-inf"), 0.1], [float("-inf"), 0.3, -1.0]])
    neg.requires_grad_(True)
    out = contrastive_from_logits(pos, neg, decoupled=True)
    expected = torch.stack([-1.0 + torch.logsumexp(torch.tensor([0.5, 0.1]), 0), -2 + torch.logsumexp(neg[1, 1:], 0)])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.isfinite(neg.grad).all() and neg.grad[0, 1] == 0 and neg.grad[1, 0] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["infonce", "dcl", "dclw"])
def test_bf16_autocast_close_to_float32(kind: str) -> None:
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, DIM)
    x1, x2 = torch.randn(12, 16), torch.randn(12, 16)
    loss_fn = make_loss(kind, 0.1)

    reference = loss_fn(proj(x1), proj(x2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = proj(x1), proj(x2)
        assert z1.dtype == torch.bfloat16
        loss = loss_fn(z1, z2)
        # Float32 inputs under autocast: the similarities must not be downcast to bf16 inside the loss.
        exact = loss_fn(z1.float(), z2.float())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(exact, loss_fn(z1.float(), z2.float()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


def test_half_inputs() -> None:
    z1, z2 = random_views(8, seed=15)
    for kind in ["infonce", "dcl", "dclw"]:
        loss_fn = make_loss(kind, 0.1)
        a, b = z1.half().requires_grad_(), z2.half().requires_grad_()
        loss = loss_fn(a, b)
        loss.backward()
        assert loss.dtype == torch.float32 and a.grad.dtype == torch.float16
        torch.testing.assert_close(loss, loss_fn(z1, z2), rtol=5e-3, atol=5e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration errors and registry
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, float("nan"), float("inf"), "0.1", None, True])
def test_bad_temperature(bad) -> None:
    for cls in (InfoNCELoss, DCLLoss, DCLWLoss):
        with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
            cls(temperature=bad)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_sigma(bad) -> None:
    with pytest.raises(ConfigError, match="sigma must be a finite number > 0"):
        DCLWLoss(sigma=bad)


def test_bad_gather_flag() -> None:
    with pytest.raises(ConfigError, match="gather_distributed"):
        InfoNCELoss(gather_distributed="yes")


@pytest.mark.parametrize(
    "shape1, shape2", [((4, 8), (4, 7)), ((4, 8), (5, 8)), ((4,), (4,)), ((2, 4, 8), (2, 4, 8))]
)
def test_bad_shapes(shape1, shape2) -> None:
    for kind in ["infonce", "dcl", "dclw"]:
        with pytest.raises(ValueError, match="z1 and z2 must both have shape") as e:  # a caller's mistake
            make_loss(kind, 0.1)(torch.randn(shape1), torch.randn(shape2))
        assert not isinstance(e.value, ConfigError)


def test_batch_of_one_pair_rejected() -> None:
    with pytest.raises(ValueError, match="no negatives") as e:
        DCLLoss()(torch.randn(1, 4), torch.randn(1, 4))
    assert not isinstance(e.value, ConfigError)


def test_functional_core_bad_shapes() -> None:
    with pytest.raises(ValueError, match="pos must have shape") as e:
        contrastive_from_logits(torch.randn(3), torch.randn(4, 5))
    assert not isinstance(e.value, ConfigError)
    with pytest.raises(ValueError, match="pos_weight"):
        contrastive_from_logits(torch.randn(3), torch.randn(3, 5), pos_weight=torch.ones(4))


def test_build_loss() -> None:
    assert type(build_loss("infonce")) is InfoNCELoss
    assert type(build_loss("NTXent")) is InfoNCELoss
    assert type(build_loss("dcl")) is DCLLoss
    loss = build_loss("dclw", temperature=0.2, sigma=0.3, gather_distributed=True)
    assert type(loss) is DCLWLoss
    assert (loss.temperature, loss.sigma, loss.gather_distributed) == (0.2, 0.3, True)
    assert build_loss("dcl").temperature == 0.1 and build_loss("dclw").sigma == 0.5


def test_build_loss_errors() -> None:
    with pytest.raises(ConfigError, match="unknown loss 'simclr'; valid names: dcl, dclw, infonce, ntxent"):
        build_loss("simclr")
    with pytest.raises(ConfigError, match="unknown option loss.sigma of dcl"):
        build_loss("dcl", sigma=0.5)
    with pytest.raises(ConfigError, match="temperature"):
        build_loss("infonce", temperature=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Distributed helpers without a process group
# ----------------------------------------------------------------------------------------------------------------------


def test_distributed_helpers_single_process() -> None:
    assert distributed.world_size() == 1
    assert distributed.rank() == 0
    assert distributed.rank_offset(32) == 0
    x = torch.randn(3, 2)
    assert distributed.gather(x) is x


def test_gather_distributed_flag_is_noop_without_process_group() -> None:
    z1, z2 = random_views(5, seed=16)
    for cls in (InfoNCELoss, DCLLoss, DCLWLoss):
        assert cls(gather_distributed=True)(z1, z2) == cls(gather_distributed=False)(z1, z2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast() -> None:
    z1, z2 = random_views(16, seed=17)
    for kind in ["infonce", "dcl", "dclw"]:
        loss_fn = make_loss(kind, 0.1)
        a, b = z1.cuda().requires_grad_(), z2.cuda().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(a, b)
        loss.backward()
        assert loss.dtype == torch.float32 and loss.device.type == "cuda"
        torch.testing.assert_close(loss.cpu(), loss_fn(z1, z2), rtol=1e-5, atol=1e-5)
        _, g1, _ = value_and_grads(loss_fn, z1, z2)
        torch.testing.assert_close(a.grad.cpu(), g1, rtol=1e-4, atol=1e-5)
