"""``train(config)``: the whole pretraining run, usable without the CLI.

Builds the dataset, the Lightning module and trainer (devices, DDP, precision, loggers, checkpoints, kNN
monitor), trains, runs the final evaluation (:func:`contrastkit.evaluation.final_evaluation`), and writes
``RUN_DIR/results.json`` (atomically, on global rank 0 only).

Run directory layout::

    RUN_DIR/config.yaml             the configuration of the run (on resume: the resumed run's, see RESUMABLE)
    RUN_DIR/checkpoints/epoch=NNN.ckpt, last.ckpt
    RUN_DIR/logs/csv/metrics.csv    CSV log (continued, not restarted, on resume)
    RUN_DIR/logs/tensorboard/       TensorBoard log
    RUN_DIR/results.json            final metrics, kNN history (time-to-accuracy), throughput, peak memory, resumes

Run directory rules (the life cycle is in :class:`RunDirectory`): the run directory is always ``train.run_dir``
(command line or config file), never a path stored in a checkpoint. A new run refuses a non-empty run directory;
only a resume from a checkpoint inside ``RUN_DIR/checkpoints/`` continues in it. Everything that can be checked
(configuration, resume compatibility, run directory, data, trainer) is checked before training starts, and a run
that fails or is interrupted before its first checkpoint removes the run directory it created.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from contrastkit.config import (
    Config,
    TrainConfig,
    apply_overrides,
    check_devices,
    config_from_dict,
    resume_changes,
    to_yaml,
)
from contrastkit.data import ImageTensors, load_dataset
from contrastkit.errors import ConfigError, DataError, RunInterrupted
from contrastkit.evaluation.final import eval_size, final_evaluation, monitor_bank, split_role
from contrastkit.io import write_json_atomic, write_text_atomic
from contrastkit.methods import loss_name
from contrastkit.training.callbacks import (
    AtomicCheckpointIO,
    DivergenceGuard,
    KNNMonitor,
    ResumableCSVLogger,
    ResumeHistory,
    StderrProgressBar,
    TrainClock,
)
from contrastkit.training.module import SSLModule, index_loader, steps_per_epoch
from contrastkit.training.quiet import quiet_lightning


@dataclass
class TrainResult:
    """What :func:`train` returns (also written to ``RUN_DIR/results.json``)."""

    run_dir: Path
    last_checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)


class _IndexData(L.LightningDataModule):
    """Index batches sharded by the trainer's rank/world size (known only once the trainer is launched);
    ``pool_factor``: the plug-ins' candidate pool (:attr:`contrastkit.plugins.PluginSet.pool_factor`)."""

    def __init__(self, n: int, batch_size: int, seed: int, pool_factor: int = 1) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed, self.pool_factor = n, batch_size, seed, pool_factor

    def train_dataloader(self) -> Any:
        return index_loader(self.n, self.batch_size, self.seed, self.trainer.world_size, self.trainer.global_rank,
                            self.pool_factor)


def load_split(cfg: Config, split: str) -> ImageTensors:
    """Load one split of the configured dataset (``data.name``, ``data.root``, ``data.image_size``, options)."""
    for key in ("root", "split", "image_size"):
        if key in cfg.data.options:
            raise ConfigError(f"data.options.{key} is not an option: set data.{key if key != 'split' else 'train_split'}"
                              " instead")
    return load_dataset(cfg.data.name, root=cfg.data.root, split=split, image_size=cfg.data.image_size,
                        val_size=cfg.data.val_size, val_seed=cfg.data.val_seed, **cfg.data.options)


def load_monitor_sets(cfg: Config) -> tuple[ImageTensors, ImageTensors] | None:
    """The whole labelled bank and query splits (``data.monitor_bank_split``, ``data.monitor_query_split``), or
    None when off. The kNN monitor's bank is :func:`monitor_bank` of the first."""
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
    return bank, query


def _precision(p: str) -> str:
    return "32-true" if str(p) == "32" else str(p)


