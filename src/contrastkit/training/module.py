"""The Lightning module that trains any :class:`~contrastkit.methods.base.SSLMethod`.

Data path (the airbench way): the whole training set lives on the training device as a ``N x C x H x W`` uint8
tensor; the DataLoader only yields batches of indices (a :class:`torch.utils.data.DistributedSampler`, so every
epoch's order is a function of ``(seed, epoch)`` and DDP ranks get disjoint shards). The module gathers the
images of a batch on the device and makes the views there with the batched
:class:`~contrastkit.augment.ViewGenerator`; no worker processes compete with the model for the CPU.

Randomness is checkpointed: every rank's augmentation generator (seeded from ``(seed, rank)``; gathered from all
ranks, each rank restores its own), torch's global CPU and current CUDA device's generators (from rank 0; the
ranks draw the same from them, see docs/architecture.md), so that ``--resume`` continues exactly as an
uninterrupted run (tests/test_training.py, tests/test_training_distributed.py).

DDP: the memory queues' buffers are excluded from DDP's buffer broadcast (:meth:`SSLModule.setup`); the EMA
teacher and the queues are updated once per optimizer step *taken* (:meth:`SSLModule.optimizer_step`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from contrastkit.augment import ViewGenerator, policy_preset
from contrastkit.augment.views import ViewPolicy
from contrastkit.config import Config, config_from_dict, scaled_lr
from contrastkit.distributed import gather_objects
from contrastkit.data import ImageTensors
from contrastkit.errors import ConfigError, ContrastkitError, DataError
from contrastkit.methods import SSLMethod, build_method
from contrastkit.models import backbone_args, build_backbone
from contrastkit.models.queue import ddp_ignored_buffers
from contrastkit.plugins import StepContext, build_plugins
from contrastkit.training.callbacks import divergence_error
from contrastkit.training.optim import build_optimizer, warmup_cosine


class IndexDataset(Dataset):
    """``range(n)`` as a dataset: the loader yields index batches, the images stay on the device."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.as_tensor(indices, dtype=torch.long)


def _identity_collate(batch: torch.Tensor) -> torch.Tensor:
    return batch


