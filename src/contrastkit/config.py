"""Run configuration: typed dataclasses, YAML presets and ``key=value`` overrides.

A run is described by one :class:`Config` made of sections (``data``, ``views``, ``model``, ``method``, ``optim``,
``train``, ``eval``) and an optional ``plugins`` section (plug-in name -> options, see :mod:`contrastkit.plugins`).
``contrastkit train configs/x.yaml optim.lr=0.5 method.loss=dcl`` loads the YAML file over the defaults, then
applies the overrides. Unknown keys and values of the wrong type or outside their range are
refused with a :class:`~contrastkit.errors.ConfigError` that names the key.

Learning-rate scaling rule (``optim.lr_scaling``): the configured ``optim.lr`` is the learning rate for a global
batch of ``optim.reference_batch_size`` (default 256) and is scaled to the actual global batch
``B = batch_size * devices * num_nodes * accumulate_grad_batches``:

- ``linear``: ``lr * B / 256`` (Goyal et al. 2017, https://arxiv.org/abs/1706.02677; SimCLR with SGD/LARS)
- ``sqrt``: ``lr * sqrt(B / 256)`` (SimCLR's choice with LARS at large batch, appendix B.1)
- ``none``: ``lr`` as given.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contrastkit.errors import ConfigError
from contrastkit.validation import check_value, known_options


@dataclass
class DataConfig:
    """Which dataset to train on, which labelled splits the kNN monitor uses and which split is tested once.

    ``val`` and ``train-minus-val`` are carved from ``train`` (seeded, stratified; :mod:`contrastkit.data.splits`):
    every choice (the monitor, the linear probe's hyper-parameters, recipes) is made on ``val``, and ``test_split``
    is evaluated once, at the end of training, for the reported numbers."""

    name: str = "fashion-mnist"  #: dataset name (see ``contrastkit.data.available_datasets()``)
    root: str | None = None  #: dataset path; None = the dataset's default location (Fashion-MNIST: Debian package)
    train_split: str = "train"  #: split for self-supervised training (labels unused; it may include val)
    monitor_bank_split: str | None = "train-minus-val"  #: labelled kNN memory bank (None: no kNN monitor)
    monitor_query_split: str | None = "val"  #: labelled split of the kNN monitor and the probe's choices
    test_split: str | None = "test"  #: labelled split evaluated once after training; None: none
    val_size: int | None = None  #: images in ``val``; None: 5000 (fashion-mnist, cifar10/100), else 10% of train
    val_seed: int = 0  #: seed of ``val`` (not train.seed: every run of a study validates on the same images)
    monitor_bank_size: int = 0  #: >0: use a fixed random subset of that many bank images (faster monitor)
    image_size: int | None = None  #: imagefolder: decode-and-resize size; others: None (native size)
    options: dict[str, Any] = field(default_factory=dict)  #: extra dataset options (e.g. synthetic ``n``)


@dataclass
class ViewsConfig:
    """Augmentation policy of each view (see :mod:`contrastkit.augment`)."""

    preset: str = "simclr"  #: policy preset: simclr, byol, weak, gray
    num_views: int = 2  #: number of views per image
    crop_size: int | None = None  #: output size; None = the dataset's image size
    overrides: list[dict[str, Any]] = field(default_factory=list)  #: per-view field overrides, e.g. [{blur_prob: 1.0}, {}]
    common: dict[str, Any] = field(default_factory=dict)  #: field overrides applied to every view


@dataclass
class ModelConfig:
    """Backbone (see :func:`contrastkit.models.build_backbone`)."""

    backbone: str = "small_resnet"  #: small_resnet, resnet18, resnet50
    cifar_stem: bool = False  #: 3x3 stride-1 first conv and no max-pool (torchvision ResNets)
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  #: small_resnet stage widths
    blocks: int = 1  #: small_resnet blocks per stage
    stem_stride: int = 2  #: small_resnet stem stride
    channels_last: bool = True  #: channels-last memory format (1.2-1.7x faster convs on this CPU, see docs/benchmarks.md; also the fast path on recent GPUs)


#: The contrastive loss of simclr/moco/nnclr when ``method.loss`` is unset (InfoNCE, the loss of all three papers).
DEFAULT_LOSS = "infonce"


@dataclass
class MethodConfig:
    """The SSL method, its loss and its heads. Fields marked with a method name are read by that method only."""

    name: str = "simclr"  #: simclr, moco, nnclr, byol, barlow, all4one (see contrastkit.methods.METHODS)
    loss: str | None = None  #: simclr/moco/nnclr/all4one: infonce, dcl, dclw; None = infonce. byol/barlow: None
    temperature: float = 0.1  #: softmax temperature of the contrastive loss
    sigma: float = 0.5  #: DCLW weighting temperature
    proj_hidden_dim: int = 512  #: projector hidden width
    proj_out_dim: int = 128  #: projector output (embedding) width
    proj_layers: int = 2  #: projector Linear layers
    proj_hidden_bn: bool = True  #: BN in the projector's hidden layers
    proj_last_bn: bool = False  #: BN after the projector's last layer
    pred_hidden_dim: int = 512  #: byol/nnclr: predictor hidden width (output = proj_out_dim)
    queue_size: int = 16384  #: moco/nnclr: memory queue length (keys / support set)
    momentum_base: float = 0.99  #: moco/byol: EMA momentum at the start of training
    momentum_final: float = 1.0  #: moco/byol: EMA momentum at the end (cosine schedule); = base for a fixed momentum
    symmetric: bool = True  #: moco: symmetric loss (both views as queries)
    shuffle_bn: str = "auto"  #: moco: BN leakage fix: auto, shuffle, sync, none (see contrastkit.methods.moco)
    barlow_lambda: float = 0.0051  #: barlow: weight of the off-diagonal terms
    barlow_scale: float = 0.1  #: barlow: loss scale (solo-learn's CIFAR recipe: 0.1)
    gather_distributed: bool = True  #: negatives (and queue keys) from all processes under DDP
    options: dict[str, Any] = field(default_factory=dict)  #: extra method-specific options

    @property
    def contrastive_loss(self) -> str:
        """The contrastive loss simclr/moco/nnclr use: ``loss``, or :data:`DEFAULT_LOSS` when unset."""
        return self.loss or DEFAULT_LOSS


@dataclass
class OptimConfig:
    """Optimiser, schedule and learning-rate scaling."""

    name: str = "sgd"  #: sgd, lars, adamw
    lr: float = 0.3  #: learning rate at the reference batch size (scaled by lr_scaling)
    lr_scaling: str = "linear"  #: linear, sqrt, none (see module docstring)
    reference_batch_size: int = 256  #: batch size at which ``lr`` is given
    weight_decay: float = 5e-4  #: weight decay (never applied to BN parameters and biases)
    momentum: float = 0.9  #: SGD/LARS momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  #: AdamW betas
    lars_eta: float = 0.02  #: LARS trust coefficient
    warmup_epochs: float = 1.0  #: linear warm-up length in epochs (per-step schedule)
    warmup_start_factor: float = 0.0  #: warm-up starts at this fraction of the peak lr
    min_lr_factor: float = 0.0  #: cosine decays to this fraction of the peak lr
    batch_size: int = 256  #: per-process batch size
    accumulate_grad_batches: int = 1  #: gradient accumulation steps
    gradient_clip_val: float = 0.0  #: >0: clip the gradient norm
    predictor_lr_factor: float = 1.0  #: learning-rate multiplier of the parameter group "predictor" (BYOL/NNCLR use 1 or 10)


@dataclass
class TrainConfig:
    """Trainer, devices, precision, logging and checkpointing (Lightning)."""

    epochs: int = 10  #: training epochs (the schedule length)
    accelerator: str = "auto"  #: auto, cpu, gpu (CUDA or MPS), cuda, mps
    devices: Any = "auto"  #: devices per node (int or "auto")
    num_nodes: int = 1  #: nodes (Lightning launchers: torchrun, SLURM)
    strategy: str = "auto"  #: auto, ddp, ddp_spawn, ...
    precision: str = "32-true"  #: 32-true (alias 32), bf16-mixed, 16-mixed (CUDA only)
    sync_batchnorm: bool = False  #: convert BN to SyncBatchNorm under DDP
    run_dir: str = "runs/default"  #: where checkpoints, logs and results go
    resume: str | None = None  #: checkpoint to resume from ("last" = run_dir/checkpoints/last.ckpt)
    seed: int = 0  #: global seed (weights, sampling, augmentation), in [0, 2**32)
    log_every_n_steps: int = 20  #: logging interval
    knn_every_n_epochs: int = 1  #: kNN monitor interval (0 = off)
    knn_k: int = 200  #: kNN monitor neighbours
    knn_temperature: float = 0.1  #: kNN monitor temperature
    progress_bar: bool = True  #: show the progress bar
    max_steps: int = -1  #: >0: stop after this many optimizer steps (smoke runs); the schedule still spans ``epochs``
    compile: bool = False  #: torch.compile the backbone for the training step (not evaluation); slower on CPU, see docs/benchmarks.md
    num_threads: int = 0  #: >0: torch.set_num_threads on CPU
    online_linear: bool = False  #: online linear probe on detached backbone features (labelled train_split; logs online_linear/acc)
    online_linear_lr: float = 0.1  #: learning rate of the online linear probe (SGD, momentum 0.9, no weight decay)


@dataclass
class EvalConfig:
    """Final evaluation run after training."""

    knn: bool = True  #: final kNN (train.knn_k, train.knn_temperature): monitor on val, once on data.test_split
    baselines: bool = False  #: also report kNN (and the linear probe with eval.linear) of the random-init backbone and of raw pixels
    linear: bool = False  #: final linear probe on frozen features, chosen on val, tested on data.test_split (slower)
    linear_epochs: int = 100  #: linear probe epochs
    batch_size: int = 512  #: feature extraction batch size


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: plug-in name -> its options (``plugins.ascl.neighbours=5``); absent = off (see contrastkit.plugins)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check values and ranges; raise :class:`ConfigError` naming the key."""
        from contrastkit.losses import LOSSES
        from contrastkit.methods import METHODS

        check_value(self.method.loss is None or self.method.loss in LOSSES, "method.loss", self.method.loss,
               "one of " + ", ".join(sorted(LOSSES)) + " or null")
        method = METHODS.get(self.method.name)
        if method is not None and method.two_views and self.views.num_views != 2:
            raise ConfigError(f"method {self.method.name} uses exactly 2 views, got views.num_views="
                              f"{self.views.num_views}; set views.num_views=2")
        if method is not None:
            method.parse_options(self.method)  # method.options of the methods that declare typed options
        if method is not None and method.own_loss and self.method.loss is not None:
            raise ConfigError(f"method.loss={self.method.loss} does not apply to {self.method.name}, which has its own "
                              f"loss ({method.own_loss}); remove method.loss or choose simclr, moco or nnclr")
        check_value(self.method.queue_size >= 1, "method.queue_size", self.method.queue_size, ">= 1")
        check_value(0 <= self.method.momentum_base <= 1, "method.momentum_base", self.method.momentum_base, "in [0, 1]")
        check_value(0 <= self.method.momentum_final <= 1, "method.momentum_final", self.method.momentum_final,
               "in [0, 1]")
        check_value(self.method.shuffle_bn in ("auto", "shuffle", "sync", "none"), "method.shuffle_bn",
               self.method.shuffle_bn, "one of auto, shuffle, sync, none")
        check_value(self.method.temperature > 0, "method.temperature", self.method.temperature, "> 0")
        check_value(self.method.sigma > 0, "method.sigma", self.method.sigma, "> 0")
        check_value(self.optim.name in ("sgd", "lars", "adamw"), "optim.name", self.optim.name, "one of sgd, lars, adamw")
        check_value(self.optim.lr > 0 and math.isfinite(self.optim.lr), "optim.lr", self.optim.lr, "a finite number > 0")
        check_value(self.optim.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling", self.optim.lr_scaling,
               "one of linear, sqrt, none")
        check_value(self.optim.weight_decay >= 0, "optim.weight_decay", self.optim.weight_decay, ">= 0")
        check_value(self.optim.batch_size >= 2, "optim.batch_size", self.optim.batch_size, ">= 2")
        check_value(self.optim.reference_batch_size >= 1, "optim.reference_batch_size", self.optim.reference_batch_size, ">= 1")
        check_value(self.optim.accumulate_grad_batches >= 1, "optim.accumulate_grad_batches",
               self.optim.accumulate_grad_batches, ">= 1")
        check_value(0 <= self.optim.warmup_epochs, "optim.warmup_epochs", self.optim.warmup_epochs, ">= 0")
        check_value(0 <= self.optim.min_lr_factor <= 1, "optim.min_lr_factor", self.optim.min_lr_factor, "in [0, 1]")
        check_value(0 <= self.optim.warmup_start_factor <= 1, "optim.warmup_start_factor",
               self.optim.warmup_start_factor, "in [0, 1]")
        check_value(self.train.epochs >= 1, "train.epochs", self.train.epochs, ">= 1")
        check_value(self.views.num_views >= 2, "views.num_views", self.views.num_views, ">= 2")
        check_value(self.views.crop_size is None or self.views.crop_size >= 8, "views.crop_size", self.views.crop_size,
               ">= 8 or null")
        check_value(0 <= self.optim.momentum < 1, "optim.momentum", self.optim.momentum, "in [0, 1)")
        check_value(len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas), "optim.betas",
               self.optim.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
        check_value(self.optim.lars_eta > 0, "optim.lars_eta", self.optim.lars_eta, "> 0")
        check_value(self.optim.gradient_clip_val >= 0, "optim.gradient_clip_val", self.optim.gradient_clip_val,
               ">= 0 (0 = no clipping)")
        check_value(self.optim.predictor_lr_factor > 0, "optim.predictor_lr_factor", self.optim.predictor_lr_factor,
               "> 0")
        # bf16-true / 64-true would cast the weights but not the views (made in float32 on the device): refused
        check_value(str(self.train.precision) in PRECISIONS, "train.precision", self.train.precision,
               "one of " + ", ".join(PRECISIONS))
        check_value(self.train.accelerator in ACCELERATORS, "train.accelerator", self.train.accelerator,
               "one of " + ", ".join(ACCELERATORS))
        check_value(_valid_devices(self.train.devices), "train.devices", self.train.devices,
               "a number of devices >= 1, -1 (all), 'auto', or a list of device indices like [0, 1]")
        check_value(self.train.num_nodes >= 1, "train.num_nodes", self.train.num_nodes, ">= 1")
        check_value(0 <= self.train.seed < 2**32, "train.seed", self.train.seed, "an integer in [0, 2**32)")
        check_value(self.train.max_steps == -1 or self.train.max_steps >= 1, "train.max_steps", self.train.max_steps,
               ">= 1, or -1 for no limit (train.epochs decides)")
        check_value(self.train.knn_every_n_epochs >= 0, "train.knn_every_n_epochs", self.train.knn_every_n_epochs,
               ">= 0 (0 = no kNN monitor)")
        check_value(self.train.log_every_n_steps >= 1, "train.log_every_n_steps", self.train.log_every_n_steps, ">= 1")
        check_value(self.train.num_threads >= 0, "train.num_threads", self.train.num_threads, ">= 0 (0 = torch's default)")
        check_value(self.data.val_size is None or self.data.val_size >= 1, "data.val_size", self.data.val_size,
               ">= 1 or null (the dataset's default)")
        check_value(self.data.val_seed >= 0, "data.val_seed", self.data.val_seed, ">= 0")
        check_value(self.train.knn_k >= 1, "train.knn_k", self.train.knn_k, ">= 1")
        check_value(self.train.knn_temperature > 0, "train.knn_temperature", self.train.knn_temperature, "> 0")
        check_value(self.eval.batch_size >= 1, "eval.batch_size", self.eval.batch_size, ">= 1")
        check_value(self.eval.linear_epochs >= 1, "eval.linear_epochs", self.eval.linear_epochs, ">= 1")
        check_value(self.data.monitor_bank_size >= 0, "data.monitor_bank_size", self.data.monitor_bank_size,
               ">= 0 (0 = the whole split)")
        check_value(self.data.image_size is None or self.data.image_size >= 1, "data.image_size", self.data.image_size,
               ">= 1 or null")
        if (self.eval.linear or self.eval.baselines) and not (self.data.monitor_bank_split and
                                                              self.data.monitor_query_split):
            which = "eval.linear" if self.eval.linear else "eval.baselines"
            raise ConfigError(f"{which}=true needs labelled splits, but data.monitor_bank_split/monitor_query_split "
                              f"is null; set them (e.g. train and test) or set {which}=false")
        check_value(self.model.stem_stride in (1, 2), "model.stem_stride", self.model.stem_stride, "1 or 2")
        from contrastkit.plugins import check_plugins

        check_plugins(self)  # unknown plug-ins, bad options, incompatible hosts
        return self


#: Accepted ``train.precision`` values.
PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")
#: Accepted ``train.accelerator`` values (Lightning's names; "gpu" is CUDA or Apple MPS).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def _valid_devices(devices: Any) -> bool:
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        if devices == "auto":
            return True
        try:
            return _valid_devices(int(devices)) if "," not in devices else _valid_devices(
                [int(d) for d in devices.split(",") if d.strip()])
        except ValueError:
            return False
    if isinstance(devices, list):
        return bool(devices) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    return False


def check_devices(cfg: Config) -> None:
    """Check that the machine has what ``cfg.train`` asks for (run before anything is loaded or written).

    Raises :class:`ConfigError` for ``train.accelerator=gpu``/``cuda``/``mps`` without such a device, more
    ``train.devices`` than it has, and ``train.precision=16-mixed`` without CUDA (on the CPU Lightning would
    silently run bf16-mixed instead)."""
    import torch

    t = cfg.train
    cuda, mps = torch.cuda.is_available(), bool(getattr(torch.backends, "mps", None) and
                                                 torch.backends.mps.is_available())
    wanted = {"gpu": cuda or mps, "cuda": cuda, "mps": mps}
    if t.accelerator in wanted and not wanted[t.accelerator]:
        raise ConfigError(f"train.accelerator={t.accelerator} but this machine has no such device "
                          f"(torch.cuda.is_available() is {cuda}); use train.accelerator=cpu or auto")
    on_cuda = cuda and t.accelerator in ("auto", "gpu", "cuda")
    if str(t.precision) == "16-mixed" and not on_cuda:
        raise ConfigError("train.precision=16-mixed needs a CUDA GPU (on the CPU Lightning would run bf16-mixed "
                          "instead); use train.precision=bf16-mixed or 32-true")
    if on_cuda and isinstance(t.devices, int) and t.devices > torch.cuda.device_count():
        raise ConfigError(f"train.devices={t.devices} but this machine has {torch.cuda.device_count()} CUDA "
                          "device(s); lower train.devices")


# ---------------------------------------------------------------------------------------------------------------
# loading and overriding


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_value(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"invalid value {value!r} for {key}: expected {tp}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"invalid value {value!r} for {key}: expected a list like [1, 2]")
        return [coerce_value(v, inner, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid value {value!r} for {key}: expected a mapping like {{a: 1}}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"invalid value {value!r} for {key}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid value {value!r} for {key}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"invalid value {value!r} for {key}: expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"invalid value {value!r} for {key}: expected a string")
    return value


def options_from_dict(options_cls: type, raw: Any, prefix: str, owner: str = "") -> Any:
    """``options_cls`` (a dataclass with a ``validate(prefix)`` method) filled from the mapping ``raw`` (None = all
    defaults): unknown keys, wrong types and bad values raise a one-line ConfigError naming ``prefix.<key>``. The
    typed options of the plug-ins (``plugins.<name>``) and of the methods that declare them (``method.options``)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid value {raw!r} for {prefix}: expected a mapping of options like {{}}")
    hints = typing.get_type_hints(options_cls)
    known_options(raw, [f.name for f in dataclasses.fields(options_cls)], prefix, owner)
    options = options_cls(**{k: coerce_value(v, hints[k], f"{prefix}.{k}") for k, v in raw.items()})
    options.validate(prefix)
    return options


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply_plugin(cfg: Config, parts: list[str], value: Any) -> None:
    """``plugins`` (name -> options), ``plugins.NAME`` (options; null = off) or ``plugins.NAME.KEY`` (one option);
    the options themselves are validated by the plug-in (:func:`contrastkit.plugins.check_plugins`)."""
    key = ".".join(parts)
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid value {value!r} for plugins: expected a mapping like {{ascl: {{}}}}")
        for name, options in value.items():
            _apply_plugin(cfg, ["plugins", str(name)], options)
    elif len(parts) == 2:
        if value is None:
            cfg.plugins.pop(parts[1], None)
        elif not isinstance(value, dict):
            raise ConfigError(f"invalid value {value!r} for {key}: expected a mapping of options like {{}}")
        else:
            cfg.plugins[parts[1]] = {**cfg.plugins.get(parts[1], {}), **value}
    elif len(parts) == 3:
        cfg.plugins.setdefault(parts[1], {})[parts[2]] = value
    else:
        raise ConfigError(f"unknown config key {key!r}: plug-in keys look like plugins.NAME.OPTION")


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "plugins":
        return _apply_plugin(cfg, parts, value)
    if len(parts) == 3 and parts[:2] == ["method", "options"]:  # one method option (method.options.KEY=V)
        cfg.method.options = {**cfg.method.options, parts[2]: value}
        return
    if len(parts) != 2:
        if len(parts) == 1 and parts[0] in _section_types(Config):
            if not isinstance(value, dict):
                raise ConfigError(f"invalid value for section {key!r}: expected a mapping")
            for k, v in value.items():
                _apply(cfg, f"{key}.{k}", v)
            return
        raise ConfigError(f"unknown config key {key!r}: keys look like section.name, e.g. optim.lr")
    section, name = parts
    sections = _section_types(Config)
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} in {key!r}; sections: {', '.join(sections)}")
    sec = getattr(cfg, section)
    hints = _section_types(type(sec))
    if name not in hints:
        raise ConfigError(
            f"unknown config key {key!r}; valid keys in {section}: {', '.join(sorted(hints))}"
        )
    setattr(sec, name, coerce_value(value, hints[name], key))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (value read as YAML: ``0.1``, ``true``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=0.5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def yaml_error(error: yaml.YAMLError) -> str:
    """A PyYAML error in one line with its position, e.g. ``line 3, column 7: mapping values are not allowed
    here`` (PyYAML's own message spreads it over several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or (str(error).splitlines() or [type(error).__name__])[0]
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def read_yaml_mapping(path: str | Path, kind: str, missing_hint: str, shape: str) -> dict[str, Any]:
    """Read the YAML file ``path`` that must hold a mapping (an empty file gives ``{}``).

    Raises:
        ConfigError: ``"<kind> file 'path' not found; <missing_hint>"``, invalid YAML, or ``"... must be <shape>"``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{kind} file {str(p)!r} not found; {missing_hint}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{kind} file {str(p)!r} is not valid YAML: {yaml_error(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} file {str(p)!r} must be {shape}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file ``path`` (if any), then ``key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        data = read_yaml_mapping(path, "config", "presets are in configs/ (e.g. configs/fmnist_simclr_dcl.yaml)",
                                 "a mapping of sections")
        for section, values in data.items():
            _apply(cfg, str(section), values)
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` overrides to ``cfg`` in place and validate it."""
    for text in overrides:
        _apply(cfg, *parse_override(text))
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. a checkpoint's hyper-parameters)."""
    cfg = Config()
    for section, values in data.items():
        _apply(cfg, section, values)
    from contrastkit.methods import METHODS

    own = METHODS[cfg.method.name].own_loss if cfg.method.name in METHODS else None
    if own and cfg.method.loss == "dcl":
        cfg.method.loss = None  # saved when method.loss defaulted to dcl for every method; byol/barlow never read it
    return cfg.validate()


#: The keys that may differ between a checkpoint's configuration and the run that resumes it: how long to train
#: (``train.epochs`` >= the epochs already done, ``train.max_steps``), where and how to run without changing what is
#: computed (the process count is checked separately: it must stay the same), logging, monitor frequency, the
#: final evaluation, and ``data.root`` (the data may move; the training set itself is checked to be the same).
#: Every other key (method, loss, model, views, optimiser, learning rate, batch size, seed, precision, dataset,
#: kNN-monitor protocol, online probe) defines the run and is refused on resume.
RESUMABLE: tuple[str, ...] = (
    "train.epochs", "train.max_steps", "train.run_dir", "train.resume", "train.devices", "train.num_nodes",
    "train.strategy", "train.log_every_n_steps", "train.knn_every_n_epochs", "train.progress_bar",
    "train.num_threads", "train.compile", "data.root", "eval.knn", "eval.baselines", "eval.linear",
    "eval.linear_epochs", "eval.batch_size",
)


def _flat(cfg: Config) -> dict[str, Any]:
    flat = {f"{section}.{k}": v for section, values in cfg.to_dict().items() for k, v in values.items()}
    flat["train.precision"] = "32-true" if str(flat["train.precision"]) == "32" else str(flat["train.precision"])
    return flat


def resume_changes(saved: Config, new: Config, epochs_done: int) -> dict[str, list[Any]]:
    """The configuration changes of a resumed run, ``{key: [checkpoint value, new value]}``.

    Raises :class:`ConfigError` naming the first key outside :data:`RESUMABLE` whose value differs (with both
    values), or when ``train.epochs`` is below the ``epochs_done`` the checkpoint has already trained.
    """
    old, cur = _flat(saved), _flat(new)
    changes = {k: [old[k], cur[k]] for k in cur if old.get(k) != cur[k] and k not in ("train.resume", "train.run_dir")}
    for key, (a, b) in changes.items():
        if key not in RESUMABLE:
            raise ConfigError(
                f"cannot resume with {key}={b!r}: the checkpoint was trained with {key}={a!r}; on resume only "
                "train.epochs, logging, monitor frequency, devices, data.root and eval.* may change (to change "
                f"{key}, start a new run in a new train.run_dir)"
            )
    if new.train.epochs < epochs_done:
        raise ConfigError(
            f"cannot resume with train.epochs={new.train.epochs}: the checkpoint has already trained {epochs_done} "
            f"epochs (of train.epochs={saved.train.epochs}); set train.epochs to at least {epochs_done}"
        )
    return changes


def scaled_lr(cfg: Config, world_size: int) -> float:
    """The peak learning rate after the batch-size scaling rule (see module docstring)."""
    global_batch = cfg.optim.batch_size * world_size * cfg.optim.accumulate_grad_batches
    ratio = global_batch / cfg.optim.reference_batch_size
    if cfg.optim.lr_scaling == "linear":
        return cfg.optim.lr * ratio
    if cfg.optim.lr_scaling == "sqrt":
        return cfg.optim.lr * math.sqrt(ratio)
    return cfg.optim.lr


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
