"""Training callbacks and plumbing: checkpoint I/O, the divergence guard, the resume history, the resumable CSV
log, the online kNN monitor and the progress bar (on stderr)."""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks.progress.tqdm_progress import TQDMProgressBar, Tqdm
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from contrastkit.config import Config
from contrastkit.data import ImageTensors
from contrastkit.errors import ContrastkitError
from contrastkit.evaluation import extract_features, knn_evaluate
from contrastkit.io import write_text_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint I/O that never leaves a half-written file, checksums the tensors, and never runs code on load.

    Saving goes through :func:`contrastkit.checkpoint.save_checkpoint` (a unique temporary file renamed over the
    final name, and a SHA-256 of every tensor stored in the checkpoint), so an interrupted save leaves the previous
    checkpoint intact. Loading uses :func:`contrastkit.checkpoint.safe_load` (``torch.load(weights_only=True)``,
    checksum verified): a corrupt checkpoint or one that would need to unpickle arbitrary objects is refused.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        from contrastkit.checkpoint import save_checkpoint

        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        from contrastkit.checkpoint import safe_load

        return safe_load(path, map_location=map_location or "cpu")


def divergence_error(cfg: Config, what: str) -> ContrastkitError:
    """The one-line error for a diverged run: ``what`` happened, and advice that fits the run's settings."""
    advice = [f"lower optim.lr (now {cfg.optim.lr:g})"]
    if cfg.optim.warmup_epochs < 1:
        advice.append(f"lengthen optim.warmup_epochs (now {cfg.optim.warmup_epochs:g})")
    if cfg.method.name in ("simclr", "moco", "nnclr") and cfg.method.temperature < 0.2:
        advice.append(f"raise method.temperature (now {cfg.method.temperature:g})")
    if not cfg.optim.gradient_clip_val:
        advice.append("set optim.gradient_clip_val=1.0")
    if str(cfg.train.precision) not in ("32", "32-true", "64-true"):
        advice.append(f"use train.precision=32 (now {cfg.train.precision})")
    return ContrastkitError(f"{what}: {', '.join(advice[:-1])} or {advice[-1]}" if len(advice) > 1
                            else f"{what}: {advice[0]}")


class DivergenceGuard(L.Callback):
    """Never writes a checkpoint of a diverged model: before every save, all parameters and buffers of the
    checkpoint must be finite and their largest magnitude at most ``max_abs`` (default 1e12: trained weights are
    O(1); beyond this, activations overflow float32/bf16 within a few layers and the run is lost). Otherwise the
    run stops with :func:`divergence_error`, and the checkpoints already written (all from before the divergence)
    stay the resumable ones.
    """

    def __init__(self, cfg: Config, max_abs: float = 1e12) -> None:
        self.cfg, self.max_abs = cfg, max_abs

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        worst, name = 0.0, ""
        for k, v in checkpoint["state_dict"].items():
            if not v.is_floating_point() or v.numel() == 0:
                continue
            m = float(v.detach().abs().max())
            if not m <= worst:  # also true for NaN
                worst, name = m, k
            if math.isnan(m):
                break
        if not worst <= self.max_abs:
            raise divergence_error(
                self.cfg, f"the model diverged by epoch {trainer.current_epoch} (step {trainer.global_step}: "
                f"|{name}| reached {worst:.3g}); this checkpoint was not written, the earlier ones are intact")


class ResumeHistory(L.Callback):
    """The run's resume history, saved in its checkpoints and reported in ``results.json`` as ``resumed``.

    Each resume adds ``{"step", "checkpoint", "changed": {key: [old, new]}}``: the step it continued from, the
    checkpoint it read, and the configuration keys it changed (only those :data:`contrastkit.config.RESUMABLE`
    allows), so a run's ``config.yaml`` (its final configuration) together with this list is what actually ran.
    """

    def __init__(self, entry: dict[str, Any] | None = None) -> None:
        self.entries: list[dict[str, Any]] = []
        self._pending = entry

    def state_dict(self) -> dict[str, Any]:
        return {"resumes": self.entries}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.entries = list(state_dict.get("resumes", []))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:  # after the restore, so the checkpoint's own history comes first
            self.entries.append(self._pending)
            self._pending = None


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of deleted: rows
    logged at steps before ``keep_before_step`` are kept (and their columns), later rows (an interrupted epoch that
    the resumed run logs again) are dropped."""

    def __init__(self, log_dir: str, keep_before_step: int) -> None:
        self._keep_before_step = keep_before_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__ (Lightning deletes metrics.csv here)
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) < self._keep_before_step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, out.getvalue())
        self.metrics_keys = header  # new rows are appended under the same header (extended when keys are new)


class ResumableCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` that appends to the run's ``metrics.csv`` when a run is resumed
    in its own directory (Lightning's logger deletes the file).

    Args:
        keep_before_step: the resumed checkpoint's global step: earlier rows are kept, later ones dropped (0 for a
            new run: a new run directory has no log yet).
    """

    def __init__(self, save_dir: str | Path, keep_before_step: int = 0, **kwargs: Any) -> None:
        super().__init__(save_dir, **kwargs)
        self._keep_before_step = keep_before_step

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()  # the log on disk covers every checkpoint, so a resume after a kill finds its rows

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._keep_before_step)
        return self._experiment


