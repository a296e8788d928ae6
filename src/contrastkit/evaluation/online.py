"""Online linear probe: a linear classifier trained alongside pretraining, as a cheap monitor.

Enabled with ``train.online_linear=true`` (off by default). After every training batch (Lightning's
``on_train_batch_end``, i.e. after the SSL optimizer step) the callback

1. takes the batch's **un-augmented** training images (the device-resident uint8 images at the batch's indices),
   resized to the training crop size and normalised like the evaluation,
2. computes their backbone features under ``torch.no_grad()`` with the backbone temporarily in eval mode (BatchNorm
   uses and does not update its running statistics; every ``training`` flag is restored), inside the trainer's
   precision context (autocast for mixed precision),
3. measures the accuracy of the current head on them (before the update: progressive validation), then takes one
   SGD step of its own optimizer on the cross-entropy of ``BatchNorm1d(D, affine=False) -> Linear(D, C)`` (zero
   initialised), with ``train.online_linear_lr`` (default 0.1), momentum 0.9, no weight decay.

The features are detached and the head lives outside the Lightning module: its loss never reaches the SSL
objective, its parameters are not in the SSL optimizer, and it draws no random numbers, so the SSL run (gradients,
weights, BatchNorm statistics, random streams) is exactly the same with and without it (tested). It costs one
inference forward of the batch per step (a two-view training step is about six forward-equivalents, so roughly
+15 %; an estimate, not a measurement).

Logged: ``online_linear/acc`` (percent, mean over the epoch's batches) and ``online_linear/loss``; the per-epoch
history goes to ``results.json`` (``online_linear_top1``: the last epoch). It is a training-set accuracy of a head
that sees each image once per epoch: a trend monitor, not a substitute for the offline linear probe. Under DDP
each process trains its own head on its shard; the logged values are averaged over the processes at the end of
each epoch (the ``results.json`` history is rank 0's). The head and its optimizer state are saved
in checkpoints and restored with ``--resume``.

Labels come from the training split (``data.train_split``), which must be labelled.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit.augment.views import normalize_uint8
from contrastkit.errors import ConfigError, DataError


class OnlineLinearProbe(L.Callback):
    """Train a linear head on detached, un-augmented backbone features of each training batch (module docstring).

    Args:
        labels: N int64 labels of the training images (indexed by the batch's indices).
        num_classes: number of classes C (>= 2).
        mean, std: input normalisation (0-1 scale), as the training views.
        size: resize side (the crop size) or ``None`` to keep the image size.
        lr: head learning rate (default 0.1). momentum: (default 0.9). weight_decay: (default 0.0).
        feature_dim: backbone output width D (default ``None``: the method's ``feature_dim`` at fit start).
    """

    def __init__(self, labels: Tensor, num_classes: int, mean: list[float], std: list[float],
                 size: int | None = None, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 feature_dim: int | None = None) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"invalid value {lr!r} for train.online_linear_lr: expected a finite number > 0")
        if num_classes < 2:
            raise DataError(f"train.online_linear needs at least 2 classes in the training split, got {num_classes}")
        self.labels = labels.long()
        self.num_classes, self.feature_dim = int(num_classes), feature_dim
        self.mean, self.std, self.size = list(mean), list(std), size
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict[str, float]] = []
        self._pending: dict[str, Any] | None = None
        self._hits: Tensor | float = 0.0  # device tensors during an epoch: no host sync per step
        self._loss_sum: Tensor | float = 0.0
        self._seen = 0

    @classmethod
    def from_config(cls, cfg: Any, data: Any, mean: list[float], std: list[float]) -> OnlineLinearProbe:
        """Build from the run configuration and the training :class:`~contrastkit.data.ImageTensors`."""
        if data.labels is None:
            raise DataError(
                f"train.online_linear needs labels, but {cfg.data.name} split {cfg.data.train_split!r} has none; "
                "train on a labelled split or set train.online_linear=false"
            )
        crop = cfg.views.crop_size
        size = crop if crop and crop != int(data.images.shape[-1]) else None
        num_classes = len(data.classes) if data.classes else int(data.labels.max()) + 1
        return cls(data.labels, num_classes, mean, std, size=size, lr=cfg.train.online_linear_lr)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": self.history}
        if self.head is not None and self.optimizer is not None:
            state["head"] = self.head.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        if "head" in state_dict:
            self._pending = state_dict
            if self.head is not None:
                self._apply_pending()

    def _apply_pending(self) -> None:
        assert self.head is not None and self.optimizer is not None and self._pending is not None
        self.head.load_state_dict(self._pending["head"])
        self.optimizer.load_state_dict(self._pending["optimizer"])
        self._pending = None

    def _build(self, device: torch.device) -> None:
        assert self.feature_dim is not None
        head = nn.Sequential(nn.BatchNorm1d(self.feature_dim, affine=False), nn.Linear(self.feature_dim,
                                                                                        self.num_classes))
        with torch.no_grad():
            head[1].weight.zero_()
            head[1].bias.zero_()
        self.head = head.to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.lr, momentum=self.momentum,
                                         weight_decay=self.weight_decay)
        if self._pending is not None:
            self._apply_pending()

    # ------------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.labels = self.labels.to(pl_module.device)
        if self.head is None:
            if self.feature_dim is None:
                self.feature_dim = int(pl_module.method.feature_dim)  # type: ignore[attr-defined]
            self._build(pl_module.device)
        else:
            self.head.to(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hits, self._seen, self._loss_sum = 0.0, 0, 0.0

    def features(self, trainer: L.Trainer, pl_module: L.LightningModule, images: Tensor) -> Tensor:
        """Backbone features (B x D float32, no gradient) of a uint8 batch, backbone in eval mode."""
        backbone: nn.Module = pl_module.backbone  # type: ignore[assignment]
        param = next(backbone.parameters())
        x = normalize_uint8(images.to(param.device), self.mean, self.std, self.size).to(param.dtype)  # BxCxsxs
        if getattr(pl_module.cfg.model, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        modes = [(m, m.training) for m in backbone.modules()]
        backbone.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                feats = backbone(x)
        finally:
            for m, training in modes:
                m.training = training
        return feats.detach().float()  # B x D

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.head is not None and self.optimizer is not None
        images = pl_module.images  # type: ignore[attr-defined]
        trained = getattr(pl_module, "trained_indices", None)  # a batch plug-in's kept indices, not its pool
        batch = batch if trained is None else trained
        idx = batch.to(images.device)
        feats = self.features(trainer, pl_module, images[idx])  # B x D
        y = self.labels[batch.to(self.labels.device)]  # B
        self.head.train()
        with torch.enable_grad():
            logits = self.head(feats)  # B x C
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        hits = (logits.detach().argmax(dim=1) == y).sum()
        n = int(y.shape[0])
        self._hits = self._hits + hits.double()
        self._loss_sum = self._loss_sum + loss.detach().double() * n
        self._seen += n
        # epoch-level only: under DDP the mean over processes is taken once, at the end of the epoch
        pl_module.log("online_linear/acc", 100.0 * hits.float() / n, on_step=False, on_epoch=True, batch_size=n,
                      sync_dist=True)
        pl_module.log("online_linear/loss", loss.detach(), on_step=False, on_epoch=True, batch_size=n,
                      sync_dist=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._seen:
            # 0-based epoch and step indices, as in the metrics.csv row of the same value
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step - 1,
                                 "online_linear_top1": 100.0 * float(self._hits) / self._seen,
                                 "online_linear_loss": float(self._loss_sum) / self._seen})
