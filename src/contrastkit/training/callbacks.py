"""Training callbacks: the online kNN monitor and atomic checkpoint writing."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from contrastkit.data import ImageTensors
from contrastkit.evaluation import extract_features, knn_evaluate


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint I/O that never leaves a half-written file and never runs code on load.

    Saving writes ``<name>.tmp`` and renames it over ``<name>`` (``os.replace`` is atomic on POSIX), so an
    interrupted save leaves the previous checkpoint intact. Loading uses ``torch.load(weights_only=True)``: a
    checkpoint that would need to unpickle arbitrary objects is refused.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        from contrastkit.checkpoint import safe_load

        return safe_load(path, map_location=map_location or "cpu")


class TrainClock(L.Callback):
    """Training wall-clock time and images seen, excluding the time spent in monitors at epoch end.

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
        self.images += int(batch.shape[0]) * trainer.world_size

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
    and keeps a history of ``(epoch, step, train_seconds, top1, top5)`` for the time-to-accuracy curve, with the
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
        epoch = trainer.current_epoch + 1
        if self.every <= 0 or (epoch % self.every != 0 and epoch != trainer.max_epochs):
            return
        if trainer.global_rank != 0:
            return
        res = self.evaluate(pl_module.backbone, pl_module.device, trainer.global_step)  # type: ignore[attr-defined]
        self.history.append({"epoch": epoch, "step": trainer.global_step, "train_seconds": self.clock.train_seconds,
                             "knn_top1": res["top1"], "knn_top5": res["top5"]})
        pl_module.log("knn/top1", res["top1"], rank_zero_only=True, prog_bar=True)
        pl_module.log("knn/top5", res["top5"], rank_zero_only=True)