def build_trainer(cfg: Config, callbacks: list[L.Callback], run_dir: Path, checkpoints: bool = True,
                  resume_step: int = 0) -> L.Trainer:
    """A Lightning trainer configured from ``cfg.train`` (devices, strategy, precision, loggers, checkpoints).

    ``checkpoints=False`` writes no checkpoint at all (benchmarks). ``resume_step``: the global step of the
    checkpoint a run continues from; ``metrics.csv`` keeps its rows before that step and appends after them."""
    cbs: list[L.Callback] = list(callbacks)
    if checkpoints:
        cbs.insert(0, ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="epoch={epoch:03d}", auto_insert_metric_name=False,
            every_n_epochs=1, save_top_k=-1, save_last=True,
            enable_version_counter=False,  # a run owns its directory: never a last-v1.ckpt
        ))
        cbs.append(DivergenceGuard(cfg))
    if cfg.train.progress_bar:
        cbs.append(StderrProgressBar(refresh_rate=10))
    quiet_lightning()
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
                ResumableCSVLogger(run_dir / "logs", keep_before_step=resume_step, name="csv", version="",
                                   flush_logs_every_n_steps=cfg.train.log_every_n_steps),
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
    except (ValueError, RuntimeError, TypeError, MisconfigurationException) as e:  # Lightning's message names it
        raise ConfigError(f"invalid trainer setting: {str(e).splitlines()[0]}") from None


