"""``train(config)``: the whole pretraining run, usable without the CLI.

Builds the dataset, the Lightning module and trainer (devices, DDP, precision, loggers, checkpoints, kNN
monitor), trains, evaluates, and writes ``RUN_DIR/results.json`` (atomically, on global rank 0 only).

Run directory layout::

    RUN_DIR/config.yaml             the resolved configuration
    RUN_DIR/checkpoints/epoch=NNN.ckpt, last.ckpt
    RUN_DIR/logs/csv/metrics.csv    CSV log (Lightning CSVLogger)
    RUN_DIR/logs/tensorboard/       TensorBoard log
    RUN_DIR/results.json            final metrics, kNN history (time-to-accuracy), throughput, peak memory
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from contrastkit.config import Config, config_from_dict, to_yaml
from contrastkit.data import ImageTensors, load_dataset
from contrastkit.errors import ConfigError, DataError
from contrastkit.training.callbacks import AtomicCheckpointIO, KNNMonitor, TrainClock
from contrastkit.training.module import SSLModule, index_loader, steps_per_epoch


@dataclass
class TrainResult:
    """What :func:`train` returns (also written to ``RUN_DIR/results.json``)."""

    run_dir: Path
    last_checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)


class _IndexData(L.LightningDataModule):
    """Index batches sharded by the trainer's rank/world size (known only once the trainer is launched)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def train_dataloader(self) -> Any:
        return index_loader(self.n, self.batch_size, self.seed, self.trainer.world_size, self.trainer.global_rank)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def load_split(cfg: Config, split: str) -> ImageTensors:
    """Load one split of the configured dataset (``data.name``, ``data.root``, ``data.image_size``, options)."""
    for key in ("root", "split", "image_size"):
        if key in cfg.data.options:
            raise ConfigError(f"data.options.{key} is not an option: set data.{key if key != 'split' else 'train_split'}"
                              " instead")
    return load_dataset(cfg.data.name, root=cfg.data.root, split=split, image_size=cfg.data.image_size,
                        **cfg.data.options)


def load_monitor_sets(cfg: Config) -> tuple[ImageTensors, ImageTensors] | None:
    """The labelled bank/query sets of the kNN monitor, or None when off."""
    if not cfg.data.monitor_bank_split or not cfg.data.monitor_query_split:
        return None
    bank = load_split(cfg, cfg.data.monitor_bank_split)
    query = load_split(cfg, cfg.data.monitor_query_split)
    if bank.labels is None or query.labels is None:
        raise DataError(
            f"the kNN monitor needs labelled splits, but {cfg.data.name} split "
            f"{cfg.data.monitor_bank_split if bank.labels is None else cfg.data.monitor_query_split!r} has no "
            "labels; set data.monitor_bank_split/monitor_query_split to labelled splits or null"
        )
    if cfg.data.monitor_bank_size and cfg.data.monitor_bank_size < len(bank):
        g = torch.Generator().manual_seed(cfg.train.seed)
        bank = bank.subset(torch.randperm(len(bank), generator=g)[: cfg.data.monitor_bank_size])
    return bank, query


def _precision(p: str) -> str:
    return "32-true" if str(p) == "32" else str(p)


def build_trainer(cfg: Config, callbacks: list[L.Callback], run_dir: Path, checkpoints: bool = True) -> L.Trainer:
    """A Lightning trainer configured from ``cfg.train`` (devices, strategy, precision, loggers, checkpoints).

    ``checkpoints=False`` writes no checkpoint at all (benchmarks)."""
    cbs: list[L.Callback] = list(callbacks)
    if checkpoints:
        cbs.insert(0, ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="epoch={epoch:03d}", auto_insert_metric_name=False,
            every_n_epochs=1, save_top_k=-1, save_last=True,
        ))
    if cfg.train.progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=10))
    try:
        return L.Trainer(
            accelerator=cfg.train.accelerator,
            devices=cfg.train.devices,
            num_nodes=cfg.train.num_nodes,
            strategy=cfg.train.strategy,
            precision=_precision(cfg.train.precision),  # type: ignore[arg-type]
            sync_batchnorm=cfg.train.sync_batchnorm,
            max_epochs=cfg.train.epochs,
            max_steps=cfg.train.max_steps,
            accumulate_grad_batches=cfg.optim.accumulate_grad_batches,
            gradient_clip_val=cfg.optim.gradient_clip_val or None,
            logger=[
                CSVLogger(run_dir / "logs", name="csv", version=""),
                TensorBoardLogger(run_dir / "logs", name="tensorboard", version=""),
            ],
            callbacks=cbs,
            enable_checkpointing=checkpoints,
            log_every_n_steps=cfg.train.log_every_n_steps,
            enable_progress_bar=cfg.train.progress_bar,
            enable_model_summary=False,
            use_distributed_sampler=False,  # our index sampler is already distributed-aware
            plugins=[AtomicCheckpointIO()],
            num_sanity_val_steps=0,
            deterministic=False,
            default_root_dir=str(run_dir),
        )
    except (ValueError, RuntimeError, TypeError) as e:  # Lightning's message names the bad setting
        raise ConfigError(f"invalid trainer setting: {str(e).splitlines()[0]}") from None