class StderrProgressBar(TQDMProgressBar):
    """Lightning's tqdm training bar on stderr (Lightning writes it to stdout, where it would mix with the result
    table that ``contrastkit train`` prints). Only the training bar: runs have no validation loop."""

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.train_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)


class TrainClock(L.Callback):
    """Training wall-clock time and images trained (a batch plug-in's candidate pool counts only the kept
    images), excluding the time spent in monitors at epoch end.

    Put it before the monitors in the callback list: its epoch-end hook runs first, so their time is not counted.
    Saved in checkpoints, so resumed runs keep counting.
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.images = 0
        self._start: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "images": self.images}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.images = int(state_dict.get("images", 0))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        trained = getattr(pl_module, "trained_indices", None)  # a batch plug-in's pool is larger than what trains
        self.images += int((batch if trained is None else trained).shape[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:
            self.train_seconds += time.perf_counter() - self._start
            self._start = None

    @property
    def images_per_sec(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else 0.0


class KNNMonitor(L.Callback):
    """Weighted kNN accuracy (InstDisc protocol) of the backbone every ``every_n_epochs`` epochs.

    Runs on global rank 0 only (the other ranks wait at the next collective), logs ``knn/top1`` and ``knn/top5``,
    and keeps a history of ``(epoch, step, train_seconds, top1, top5)`` for the time-to-accuracy curve (``epoch`` and
    ``step`` are 0-based indices of the epoch and of its last optimizer step, as in ``metrics.csv``), with the
    training time read from ``clock`` (which excludes the monitor's own time).

    Args:
        bank, query: labelled image sets (uint8 tensors): the memory bank and the evaluated queries.
        mean, std: input normalisation. k: neighbours (200). temperature: (0.1). every_n_epochs: (1).
        batch_size: feature extraction batch (512). size: evaluation resize (None = native).
        keep_features: keep the last evaluation's features as ``last_features = (global_step, bank, query)`` so that
            a final evaluation at the same step (the linear probe) does not extract them again. Default False.
    """

    def __init__(
        self,
        bank: ImageTensors,
        query: ImageTensors,
        mean: list[float],
        std: list[float],
        num_classes: int,
        k: int = 200,
        temperature: float = 0.1,
        every_n_epochs: int = 1,
        batch_size: int = 512,
        size: int | None = None,
        clock: TrainClock | None = None,
        keep_features: bool = False,
    ) -> None:
        self.clock = clock or TrainClock()
        self.keep_features = keep_features
        self.last_features: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.bank, self.query = bank, query
        self.mean, self.std = mean, std
        self.num_classes = num_classes
        self.k, self.temperature = min(k, len(bank)), temperature
        self.every = every_n_epochs
        self.batch_size, self.size = batch_size, size
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def evaluate(self, backbone: torch.nn.Module, device: torch.device, step: int = -1) -> dict[str, float]:
        bank_f = extract_features(backbone, self.bank.images, self.mean, self.std, self.batch_size, device, self.size)
        query_f = extract_features(backbone, self.query.images, self.mean, self.std, self.batch_size, device,
                                   self.size)
        if self.keep_features:
            self.last_features = (step, bank_f, query_f)
        assert self.bank.labels is not None and self.query.labels is not None
        return knn_evaluate(bank_f, self.bank.labels.to(device), query_f, self.query.labels.to(device),
                            self.num_classes, k=self.k, temperature=self.temperature)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1  # epochs trained, this one included
        last = done == trainer.max_epochs or 0 < trainer.max_steps <= trainer.global_step
        if self.every <= 0 or (done % self.every != 0 and not last):
            return
        if trainer.global_rank != 0:
            return
        res = self.evaluate(pl_module.backbone, pl_module.device, trainer.global_step)  # type: ignore[attr-defined]
        # 0-based epoch and step indices, as in the metrics.csv row of the same value and the checkpoint names
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step - 1,
                             "train_seconds": self.clock.train_seconds,
                             "knn_top1": res["top1"], "knn_top5": res["top5"]})
        pl_module.log("knn/top1", res["top1"], rank_zero_only=True, prog_bar=True)
        pl_module.log("knn/top5", res["top5"], rank_zero_only=True)