class PoolBatchSampler(Sampler[list[int]]):
    """Candidate pools of ``pool_factor x batch_size`` indices, one per step of the host's epoch.

    Pool ``t`` is the host's batch ``t`` (positions ``t*B .. (t+1)*B`` of the sampler's order for the epoch) followed
    by the next ``pool_factor - 1`` batches of that order, wrapping around this rank's shard: so its first
    ``batch_size`` indices are exactly the host's batch, the epoch has the host's number of steps, every index lies
    in ``pool_factor`` pools per epoch, and no pool holds an index twice (``pool_factor x batch_size`` must not
    exceed the shard). The order is the wrapped sampler's, a function of ``(seed, epoch)``, so resume is exact.
    Lightning calls ``set_epoch`` on ``self.sampler``.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, pool_factor: int) -> None:
        if pool_factor * batch_size > len(sampler):
            raise DataError(f"a candidate pool of {pool_factor} x optim.batch_size={batch_size} images is larger than "
                            f"this process's {len(sampler)} training images: lower the pool factor or the batch size")
        self.sampler, self.batch_size, self.pool_factor = sampler, batch_size, pool_factor

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        size = self.batch_size * self.pool_factor
        for t in range(len(self)):
            yield [order[(t * self.batch_size + j) % len(order)] for j in range(size)]


def index_loader(n: int, batch_size: int, seed: int, num_replicas: int, rank: int, pool_factor: int = 1) -> DataLoader:
    """Deterministic shuffled index batches; each rank gets ``n // num_replicas`` indices, last partial batch dropped.
    ``pool_factor > 1`` (a batch plug-in's candidate pool): each batch is a :class:`PoolBatchSampler` pool."""
    sampler = DistributedSampler(
        IndexDataset(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    if pool_factor > 1:
        return DataLoader(IndexDataset(n), batch_sampler=PoolBatchSampler(sampler, batch_size, pool_factor),
                          num_workers=0, collate_fn=_identity_collate)
    return DataLoader(
        IndexDataset(n), batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=0,
        collate_fn=_identity_collate,
    )


def build_view_policies(cfg: Config, image_size: int) -> list[ViewPolicy]:
    """The per-view augmentation policies of the run: the preset, then common and per-view overrides."""
    crop = cfg.views.crop_size or image_size
    if crop > image_size:
        raise ConfigError(f"views.crop_size={crop} is larger than the dataset's {image_size} px images; use at most "
                          f"{image_size} (null = {image_size}), or decode larger images (data.image_size)")
    policies = policy_preset(cfg.views.preset, crop, cfg.views.num_views)
    if cfg.views.overrides and len(cfg.views.overrides) != cfg.views.num_views:
        raise ConfigError(
            f"views.overrides has {len(cfg.views.overrides)} entries but views.num_views is {cfg.views.num_views}; "
            "give one mapping per view (use {} for no change)"
        )
    out = []
    for i, p in enumerate(policies):
        fields = {**cfg.views.common, **(cfg.views.overrides[i] if cfg.views.overrides else {})}
        for k, v in fields.items():
            if not hasattr(p, k):
                raise ConfigError(f"unknown view policy field {k!r} in views.common/views.overrides")
            setattr(p, k, tuple(v) if isinstance(v, list) else v)
        p.validate()
        out.append(p)
    return out


class SSLModule(L.LightningModule):
    """Trains ``method`` on device-resident uint8 images with batched on-device views.

    Args:
        config: the run configuration (saved in checkpoints as a plain dict).
        in_channels: image channels of the dataset.
        image_size: image side of the dataset (default crop size).
        mean, std: per-channel normalisation in [0, 1] pixel units.
        steps_per_epoch: optimizer steps per epoch (for the per-step schedule and ``progress``).
        world_size: number of training processes (for the learning-rate scaling rule).
    """

    def __init__(
        self,
        config: dict[str, Any],
        in_channels: int,
        image_size: int,
        mean: list[float],
        std: list[float],
        steps_per_epoch: int,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: Config = config_from_dict(config)
        cfg = self.cfg
        backbone, dim = build_backbone(cfg.model.backbone, **backbone_args(cfg.model.backbone, cfg.model, in_channels))
        crop = cfg.views.crop_size or image_size
        if crop < getattr(backbone, "min_size", 1):  # ConvNet: each block halves the side
            raise ConfigError(f"model.backbone={cfg.model.backbone} with {len(cfg.model.widths)} model.widths needs "
                              f"inputs of at least {backbone.min_size} px, got {crop} px crops: use fewer "
                              "model.widths or a larger views.crop_size")
        if cfg.model.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.method: SSLMethod = build_method(backbone, dim, cfg.method)
        self.method.use_plugins(build_plugins(cfg))
        self.views = ViewGenerator(build_view_policies(cfg, image_size), mean, std)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.train.epochs
        self.peak_lr = scaled_lr(cfg, world_size)
        self.images: torch.Tensor | None = None  # N x C x H x W uint8, set by attach_images()
        # monitoring only, never training: the training labels (N int64, or None) and the kNN monitor's bank
        self.labels: torch.Tensor | None = None
        self.monitor_bank: ImageTensors | None = None
        self.trained_indices: torch.Tensor | None = None  # the indices trained at the current step (after select)
        self._aug_gen: torch.Generator | None = None
        self._aug_gen_states: list[torch.Tensor] | None = None  # restored from a checkpoint: one per rank
        self._cuda_rng_state: torch.Tensor | None = None  # restored from a checkpoint, set once on the device
        self._t_last: float | None = None
        # train.compile: torch.compile's wrapper of the backbone, kept in a plain dict (not a registered sub-module)
        # so that state dicts, checkpoints and exports keep the plain parameter names (no ``_orig_mod.`` prefix)
        self._compiled: dict[str, torch.nn.Module] = {}
        self._stepped = False  # set by the optimizer's step post-hook: the last optimizer_step really stepped

    # ----------------------------------------------------------------------------------------------------- data
    def attach_images(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """The training images (uint8 ``N x C x H x W``); moved to the device when training starts. ``labels``
        (``N`` int64, optional) are for monitors only (plug-ins' diagnostics); training never reads them."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ContrastkitError("training images must be a uint8 N x C x H x W tensor")
        self.images, self.labels = images, labels

    @property
    def backbone(self) -> torch.nn.Module:
        return self.method.backbone

    def setup(self, stage: str) -> None:
        # Lightning's DDP strategies keep DDP's broadcast_buffers=True: before every forward, rank 0's buffers
        # overwrite the others'. For BatchNorm statistics that is harmless, but the memory queues are per-process
        # state (per rank with method.gather_distributed=false; global, identical and then needlessly sent every
        # step, otherwise): DDP's ignore list keeps them out of the broadcast (and of parameter syncing).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ddp_ignored_buffers(self))

    def on_fit_start(self) -> None:
        if self.images is None:
            raise ContrastkitError("no training images attached: call module.attach_images(images) first")
        if self.images.device != self.device:
            self.images = self.images.to(self.device, non_blocking=True)
        self._aug_gen = torch.Generator(device=self.device)
        self._aug_gen.manual_seed(self.cfg.train.seed * 1000003 + self.global_rank)
        if self._aug_gen_states is not None and self.global_rank < len(self._aug_gen_states):
            self._aug_gen.set_state(self._aug_gen_states[self.global_rank])  # this rank's own stream
        self._aug_gen_states = None
        if self._cuda_rng_state is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(self._cuda_rng_state, device=self.device)
        self._cuda_rng_state = None

    # ------------------------------------------------------------------------------------------------- training
    def progress(self) -> float:
        return min(1.0, self.global_step / max(1, self.total_steps))

    @torch.no_grad()
    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Augmented, normalised views of a uint8 batch (in the model's memory format)."""
        views = self.views(images, generator=generator)  # V x (B x C x h x w)
        if self.cfg.model.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def step_context(self, indices: torch.Tensor | None = None) -> StepContext:
        """What the plug-ins know about the current step (see :class:`contrastkit.plugins.StepContext`)."""
        return StepContext(progress=self.progress(), global_step=self.global_step, epoch=self.current_epoch,
                           generator=self._aug_gen, indices=indices, rank=self.global_rank,
                           world_size=self.trainer.world_size if self._trainer is not None else 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        assert self.images is not None
        plugins = self.method.plugins  # hooks in their fixed order: batch, input (in the method), targets, extra
        plugins.begin_step(self.step_context(batch))
        batch = plugins.select_batch(batch, self)
        self.trained_indices = batch
        imgs = self.images[batch]  # B x C x H x W uint8, on the device
        views = plugins.batch_views()  # the views a batch plug-in scored, if it made them
        if views is None:
            views = self.make_views(imgs, self._aug_gen)
        out = plugins.add_extra_losses(self.training_loss(views))
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            raise divergence_error(self.cfg, f"the loss diverged (value {loss.item()}) at step {self.global_step}; "
                                   "no checkpoint was written for it, the earlier ones are intact")
        bs = imgs.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in out.items():
            if k != "loss":
                self.log(f"train/{k}", v, batch_size=bs)
        now = time.perf_counter()
        if self._t_last is not None:
            ips = bs * self.trainer.world_size / max(1e-9, now - self._t_last)
            self.log("train/images_per_sec", ips, prog_bar=True, batch_size=bs)
        self._t_last = now
        return loss

    def training_loss(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``method.forward_loss(views, progress)``; with ``train.compile`` the backbone runs compiled.

        ``torch.compile`` (default inductor backend) wraps the backbone on first use; the wrapper shares the
        backbone's parameters and buffers and stands in for ``method.backbone`` only during this call, so the
        kNN monitor, evaluation, checkpoints and exports see the plain module (training only)."""
        if not self.cfg.train.compile:
            return self.method.forward_loss(views, self.progress())
        plain = self.method.backbone
        if "backbone" not in self._compiled:
            self._compiled["backbone"] = torch.compile(plain)
        self.method.backbone = self._compiled["backbone"]
        try:
            return self.method.forward_loss(views, self.progress())
        finally:
            self.method.backbone = plain

    def on_train_epoch_start(self) -> None:
        self._t_last = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's step (closure, precision plugin, optimizer), then the method's EMA and queue updates: once
        per optimizer step taken, after gradient accumulation. When the fp16 grad scaler skips the step (non-finite
        gradients; ``optimizer.step`` is then never called, so the post-hook below does not fire) the teacher does
        not move either and the step's staged queue keys are dropped."""
        self._stepped = False
        super().optimizer_step(*args, **kwargs)
        if self._stepped:
            self.method.after_optimizer_step(self.progress())
            self.method.plugins.after_optimizer_step()
        else:
            self.method.after_skipped_step()

    def _mark_stepped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        if isinstance(opt, list):
            opt = opt[0]
        self.log("train/lr", opt.param_groups[0]["lr"], batch_size=1)

    def configure_optimizers(self) -> Any:
        groups = self.method.parameter_groups()
        factors = {"predictor": self.cfg.optim.predictor_lr_factor}  # configured factors of the host's groups
        for g in groups:  # each group: its own factor (plug-ins: their option) x the configured one for its name
            g.lr_factor *= factors.get(g.name, 1.0)
        optimizer = build_optimizer(groups, self.cfg.optim, self.peak_lr)
        optimizer.register_step_post_hook(self._mark_stepped)
        warmup = int(round(self.cfg.optim.warmup_epochs * self.steps_per_epoch))
        schedule = warmup_cosine(self.total_steps, warmup, self.cfg.optim.warmup_start_factor,
                                 self.cfg.optim.min_lr_factor)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only rank 0 writes the checkpoint. torch's global generators (MoCo's shuffle permutation draws from
        # them): every rank draws the same numbers from them (same seed, same calls), so rank 0's state is every
        # rank's. The augmentation generators differ by rank: all of them are gathered (this hook runs on every
        # rank, in Lightning's dump_checkpoint, so the collective is reached by all), index = rank.
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda_device"] = torch.cuda.get_rng_state(self.device)
        if self._aug_gen is not None:
            rng["augment_per_rank"] = gather_objects(self._aug_gen.get_state())
        checkpoint["contrastkit_rng"] = rng

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("contrastkit_rng")
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        self._cuda_rng_state = rng.get("cuda_device")  # set in on_fit_start, once the module is on its device
        # each rank picks its own in on_fit_start; a run with more processes than the checkpoint's seeds the rest
        # (checkpoints of earlier versions kept rank 0's generator only, under "augment")
        self._aug_gen_states = rng.get("augment_per_rank") or ([rng["augment"]] if "augment" in rng else None)


def steps_per_epoch(num_images: int, batch_size: int, world_size: int, accumulate: int) -> int:
    """Optimizer steps per epoch with drop_last sharding."""
    per_rank = num_images // world_size
    batches = per_rank // batch_size
    return max(0, math.ceil(batches / accumulate))