class RunDirectory:
    """The life cycle of a run directory on the launching process (global rank 0; other DDP ranks only train).

    :meth:`claim` refuses a non-empty directory unless ``resume`` is a checkpoint inside its ``checkpoints/``
    folder (then it must be the latest one there, so nothing is overwritten), and creates the directory (an
    unwritable path is a one-line error). :meth:`discard_unless_resumable` removes what :meth:`claim` created when
    the run stops before writing its first checkpoint, so a failed start leaves nothing behind.
    """

    def __init__(self, path: Path, resume: Path | None = None, epochs_done: int = 0) -> None:
        self.path, self.resume, self.epochs_done = path, resume, epochs_done
        self.checkpoints = path / "checkpoints"
        self.in_place = resume is not None and resume.resolve().parent == self.checkpoints.resolve()
        self._created: Path | None = None  # the top-most folder claim() created
        self._was_empty = False

    def claim(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"train.run_dir {str(p)!r} is a file; pass a folder for the run's outputs")
        if self.in_place:
            later = sorted(c.name for c in self.checkpoints.glob("epoch=*.ckpt") if _epoch_of(c) >= self.epochs_done)
            if later:
                raise ConfigError(
                    f"resuming {str(self.resume)!r} in {str(p)!r} would overwrite the later checkpoints "
                    f"{', '.join(later[:3])}{' ...' if len(later) > 3 else ''}: continue from "
                    f"{str(self.checkpoints / 'last.ckpt')!r}, or pass a new train.run_dir to branch off this one")
        elif p.is_dir() and any(p.iterdir()):
            names = sorted(c.name for c in p.iterdir())
            raise ConfigError(
                f"train.run_dir {str(p)!r} already holds a run ({', '.join(names[:4])}); pass a new train.run_dir, "
                f"continue it with --resume {str(self.checkpoints / 'last.ckpt')!r}, or delete the folder")
        existed, top = p.is_dir(), p
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        try:
            p.mkdir(parents=True, exist_ok=True)
            if not os.access(p, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise ConfigError(f"cannot create the run directory train.run_dir={str(p)!r} "
                              f"({e.strerror or type(e).__name__}); pass a writable train.run_dir") from None
        self._was_empty, self._created = existed and not self.in_place, None if existed else top
        if self.in_place:  # a kill during a save leaves a hidden temporary file; never one of the checkpoints
            for tmp in [*self.checkpoints.glob(".*.tmp"), *self.checkpoints.glob("*.ckpt.tmp")]:
                tmp.unlink(missing_ok=True)
            (p / "results.json").unlink(missing_ok=True)  # the resumed run writes its own when it finishes

    def latest_checkpoint(self) -> Path | None:
        """``last.ckpt``, or the latest ``epoch=NNN.ckpt`` (an interruption between the two saves), or None."""
        last = self.checkpoints / "last.ckpt"
        if last.is_file():
            return last
        return max(self.checkpoints.glob("epoch=*.ckpt"), key=_epoch_of, default=None)

    def discard_unless_resumable(self) -> None:
        if self.in_place or self.latest_checkpoint() is not None:
            return
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
        elif self._was_empty:
            for child in self.path.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _epoch_of(path: Path) -> int:
    try:
        return int(path.stem.split("=", 1)[1])
    except (IndexError, ValueError):
        return -1


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint ``cfg.train.resume`` names (``"last"`` = ``RUN_DIR/checkpoints/last.ckpt``), or None."""
    resume = cfg.train.resume
    if not resume:
        return None
    path = Path(cfg.train.run_dir) / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        hint = ("give the run's config file or train.run_dir" if resume == "last"
                else "pass a .ckpt path, or 'last' with the run's config file or train.run_dir")
        raise ConfigError(f"train.resume: checkpoint {str(path)!r} not found (train.run_dir={cfg.train.run_dir!r}); "
                          f"{hint}")
    return path


def resume_config(checkpoint: str | Path, overrides: list[str] | None = None) -> Config:
    """The configuration that continues ``checkpoint`` when no config file is given: the checkpoint's own, with
    ``overrides`` applied and ``train.resume`` set.

    The run directory is never read from the checkpoint: it is ``train.run_dir`` from ``overrides`` if given, else
    the run folder that holds the checkpoint (``RUN/checkpoints/x.ckpt`` -> ``RUN``), else the default
    ``runs/default`` (a checkpoint copied elsewhere starts a new run directory)."""
    path = Path(checkpoint)
    cfg = config_of_checkpoint(path)
    cfg.train.run_dir = str(path.parent.parent) if path.parent.name == "checkpoints" else TrainConfig().run_dir
    cfg = apply_overrides(cfg, list(overrides or []))
    cfg.train.resume = str(path)
    return cfg


def _check_same_training_set(saved: dict[str, Any], module: L.LightningModule) -> None:
    """A resumed run must train on what the checkpoint trained on: same process count and training set."""
    hp = module.hparams
    if hp["world_size"] != saved["world_size"]:
        raise ConfigError(
            f"cannot resume on {hp['world_size']} process(es): the checkpoint was trained on {saved['world_size']} "
            "(learning-rate scaling and data sharding depend on it); set train.devices/train.num_nodes to match")
    for key, what in (("in_channels", "image channels"), ("image_size", "image size"),
                      ("steps_per_epoch", "steps per epoch"), ("mean", "channel means"), ("std", "channel stds")):
        if hp[key] != saved[key]:
            raise ConfigError(
                f"cannot resume: the training set differs from the checkpoint's ({what} {hp[key]} here, "
                f"{saved[key]} in the checkpoint); point data.root at the data the run was trained on")


def train(cfg: Config, callbacks: list[L.Callback] | None = None) -> TrainResult:
    """Pretrain according to ``cfg`` and return the run's metrics (see the module docstring for outputs).

    ``cfg.train.resume`` continues from a checkpoint (``"last"`` = ``RUN_DIR/checkpoints/last.ckpt``): model,
    optimizer, schedule, step counters and random generators are restored, so the run continues exactly. Only the
    keys in :data:`contrastkit.config.RESUMABLE` may differ from the checkpoint's configuration.
    ``callbacks`` are extra Lightning callbacks (e.g. for tests or custom logging).
    """
    from contrastkit.checkpoint import load_checkpoint_file

    cfg.validate()
    check_devices(cfg)
    run_dir = Path(cfg.train.run_dir)
    resume = resolve_resume(cfg)
    saved_hp: dict[str, Any] | None = None
    history = ResumeHistory()
    resume_step, epochs_done = 0, 0
    if resume is not None:
        ckpt = load_checkpoint_file(resume)  # checksum verified: a corrupt file stops here
        saved_hp = ckpt.get("hyper_parameters")
        if not isinstance(saved_hp, dict) or "config" not in saved_hp:
            raise ConfigError(f"train.resume: {str(resume)!r} is not a contrastkit training checkpoint")
        resume_step = int(ckpt.get("global_step", 0))
        epochs_done = resume_step // max(1, int(saved_hp["steps_per_epoch"]))
        changes = resume_changes(config_from_dict(saved_hp["config"]), cfg, epochs_done)
        history = ResumeHistory({"step": resume_step, "checkpoint": str(resume), "changed": changes})
        del ckpt
    launcher = rank_zero_only.rank == 0  # DDP processes started by the launcher only train
    directory = RunDirectory(run_dir, resume, epochs_done)
    if launcher:
        directory.claim()
    try:
        return _train(cfg, run_dir, resume, resume_step, saved_hp, history, directory, launcher, callbacks)
    except BaseException:
        if launcher:
            directory.discard_unless_resumable()
        raise


def _train(cfg: Config, run_dir: Path, resume: Path | None, resume_step: int, saved_hp: dict[str, Any] | None,
           history: ResumeHistory, directory: RunDirectory, launcher: bool,
           callbacks: list[L.Callback] | None) -> TrainResult:
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    L.seed_everything(cfg.train.seed, verbose=False)

    data = load_split(cfg, cfg.data.train_split)
    if len(data) == 0:
        raise DataError(f"dataset {cfg.data.name} split {cfg.data.train_split!r} is empty; check data.root")
    mean, std = data.channel_stats()
    needs_labels = cfg.train.knn_every_n_epochs > 0 or cfg.eval.knn or cfg.eval.linear or cfg.eval.baselines
    monitor_sets = load_monitor_sets(cfg) if needs_labels else None

    clock = TrainClock()
    extra: list[L.Callback] = [clock, history, *(callbacks or [])]
    knn_cb = None
    if monitor_sets is not None and (cfg.train.knn_every_n_epochs > 0 or cfg.eval.knn):
        bank, query = monitor_sets
        num_classes = int(max(bank.labels.max(), query.labels.max())) + 1  # type: ignore[union-attr]
        knn_cb = KNNMonitor(monitor_bank(cfg, bank), query, mean, std, num_classes, k=cfg.train.knn_k,
                            temperature=cfg.train.knn_temperature,
                            every_n_epochs=cfg.train.knn_every_n_epochs if cfg.train.knn_every_n_epochs > 0
                            else 10**9, batch_size=cfg.eval.batch_size,
                            size=eval_size(cfg, int(data.images.shape[-1])), clock=clock,
                            keep_features=cfg.eval.linear or separate_test_split(cfg))
        extra.append(knn_cb)

    online_cb = None
    if cfg.train.online_linear:  # optional online linear probe (contrastkit.evaluation.online)
        from contrastkit.evaluation.online import OnlineLinearProbe

        online_cb = OnlineLinearProbe.from_config(cfg, data, mean, std)
        extra.append(online_cb)

    trainer = build_trainer(cfg, extra, run_dir, resume_step=resume_step)
    world = trainer.world_size
    spe = steps_per_epoch(len(data), cfg.optim.batch_size, world, cfg.optim.accumulate_grad_batches)
    if spe == 0:
        raise DataError(
            f"optim.batch_size={cfg.optim.batch_size} x {world} process(es) is larger than the dataset "
            f"({len(data)} images): lower optim.batch_size"
        )
    module = SSLModule(cfg.to_dict(), data.channels, int(data.images.shape[-1]), mean, std, spe, world)
    pool = module.method.plugins.pool_factor * cfg.optim.batch_size
    if pool > len(data) // world:
        raise DataError(f"the plug-ins' candidate pool of {pool} images per process ({pool // cfg.optim.batch_size} x "
                        f"optim.batch_size={cfg.optim.batch_size}) is larger than the {len(data) // world} training "
                        "images per process: lower the pool factor or optim.batch_size")
    module.attach_images(data.images, data.labels)  # labels: monitors only (a plug-in's diagnostics)
    if knn_cb is not None:
        module.monitor_bank = knn_cb.bank
    if saved_hp is not None:
        _check_same_training_set(saved_hp, module)
    if launcher:
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=_IndexData(len(data), cfg.optim.batch_size, cfg.train.seed,
                                                  module.method.plugins.pool_factor),
                    ckpt_path=str(resume) if resume is not None else None)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown
        if trainer.interrupted and launcher:
            directory.discard_unless_resumable()
            last = directory.latest_checkpoint()
            raise RunInterrupted(
                f"interrupted: {str(run_dir)!r} keeps the checkpoints up to the last finished epoch; continue with: "
                f"contrastkit train --resume {last}" if last is not None else
                "interrupted before the first checkpoint: nothing was kept; start the run again") from None
        raise
    wall = time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "method": cfg.method.name, "loss": loss_name(cfg.method), "backbone": cfg.model.backbone,
        "dataset": cfg.data.name, "epochs": cfg.train.epochs, "batch_size": cfg.optim.batch_size,
        "world_size": world, "steps": trainer.global_step, "steps_per_epoch": spe,
        "epochs_completed": trainer.global_step // spe,  # stops early under train.max_steps
        "fit_wall_seconds": wall,
        "peak_memory_mb": peak_memory_mb(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
    }
    if history.entries:
        metrics["resumed"] = history.entries
    metrics["train_seconds"] = clock.train_seconds
    metrics["images_per_sec"] = clock.images_per_sec
    metrics["seconds_per_epoch"] = clock.train_seconds / max(1, trainer.current_epoch)
    if knn_cb is not None:
        metrics["splits"] = evaluation_splits(cfg)
        metrics["knn_history"] = knn_cb.history
        metrics["knn_k"] = knn_cb.k  # train.knn_k, at most the bank size
        metrics["knn_bank_size"] = len(knn_cb.bank)
        if knn_cb.history:
            role = split_role(cfg, cfg.data.monitor_query_split)
            metrics["knn_top1"] = metrics[f"knn_top1_{role}"] = knn_cb.history[-1]["knn_top1"]
            metrics["knn_top5"] = metrics[f"knn_top5_{role}"] = knn_cb.history[-1]["knn_top5"]
    if online_cb is not None and online_cb.history:
        metrics["online_linear_history"] = online_cb.history
        metrics["online_linear_top1"] = online_cb.history[-1]["online_linear_top1"]
    test_eval = separate_test_split(cfg) and (cfg.eval.knn or cfg.eval.baselines or cfg.eval.linear)
    if trainer.global_rank == 0 and monitor_sets is not None and (cfg.eval.baselines or cfg.eval.linear or test_eval):
        features = None
        if knn_cb is not None and knn_cb.last_features is not None and knn_cb.last_features[0] == trainer.global_step:
            features = knn_cb.last_features[1:]  # the monitor already embedded both sets with the final weights
        test = load_labelled_split(cfg, cfg.data.test_split) if test_eval else None  # type: ignore[arg-type]
        metrics.update(final_evaluation(cfg, module, mean, std, *monitor_sets, features=features, test=test))
    last = run_dir / "checkpoints" / "last.ckpt"
    if trainer.global_rank == 0:
        write_json_atomic(run_dir / "results.json", metrics)
    return TrainResult(run_dir, last if last.exists() else None, metrics)


def separate_test_split(cfg: Config) -> bool:
    """Whether the test split is evaluated once after training, apart from the monitor's query split."""
    return bool(cfg.data.test_split) and cfg.data.test_split != cfg.data.monitor_query_split


def evaluation_splits(cfg: Config) -> dict[str, str | None]:
    """Which split each role used (``results.json`` ``splits``): pretraining, kNN bank, validation, test."""
    return {"train": cfg.data.train_split, "bank": cfg.data.monitor_bank_split, "val": cfg.data.monitor_query_split,
            "test": cfg.data.test_split}


def load_labelled_split(cfg: Config, split: str) -> ImageTensors:
    """:func:`load_split` for a split that must have labels (the test split)."""
    ds = load_split(cfg, split)
    if ds.labels is None:
        raise DataError(f"{cfg.data.name} split {split!r} has no labels, so it cannot be evaluated; set "
                        "data.test_split to a labelled split or null")
    return ds


def peak_memory_mb() -> float:
    """Peak memory of this process in MiB: CUDA's allocator peak on a GPU machine, else the peak resident set size
    (what results.json and ``contrastkit bench`` report)."""
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