def train(cfg: Config, callbacks: list[L.Callback] | None = None) -> TrainResult:
    """Pretrain according to ``cfg`` and return the run's metrics (see the module docstring for outputs).

    ``cfg.train.resume`` continues from a checkpoint (``"last"`` = ``RUN_DIR/checkpoints/last.ckpt``): model,
    optimizer, schedule, step counters and random generators are restored, so the run continues exactly.
    ``callbacks`` are extra Lightning callbacks (e.g. for tests or custom logging).
    """
    cfg.validate()
    run_dir = Path(cfg.train.run_dir)
    resume = cfg.train.resume
    if resume == "last":
        resume = str(run_dir / "checkpoints" / "last.ckpt")
    if resume and not Path(resume).is_file():
        raise ConfigError(f"train.resume: checkpoint {resume!r} not found; pass a .ckpt path or 'last' with the "
                          "same train.run_dir")
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    L.seed_everything(cfg.train.seed, verbose=False)

    data = load_split(cfg, cfg.data.train_split)
    if len(data) == 0:
        raise DataError(f"dataset {cfg.data.name} split {cfg.data.train_split!r} is empty; check data.root")
    mean, std = data.channel_stats()
    monitor_sets = load_monitor_sets(cfg) if cfg.train.knn_every_n_epochs > 0 or cfg.eval.knn else None

    clock = TrainClock()
    extra: list[L.Callback] = [clock, *(callbacks or [])]
    knn_cb = None
    if monitor_sets is not None:
        bank, query = monitor_sets
        num_classes = int(max(bank.labels.max(), query.labels.max())) + 1  # type: ignore[union-attr]
        knn_cb = KNNMonitor(bank, query, mean, std, num_classes, k=cfg.train.knn_k,
                            temperature=cfg.train.knn_temperature,
                            every_n_epochs=cfg.train.knn_every_n_epochs if cfg.train.knn_every_n_epochs > 0
                            else 10**9, batch_size=cfg.eval.batch_size,
                            size=eval_size(cfg, int(data.images.shape[-1])), clock=clock,
                            keep_features=cfg.eval.linear)
        extra.append(knn_cb)

    online_cb = None
    if cfg.train.online_linear:  # optional online linear probe (contrastkit.evaluation.online)
        from contrastkit.evaluation.online import OnlineLinearProbe

        online_cb = OnlineLinearProbe.from_config(cfg, data, mean, std)
        extra.append(online_cb)

    trainer = build_trainer(cfg, extra, run_dir)
    world = trainer.world_size
    spe = steps_per_epoch(len(data), cfg.optim.batch_size, world, cfg.optim.accumulate_grad_batches)
    if spe == 0:
        raise DataError(
            f"optim.batch_size={cfg.optim.batch_size} x {world} process(es) is larger than the dataset "
            f"({len(data)} images): lower optim.batch_size"
        )
    module = SSLModule(cfg.to_dict(), data.channels, int(data.images.shape[-1]), mean, std, spe, world)
    module.attach_images(data.images)
    if trainer.global_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=_IndexData(len(data), cfg.optim.batch_size, cfg.train.seed), ckpt_path=resume)
    wall = time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "method": cfg.method.name, "loss": cfg.method.loss, "backbone": cfg.model.backbone,
        "dataset": cfg.data.name, "epochs": cfg.train.epochs, "batch_size": cfg.optim.batch_size,
        "world_size": world, "steps": trainer.global_step, "fit_wall_seconds": wall,
        "peak_memory_mb": _peak_memory_mb(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
    }
    metrics["train_seconds"] = clock.train_seconds
    metrics["images_per_sec"] = clock.images_per_sec
    metrics["seconds_per_epoch"] = clock.train_seconds / max(1, trainer.current_epoch)
    if knn_cb is not None:
        metrics["knn_history"] = knn_cb.history
        if knn_cb.history:
            metrics["knn_top1"] = knn_cb.history[-1]["knn_top1"]
            metrics["knn_top5"] = knn_cb.history[-1]["knn_top5"]
    if online_cb is not None and online_cb.history:
        metrics["online_linear_history"] = online_cb.history
        metrics["online_linear_top1"] = online_cb.history[-1]["online_linear_top1"]
    if trainer.global_rank == 0 and monitor_sets is not None and (cfg.eval.baselines or cfg.eval.linear):
        features = None
        if knn_cb is not None and knn_cb.last_features is not None and knn_cb.last_features[0] == trainer.global_step:
            features = knn_cb.last_features[1:]  # the monitor already embedded both sets with the final weights
        metrics.update(final_evaluation(cfg, module, mean, std, *monitor_sets, features=features))
    last = run_dir / "checkpoints" / "last.ckpt"
    if trainer.global_rank == 0:
        write_json_atomic(run_dir / "results.json", metrics)
    return TrainResult(run_dir, last if last.exists() else None, metrics)


