"""What happens once per optimizer step, through Lightning's loop (SSLModule on a trainer from build_trainer): the EMA
teacher update and the queue commit happen once per optimizer step taken, with gradient accumulation (count and
values) and never for a step the fp16 grad scaler skips. BN-free networks and fixed views (distributed_utils'
``fixed_view_module``) keep the runs to a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import HalfPrecision, MixedPrecision
from torch import Tensor

from contrastkit.config import load_config
from contrastkit.training.run import build_trainer

from distributed_utils import fixed_view_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MOCO = ["method.name=moco", "method.loss=infonce", "method.proj_hidden_bn=false", "method.proj_hidden_dim=12",
        "method.proj_out_dim=6", "method.queue_size=20", "method.momentum_base=0.9", "method.momentum_final=0.9",
        "method.symmetric=true", "method.shuffle_bn=none"]
BATCH = 4


def _cfg(tmp: Path, *extra: str):
    return load_config(None, MOCO + list(extra) + [
        "train.accelerator=cpu", "train.devices=1", "optim.name=sgd", "optim.lr=0.5", "optim.lr_scaling=none",
        "optim.warmup_epochs=0", f"optim.batch_size={BATCH}", "train.epochs=1", "train.progress_bar=false",
        "train.knn_every_n_epochs=0", f"train.run_dir={tmp}"])


def _fit(cfg, module, batches: int, callbacks: list[L.Callback], precision: Any = None) -> None:
    loader = torch.utils.data.DataLoader(list(torch.arange(batches * BATCH).view(batches, BATCH)), batch_size=None)
    trainer = build_trainer(cfg, callbacks, Path(cfg.train.run_dir), checkpoints=False)
    if precision is not None:
        trainer.strategy.precision_plugin = precision
    trainer.fit(module, train_dataloaders=loader)


def _teacher(module) -> list[Tensor]:
    return [p.detach().clone() for p in module.method.teacher.parameters()]


def _student(module) -> list[Tensor]:
    return [p.detach().clone() for p in [*module.method.backbone.parameters(), *module.method.projector.parameters()]]


def test_accumulation_updates_teacher_and_queue_once_per_optimizer_step(tmp_path: Path) -> None:
    accumulate, steps = 2, 3
    cfg = _cfg(tmp_path, f"optim.accumulate_grad_batches={accumulate}")
    module = fixed_view_module(cfg, steps * accumulate * BATCH, steps)
    method, queue = module.method, module.method.queue
    reads: list[Tensor] = []  # the queue each micro-batch reads
    staged: list[Tensor] = []  # the keys each micro-batch stages
    updates: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []  # (teacher before, student, teacher after)
    commits: list[tuple[Tensor, Tensor]] = []  # queue.get() and get(oldest_first=True) after each optimizer step
    get, stage, after = queue.get, queue.stage, method.after_optimizer_step

    def record_get(*args, **kwargs):
        out = get(*args, **kwargs)
        reads.append(out.clone())
        return out

    def record_after(progress: float) -> None:
        before = _teacher(module)
        after(progress)
        updates.append((before, _student(module), _teacher(module)))
        commits.append((get().clone(), get(oldest_first=True).clone()))

    queue.get = record_get
    queue.stage = lambda keys, *a, **k: (staged.append(F.normalize(keys.float(), dim=1)), stage(keys, *a, **k))[1]
    method.after_optimizer_step = record_after
    _fit(cfg, module, steps * accumulate, [])

    assert module.trainer.global_step == steps
    assert len(updates) == len(commits) == steps  # once per optimizer step, not per micro-batch
    assert len(reads) == steps * accumulate and len(staged) == steps * accumulate * 2  # 2 views' keys per micro-batch
    for s, (before, student, teacher) in enumerate(updates):
        assert any(not torch.equal(a, b) for a, b in zip(before, teacher))
        for t0, x, t1 in zip(before, student, teacher):  # fixed momentum 0.9
            torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * x)
        # both micro-batches of a step read the queue as the previous step left it
        previous = commits[s - 1][0] if s else torch.zeros(0, 6)
        for m in range(accumulate):
            torch.testing.assert_close(reads[s * accumulate + m], previous, rtol=0, atol=0)
        # and after the step, the queue holds the newest keys staged so far, in staging order (FIFO)
        torch.testing.assert_close(commits[s][1], torch.cat(staged[: (s + 1) * accumulate * 2])[-queue.size:])
    assert queue.staged == 0


class _InfGradient(L.Callback):
    """Puts an inf into one gradient after the backward pass of batch ``at`` (before the grad scaler unscales), as an
    fp16 overflow does, and records the model around every batch."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.states: list[dict[str, list[Tensor]]] = []

    def _state(self, module) -> dict[str, list[Tensor]]:
        q = module.method.queue
        return {"student": _student(module), "teacher": _teacher(module), "queue": [q.keys.clone(), q.ptr.clone(),
                                                                                     q.filled.clone()]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(self._state(pl_module))

    def on_after_backward(self, trainer, pl_module):
        if len(self.states) - 1 == self.at:
            next(pl_module.method.backbone.parameters()).grad.view(-1)[0] = float("inf")

    def on_train_end(self, trainer, pl_module):
        self.states.append(self._state(pl_module))


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_step_the_grad_scaler_skips_moves_neither_teacher_nor_queue(tmp_path: Path) -> None:
    # Lightning's precision=16-mixed plugin (autocast to float16 + GradScaler), given explicitly: on a CPU the
    # trainer would replace 16-mixed by bf16-mixed, which has no scaler.
    cfg = _cfg(tmp_path)
    module = fixed_view_module(cfg, 4 * BATCH, 4)
    spy = _InfGradient(at=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _fit(cfg, module, 4, [spy], precision=MixedPrecision("16-mixed", "cpu", scaler))
    states = spy.states  # before batches 0..3, and at the end
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf once and backed off
    before, after = states[2], states[3]
    assert _same(before["student"], after["student"])  # the grad scaler skipped the optimizer step ...
    assert _same(before["teacher"], after["teacher"]), "the EMA moved the teacher on a skipped step"
    assert _same(before["queue"], after["queue"]), "the queue changed on a skipped step"
    for s in (1, 3):  # control: the steps before and after it move all three
        for part in ("student", "teacher", "queue"):
            assert not _same(states[s][part], states[s + 1][part]), (s, part)


def test_bf16_true_teacher_is_float32_and_moves(tmp_path: Path) -> None:
    # Lightning's bf16-true converts the whole module to bfloat16; an EMA step (1 - 0.9) * (student - teacher) is then
    # mostly below half a bfloat16 ulp of the teacher's weights and rounds away. The teacher must stay float32 and
    # move exactly like a float32 EMA of the (bfloat16) student.
    cfg = _cfg(tmp_path)  # train.precision refuses bf16-true; Lightning's plugin for it, as the Python API allows
    module = fixed_view_module(cfg, 3 * BATCH, 3)
    updates: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []
    after = module.method.after_optimizer_step

    def record_after(progress: float) -> None:
        before = _teacher(module)
        after(progress)
        updates.append((before, _student(module), _teacher(module)))

    module.method.after_optimizer_step = record_after
    _fit(cfg, module, 3, [], precision=HalfPrecision("bf16-true"))
    assert next(module.method.backbone.parameters()).dtype == torch.bfloat16  # Lightning converted the student
    assert all(p.dtype == torch.float32 for p in module.method.teacher.parameters())
    assert len(updates) == 3
    start = expected = updates[0][0]  # the teacher when training starts (rounded once, with the student, to bf16)
    for _, student, teacher in updates:
        expected = [0.9 * t + 0.1 * s.float() for t, s in zip(expected, student)]
        for got, want in zip(teacher, expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    moved = [float((t - t0).abs().max()) for t, t0 in zip(updates[-1][2], start)]
    assert min(moved) > 0, moved  # every teacher tensor moved
