"""Tests of the parts shared by the methods: the query-key (queue / support-set) losses, BYOL's normalised MSE and the
Barlow Twins loss against plain-loop float64 references (value and gradient); the memory queue's semantics; the
momentum teacher's arithmetic and schedules; nearest neighbours against brute force."""

from __future__ import annotations

import collections
import io
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from contrastkit.errors import ConfigError
from contrastkit.losses import (
    BarlowTwinsLoss,
    NormalizedMSELoss,
    QueueDCLLoss,
    QueueDCLWLoss,
    QueueInfoNCELoss,
    build_queue_loss,
)
from contrastkit.models import (
    MemoryQueue,
    MomentumTeacher,
    cosine_momentum,
    cosine_similarities,
    fixed_momentum,
    nearest_neighbours,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _grads(fn, *inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Value of ``fn(*inputs)`` and its gradient with respect to every input (float64 copies)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [x.grad for x in leaves]


# ----------------------------------------------------------------------------------------------------------------------
# Query-key losses (MoCo / NNCLR)
# ----------------------------------------------------------------------------------------------------------------------


def reference_queue_loss(q: Tensor, k: Tensor, bank: Tensor | None, t: float, kind: str, sigma: float = 0.5) -> Tensor:
    """The loss written as sums over queries and negatives, one scalar at a time (float64, autograd-able)."""
    n = q.shape[0]

    def unit(x: Tensor) -> Tensor:
        return x / torch.sqrt(torch.sum(x * x))

    uq = [unit(q[i]) for i in range(n)]
    uk = [unit(k[i]) for i in range(n)]
    weights = [1.0] * n
    if kind == "dclw":  # detached: from Python floats
        sims = [float(torch.dot(uq[i], uk[i]).detach()) for i in range(n)]
        denom = sum(math.exp(s / sigma) for s in sims)
        weights = [2.0 - n * math.exp(s / sigma) / denom for s in sims]
    total = torch.zeros((), dtype=F64)
    for i in range(n):
        pos = torch.dot(uq[i], uk[i]) / t
        negatives = [unit(bank[m]) for m in range(bank.shape[0])] if bank is not None else \
            [uk[j] for j in range(n) if j != i]
        neg_sum = torch.zeros((), dtype=F64)
        for u in negatives:
            neg_sum = neg_sum + torch.exp(torch.dot(uq[i], u) / t)
        if kind == "infonce":
            total = total + (-pos + torch.log(torch.exp(pos) + neg_sum))
        else:
            total = total + (-weights[i] * pos + torch.log(neg_sum))
    return total / n


QUEUE_KINDS = {"infonce": QueueInfoNCELoss, "dcl": QueueDCLLoss, "dclw": QueueDCLWLoss}


@pytest.mark.parametrize("kind", sorted(QUEUE_KINDS))
@pytest.mark.parametrize("with_bank", [True, False])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_queue_losses_match_reference(kind: str, with_bank: bool, temperature: float) -> None:
    n, m, d = 5, 7, 6
    q, k = _randn(n, d, seed=1), _randn(n, d, seed=2) * 0.7 + _randn(n, d, seed=1)  # correlated pairs
    bank = _randn(m, d, seed=3)
    loss_fn = QUEUE_KINDS[kind](temperature=temperature)
    if with_bank:
        value, grads = _grads(lambda a, b, c: loss_fn(a, b, c), q, k, bank)
        ref_value, ref_grads = _grads(lambda a, b, c: reference_queue_loss(a, b, c, temperature, kind), q, k, bank)
    else:
        value, grads = _grads(lambda a, b: loss_fn(a, b, None), q, k)
        ref_value, ref_grads = _grads(lambda a, b: reference_queue_loss(a, b, None, temperature, kind), q, k)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_queue_losses_float32_and_builder() -> None:
    q, k, bank = (_randn(4, 8, seed=s).float() for s in (5, 6, 7))
    ref = reference_queue_loss(q.double(), k.double(), bank.double(), 0.2, "dcl")
    torch.testing.assert_close(build_queue_loss("DCL", temperature=0.2, sigma=0.5)(q, k, bank).double(), ref,
                               rtol=1e-5, atol=1e-5)
    assert isinstance(build_queue_loss("ntxent"), QueueInfoNCELoss)
    assert build_queue_loss("dclw", sigma=0.3).sigma == 0.3
    # the bfloat16 path computes in float32 under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = QueueInfoNCELoss(0.2)(q.bfloat16(), k.bfloat16(), bank.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_queue_losses_reject_bad_input() -> None:
    with pytest.raises(ConfigError):
        build_queue_loss("cosine")
    with pytest.raises(ConfigError):
        QueueInfoNCELoss(temperature=0.0)
    loss = QueueDCLLoss()  # shapes are the caller's business: ordinary exceptions, not user errors
    for bad in ((torch.randn(3, 4), torch.randn(3, 5)), (torch.randn(3, 4), torch.randn(3, 4), torch.randn(0, 4))):
        with pytest.raises(ValueError) as e:  # the second: an empty bank (pass None instead)
            loss(*bad)
        assert not isinstance(e.value, ConfigError)
    with pytest.raises(ValueError):
        loss(torch.randn(1, 4), torch.randn(1, 4), None)  # no other key in a batch of one


# ----------------------------------------------------------------------------------------------------------------------
# BYOL's normalised MSE
# ----------------------------------------------------------------------------------------------------------------------


def reference_normalized_mse(p: Tensor, z: Tensor) -> Tensor:
    n, d = p.shape
    total = torch.zeros((), dtype=F64)
    for i in range(n):
        pn = torch.sqrt(sum(p[i, j] * p[i, j] for j in range(d)))
        zn = torch.sqrt(sum(z[i, j] * z[i, j] for j in range(d)))
        total = total + sum((p[i, j] / pn - z[i, j] / zn) ** 2 for j in range(d))
    return total / n


def test_normalized_mse_matches_reference() -> None:
    p, z = _randn(6, 5, seed=11), _randn(6, 5, seed=12)
    value, grads = _grads(NormalizedMSELoss(), p, z)
    ref_value, ref_grads = _grads(reference_normalized_mse, p, z)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    cos = np.sum(p.numpy() * z.numpy(), 1) / np.linalg.norm(p.numpy(), axis=1) / np.linalg.norm(z.numpy(), axis=1)
    assert value.item() == pytest.approx(float(np.mean(2 - 2 * cos)), rel=1e-12)  # the 2 - 2 cos form
    assert NormalizedMSELoss()(p, 3.0 * p).item() == pytest.approx(0.0, abs=1e-12)  # scale-invariant, 0 at equality


# ----------------------------------------------------------------------------------------------------------------------
# Barlow Twins
# ----------------------------------------------------------------------------------------------------------------------


def barlow_numpy(z1: np.ndarray, z2: np.ndarray, lam: float, scale: float, eps: float = 1e-5) -> float:
    """Loops over columns and entries, NumPy float64."""
    n, d = z1.shape

    def standardise(z: np.ndarray) -> np.ndarray:
        out = np.empty_like(z)
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
            for b in range(n):
                out[b, j] = (z[b, j] - mean) / math.sqrt(var + eps)
        return out

    a, b = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[r, i] * b[r, j] for r in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c * c
    return scale * loss


def barlow_torch_loops(z1: Tensor, z2: Tensor, lam: float, scale: float, eps: float = 1e-5) -> Tensor:
    """The same loops on tensors, for the reference gradient."""
    n, d = z1.shape

    def standardise(z: Tensor) -> list[list[Tensor]]:
        cols = []
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
            cols.append([(z[b, j] - mean) / torch.sqrt(var + eps) for b in range(n)])
        return cols

    a, b = standardise(z1), standardise(z2)
    loss = torch.zeros((), dtype=F64)
    for i in range(d):
        for j in range(d):
            c = sum(a[i][r] * b[j][r] for r in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lam * c * c)
    return scale * loss


@pytest.mark.parametrize("lam,scale", [(0.0051, 1.0), (0.5, 0.1)])
def test_barlow_matches_reference(lam: float, scale: float) -> None:
    z1 = _randn(7, 4, seed=21) * 3 + 1
    z2 = z1 + _randn(7, 4, seed=22)
    loss_fn = BarlowTwinsLoss(lambda_=lam, scale=scale)
    value, grads = _grads(loss_fn, z1, z2)
    assert value.item() == pytest.approx(barlow_numpy(z1.numpy(), z2.numpy(), lam, scale), rel=1e-11)
    _, ref_grads = _grads(lambda a, b: barlow_torch_loops(a, b, lam, scale), z1, z2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


def test_barlow_is_zero_for_identical_decorrelated_views_and_validates() -> None:
    # Columns that are standardised and exactly uncorrelated: C = I and the loss is 0 (up to eps).
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    assert BarlowTwinsLoss(eps=1e-12)(z, z).item() == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError):
        BarlowTwinsLoss(lambda_=-1.0)
    with pytest.raises(ValueError) as e:
        BarlowTwinsLoss()(torch.randn(4, 3), torch.randn(4, 2))
    assert not isinstance(e.value, ConfigError)


# ----------------------------------------------------------------------------------------------------------------------
# Memory queue
# ----------------------------------------------------------------------------------------------------------------------


def _labelled_keys(ids: range, dim: int = 4) -> tuple[Tensor, Tensor]:
    """Keys whose direction encodes their id, and the ids."""
    idx = torch.tensor(list(ids), dtype=torch.long)
    keys = torch.stack([torch.cos(idx * 0.37), torch.sin(idx * 0.37), torch.cos(idx * 1.3), 0.5 + idx * 0.0], 1)
    return keys[:, :dim].float() * 3.0, idx  # not normalised on purpose


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_queue_fifo_order_and_wrap_around() -> None:
    queue = MemoryQueue(10, 4, store_indices=True)
    assert len(queue) == 0 and queue.get().shape == (0, 4)  # fresh: nothing returned, not the zero storage
    for start in (0, 4, 8):  # pushes of 4 into 10 slots: the third wraps around the end
        queue.push(*_labelled_keys(range(start, start + 4)))
    assert len(queue) == 10 and queue.is_full and int(queue.ptr) == 2 and int(queue.filled) == 10
    assert queue.get_indices(oldest_first=True).tolist() == list(range(2, 12))
    # storage order: ids 10, 11 were written over slots 0, 1
    assert queue.get_indices().tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    keys, _ = _labelled_keys(range(2, 12))
    torch.testing.assert_close(queue.get(oldest_first=True), _unit(keys))  # normalised on the way in


@pytest.mark.parametrize("size", [1, 7, 16])
def test_queue_matches_a_deque_for_any_push_sizes(size: int) -> None:
    """Sizes that do not divide the batch, partial (short) batches, pushes larger than the queue."""
    queue = MemoryQueue(size, 4, store_indices=True, store_labels=True)
    model: collections.deque[int] = collections.deque(maxlen=size)
    next_id = 0
    for n in [3, 3, 5, 1, 2, 20, 3, 1, 7]:
        keys, ids = _labelled_keys(range(next_id, next_id + n))
        queue.push(keys, indices=ids, labels=ids % 3)
        model.extend(range(next_id, next_id + n))
        next_id += n
        assert len(queue) == len(model)
        assert queue.get_indices(oldest_first=True).tolist() == list(model)
        assert queue.get_labels(oldest_first=True).tolist() == [i % 3 for i in model]
        torch.testing.assert_close(queue.get(oldest_first=True), _unit(_labelled_keys(model)[0]))
        assert sorted(queue.get_indices().tolist()) == sorted(model)  # storage order holds the same entries
        torch.testing.assert_close(queue.get()[queue.get_indices().argsort()],
                                   queue.get(oldest_first=True)[torch.tensor(list(model)).argsort()])


def test_queue_partial_fill_returns_only_written_entries() -> None:
    queue = MemoryQueue(10, 4)
    keys, _ = _labelled_keys(range(3))
    queue.push(keys)
    got = queue.get()
    assert got.shape == (3, 4)  # never the 7 unwritten (zero) rows
    torch.testing.assert_close(got, _unit(keys))
    indices = MemoryQueue(4, 4, store_indices=True)
    indices.push(keys)  # no indices given: -1
    assert indices.get_indices().tolist() == [-1, -1, -1]
    with pytest.raises(RuntimeError):
        queue.get_indices()
    with pytest.raises(ValueError) as e:
        queue.push(torch.randn(3, 5))
    assert not isinstance(e.value, ConfigError)
    with pytest.raises(ConfigError):
        MemoryQueue(0, 4)


def test_queue_get_is_a_snapshot() -> None:
    """Negatives read before a push are not changed by it, and a loss built on them still back-propagates."""
    queue = MemoryQueue(4, 4)
    queue.push(torch.randn(4, 4))
    negatives = queue.get()
    before = negatives.clone()
    q = torch.randn(2, 4, requires_grad=True)
    loss = QueueInfoNCELoss(0.2)(q, torch.randn(2, 4), negatives)
    new_keys = torch.randn(4, 4)
    queue.push(new_keys)  # overwrites every slot
    assert torch.equal(negatives, before)
    assert not torch.allclose(queue.get(), before)
    loss.backward()  # no "modified by an inplace operation" error
    assert q.grad is not None


def test_queue_stage_commit_discard() -> None:
    """Staged keys are invisible until commit, which pushes them in staging order (as direct pushes would);
    discard drops them; shape errors are raised at stage time."""
    queue, direct = MemoryQueue(10, 4, store_indices=True), MemoryQueue(10, 4, store_indices=True)
    batches = [_labelled_keys(range(start, start + 3)) for start in (0, 3, 6, 9)]
    for keys, idx in batches[:2]:
        queue.stage(keys, indices=idx)
        direct.push(keys, indices=idx)
    assert len(queue) == 0 and queue.staged == 2 and queue.get().shape == (0, 4)
    assert queue.commit() == 2 and queue.staged == 0
    queue.stage(*batches[2])
    queue.discard()  # a skipped optimizer step
    assert queue.commit() == 0
    queue.stage(batches[3][0], indices=batches[3][1])
    direct.push(batches[3][0], indices=batches[3][1])
    queue.commit()
    for a, b in zip(queue.state_dict().values(), direct.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        queue.stage(torch.randn(3, 5))


def test_queue_state_dict_round_trip(tmp_path) -> None:
    queue = MemoryQueue(7, 4, store_indices=True)
    for start in (0, 3, 6):
        queue.push(*_labelled_keys(range(start, start + 3)))
    state = queue.state_dict()
    assert set(state) == {"keys", "ptr", "filled", "indices"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    restored = MemoryQueue(7, 4, store_indices=True)
    restored.load_state_dict(loaded)
    assert len(restored) == len(queue) == 7 and restored._ptr == queue._ptr == 2
    torch.testing.assert_close(restored.get(oldest_first=True), queue.get(oldest_first=True))
    # and it continues exactly like the original
    for q in (queue, restored):
        q.push(*_labelled_keys(range(9, 13)))
    assert restored.get_indices(oldest_first=True).tolist() == queue.get_indices(oldest_first=True).tolist() \
        == list(range(6, 13))
    # inside a parent module too (the path a Lightning checkpoint takes)
    parent, other = nn.Module(), nn.Module()
    parent.queue, other.queue = queue, MemoryQueue(7, 4, store_indices=True)
    other.load_state_dict(parent.state_dict())
    assert len(other.queue) == 7 and other.queue._ptr == queue._ptr
    with pytest.raises(RuntimeError):  # a different size is refused by load_state_dict's shape check
        MemoryQueue(8, 4, store_indices=True).load_state_dict(loaded)


# ----------------------------------------------------------------------------------------------------------------------
# Momentum teacher and schedules
# ----------------------------------------------------------------------------------------------------------------------


def _student() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _perturb(student: nn.Module) -> None:
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(8, 3))  # moves the BN running statistics and num_batches_tracked


@pytest.mark.parametrize("buffers", ["ema", "copy"])
def test_momentum_teacher_arithmetic(buffers: str) -> None:
    student = _student()
    teacher = MomentumTeacher({"net": student}, buffers=buffers)
    assert all(not p.requires_grad for p in teacher.parameters())
    for a, b in zip(teacher.net.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)  # starts as a copy
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    _perturb(student)
    m = 0.9
    teacher.update(m)
    after, current = teacher.net.state_dict(), student.state_dict()
    params = {name for name, _ in student.named_parameters()}
    for name in before:
        old, new, s = before[name], after[name], current[name]
        if name in params or (buffers == "ema" and s.is_floating_point()):
            expected = m * old + (1 - m) * s  # hand computation
        else:
            expected = s  # copied (num_batches_tracked always; every buffer with buffers="copy")
        torch.testing.assert_close(new, expected, rtol=1e-6, atol=1e-7, msg=name)
    assert int(after["1.num_batches_tracked"]) == 1
    # momentum 1 freezes the teacher's parameters, momentum 0 copies the student
    frozen = {k: v.clone() for k, v in teacher.net.named_parameters()}
    _perturb(student)
    teacher.update(1.0)
    for k, v in teacher.net.named_parameters():
        assert torch.equal(v, frozen[k])
    teacher.update(0.0)
    for (k, v), s in zip(teacher.net.named_parameters(), student.parameters()):
        assert torch.equal(v, s), k
    with pytest.raises(ConfigError):
        teacher.update(1.5)
    with pytest.raises(ConfigError):
        MomentumTeacher({"net": student}, buffers="average")


def test_momentum_schedules() -> None:
    assert cosine_momentum(0.99, 1.0, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0, 1.0) == pytest.approx(1.0)
    # BYOL's formula tau = 1 - (1 - base) * (cos(pi * k / K) + 1) / 2
    assert cosine_momentum(0.996, 1.0, 0.25) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(0.99, 0.999, 0.5) == pytest.approx(0.9945)
    assert cosine_momentum(0.99, 1.0, 1.7) == pytest.approx(1.0)  # progress clamped
    assert cosine_momentum(0.999, 0.999, 0.3) == pytest.approx(0.999)  # base == final: fixed
    assert fixed_momentum(0.999, 0.7) == 0.999
    values = [cosine_momentum(0.9, 1.0, p / 10) for p in range(11)]
    assert values == sorted(values)
    with pytest.raises(ConfigError):
        cosine_momentum(1.2, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Nearest neighbours
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_nearest_neighbours_match_brute_force(k: int, chunk_size: int) -> None:
    query, bank = _randn(11, 6, seed=31).numpy(), _randn(40, 6, seed=32).numpy()
    result = nearest_neighbours(torch.from_numpy(query), torch.from_numpy(bank), k=k, chunk_size=chunk_size)
    assert result.embeddings.shape == (11, k, 6) and result.indices.shape == result.similarities.shape == (11, k)
    for i in range(11):
        sims = []
        for j in range(40):  # brute force, NumPy float64
            sims.append(float(query[i] @ bank[j]) / (np.linalg.norm(query[i]) * np.linalg.norm(bank[j])))
        order = sorted(range(40), key=lambda j: -sims[j])[:k]
        assert result.indices[i].tolist() == order
        np.testing.assert_allclose(result.similarities[i].numpy(), [sims[j] for j in order], rtol=1e-12)
        np.testing.assert_array_equal(result.embeddings[i].numpy(), bank[order])
    full = cosine_similarities(torch.from_numpy(query), torch.from_numpy(bank))
    assert full.shape == (11, 40)
    torch.testing.assert_close(full.gather(1, result.indices), result.similarities)


def test_nearest_neighbours_in_a_queue_and_errors() -> None:
    queue = MemoryQueue(16, 3)
    keys = _randn(16, 3, seed=41).float()
    queue.push(keys)
    query = keys[[3, 9]] * 2.5  # scaled copies of stored entries: their own entry is the top-1 neighbour
    result = nearest_neighbours(query, queue.get())
    assert result.indices[:, 0].tolist() == [3, 9]
    torch.testing.assert_close(result.similarities[:, 0], torch.ones(2))
    assert not result.embeddings.requires_grad
    with pytest.raises(ValueError):
        nearest_neighbours(query, queue.get(), k=17)  # more neighbours than entries
    with pytest.raises(ValueError) as e:
        nearest_neighbours(query, torch.randn(5, 4))
    assert not isinstance(e.value, ConfigError)