def eval_size(cfg: Config, image_side: int) -> int | None:
    """Evaluation input size: the training crop size when it differs from the stored images, else native."""
    crop = cfg.views.crop_size
    return crop if crop and crop != image_side else None


def final_evaluation(cfg: Config, module: SSLModule, mean: list[float], std: list[float], bank: ImageTensors,
                     query: ImageTensors, features: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> dict[str, Any]:
    """Baselines and the linear probe, on the monitor's labelled splits.

    Baselines (``eval.baselines``): the same kNN on the random-init backbone, on raw pixels normalised per channel
    like the network's input (``raw_pixels_knn``), and on raw pixels in [0, 1] (``raw_pixels_unnormalised_knn``;
    cosine similarity of non-negative vectors, the weaker of the two, and the usual "raw pixels" row elsewhere).

    ``features``: the trained backbone's ``(bank, query)`` features if already extracted (by the kNN monitor at
    the final step); otherwise they are extracted here."""
    from contrastkit.evaluation import extract_features, knn_evaluate, linear_probe
    from contrastkit.models import build_backbone

    device = module.device
    size = eval_size(cfg, int(module.hparams["image_size"]))
    assert bank.labels is not None and query.labels is not None
    yb, yq = bank.labels.to(device), query.labels.to(device)
    num_classes = int(max(yb.max(), yq.max())) + 1
    k, t = min(cfg.train.knn_k, len(bank)), cfg.train.knn_temperature
    out: dict[str, Any] = {}
    if cfg.eval.baselines:
        torch.manual_seed(cfg.train.seed)
        rand, _ = build_backbone(cfg.model.backbone, bank.channels, cfg.model.cifar_stem, cfg.model.widths,
                                 cfg.model.blocks, stem_stride=cfg.model.stem_stride)
        rand = rand.to(device)
        fb = extract_features(rand, bank.images, mean, std, cfg.eval.batch_size, device, size)
        fq = extract_features(rand, query.images, mean, std, cfg.eval.batch_size, device, size)
        out["random_init_knn"] = knn_evaluate(fb, yb, fq, yq, num_classes, k=k, temperature=t)
        pix = torch.nn.Flatten()
        fb = extract_features(pix, bank.images, mean, std, cfg.eval.batch_size, device)
        fq = extract_features(pix, query.images, mean, std, cfg.eval.batch_size, device)
        out["raw_pixels_knn"] = knn_evaluate(fb, yb, fq, yq, num_classes, k=k, temperature=t)
        zero, one = [0.0] * bank.channels, [1.0] * bank.channels  # pixels in [0, 1], not centred
        fb = extract_features(pix, bank.images, zero, one, cfg.eval.batch_size, device)
        fq = extract_features(pix, query.images, zero, one, cfg.eval.batch_size, device)
        out["raw_pixels_unnormalised_knn"] = knn_evaluate(fb, yb, fq, yq, num_classes, k=k, temperature=t)
    if cfg.eval.linear:
        if features is not None:
            fb, fq = features[0].to(device), features[1].to(device)
        else:
            fb = extract_features(module.backbone, bank.images, mean, std, cfg.eval.batch_size, device, size)
            fq = extract_features(module.backbone, query.images, mean, std, cfg.eval.batch_size, device, size)
        res = linear_probe(fb, yb, fq, yq, num_classes, epochs=cfg.eval.linear_epochs, device=device,
                           seed=cfg.train.seed)
        out["linear"] = res.to_dict()
        out["linear_top1"] = res.top1
    return out


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except Exception:  # pragma: no cover
        return float("nan")


def config_of_checkpoint(path: str | Path) -> Config:
    """The configuration a checkpoint was trained with."""
    from contrastkit.checkpoint import load_checkpoint_file

    return config_from_dict(load_checkpoint_file(path)["hyper_parameters"]["config"])
