"""``contrastkit bench throughput``: where the time of a training step goes.

For each (method, backbone) setting, in source images per second (one source image = all its views):

- ``views``: view generation alone (uint8 batch gathered from the device store -> augmented, normalised views);
- ``model``: the model step alone on ready view tensors (forward, loss, backward, optimizer step): our limit;
- ``end_to_end``: the real training loop (Lightning ``Trainer.fit`` on the device-resident dataset, index
  sampler, on-device views, logging), timed between batch starts after ``warmup`` steps; a batch plug-in's
  candidate pool (curation: views and a no-grad forward of ``pool_factor x B`` images) is counted here only, and
  images/s counts the ``B`` trained images;
- ``ratio`` = end_to_end / model (1.0 = the data pipeline costs nothing),

plus peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, which only grows, so read it per
process). Timings are medians over ``steps`` steps after ``warmup`` steps.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from contrastkit.config import Config, load_config
from contrastkit.training.module import SSLModule, index_loader, steps_per_epoch
from contrastkit.training.run import build_trainer, load_split, peak_memory_mb


#: Datasets of ``--dataset``: Fashion-MNIST (1x28x28) and synthetic 3x32x32 images.
BENCH_DATASETS = ("fashion-mnist", "synthetic")
#: ``--precision`` -> ``train.precision``.
_PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_config(backbone: str, method: str, dataset: str, batch_size: int, device: str, precision: str,
                  extra: list[str] | None = None) -> Config:
    overrides = [f"model.backbone={backbone}", f"method.name={method}", f"optim.batch_size={batch_size}",
                 f"train.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}", "train.devices=1",
                 "train.knn_every_n_epochs=0", "train.progress_bar=false", "eval.knn=false",
                 f"train.precision={_PRECISIONS[precision]}",
                 f"train.run_dir=runs/bench-{method}-{backbone}", "data.monitor_bank_split=null",
                 "data.monitor_query_split=null"]
    if backbone.startswith("resnet"):
        overrides.append("model.cifar_stem=true")
    if dataset == "synthetic":
        overrides += ["data.name=synthetic", "data.image_size=32", "data.options={n: 4096, channels: 3}",
                      "views.preset=simclr"]
    else:
        overrides += [f"data.name={dataset}"]
        if dataset == "fashion-mnist":
            overrides += ["views.preset=gray"]
    return load_config(None, overrides + list(extra or []))


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._last: float | None = None
        self._device: torch.device | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        _sync(pl_module.device)
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self._last)
        self._last = now


def bench_setting(backbone: str, method: str, dataset: str, batch_size: int, steps: int, warmup: int,
                  device: str, precision: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Measure one setting; returns one record (see the module docstring). ``overrides``: extra config keys."""
    cfg = _bench_config(backbone, method, dataset, batch_size, device, precision, overrides)
    dev = torch.device(device)
    torch.manual_seed(0)
    data = load_split(cfg, "train")
    mean, std = data.channel_stats()
    spe = steps_per_epoch(len(data), batch_size, 1, 1)
    module = SSLModule(cfg.to_dict(), data.channels, int(data.images.shape[-1]), mean, std, spe, 1).to(dev)
    images = data.images.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                              enabled=precision != "32")

    # (a) views alone
    t_views = []
    for i in range(warmup + steps):
        idx = torch.randint(0, len(data), (batch_size,), device=dev, generator=gen)
        _sync(dev)
        t = time.perf_counter()
        module.make_views(images[idx], gen)
        _sync(dev)
        if i >= warmup:
            t_views.append(time.perf_counter() - t)

    # (b) model step alone on fixed, ready views
    idx = torch.randint(0, len(data), (batch_size,), device=dev, generator=gen)
    views = module.make_views(images[idx], gen)
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    t_model = []
    for i in range(warmup + steps):
        _sync(dev)
        t = time.perf_counter()
        with autocast:
            loss = module.method.plugins.add_extra_losses(module.training_loss(views))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.method.after_optimizer_step(0.0)
        _sync(dev)
        if i >= warmup:
            t_model.append(time.perf_counter() - t)
    del opt

    # (c) end to end through Lightning
    cfg.train.max_steps = warmup + steps + 1
    cfg.train.epochs = max(1, (warmup + steps + 1) // max(1, spe) + 1)
    timer = _StepTimer(warmup)
    trainer = build_trainer(cfg, [timer], Path(cfg.train.run_dir), checkpoints=False)
    e2e = SSLModule(cfg.to_dict(), data.channels, int(data.images.shape[-1]), mean, std, spe, 1)
    e2e.attach_images(data.images)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    class _DM(L.LightningDataModule):
        def train_dataloader(self) -> Any:
            return index_loader(len(data), batch_size, 0, 1, 0, e2e.method.plugins.pool_factor)

    trainer.fit(e2e, datamodule=_DM())

    med = statistics.median
    views_ips = batch_size / med(t_views)
    model_ips = batch_size / med(t_model)
    e2e_ips = batch_size / med(timer.times) if timer.times else float("nan")
    return {
        "method": method, "backbone": backbone, "overrides": list(overrides or []),
        "widths": cfg.model.widths if not backbone.startswith("resnet") else None, "dataset": cfg.data.name,
        "image_shape": list(data.images.shape[1:]), "batch_size": batch_size, "views": cfg.views.num_views,
        "device": str(dev), "precision": precision, "steps": steps, "warmup": warmup,
        "views_images_per_sec": round(views_ips, 1), "model_images_per_sec": round(model_ips, 1),
        "end_to_end_images_per_sec": round(e2e_ips, 1), "ratio_end_to_end_over_model": round(e2e_ips / model_ips, 3),
        "peak_memory_mb": round(peak_memory_mb(), 1), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
    }


def run_throughput(backbones: list[str], batch_size: int = 256, steps: int = 100, warmup: int = 10,
                   device: str | None = None, methods: list[str] | None = None, dataset: str | None = None,
                   precision: str = "32", as_json: bool = False, overrides: list[str] | None = None,
                   plugins: list[str] | None = None, repeats: int = 1) -> list[dict[str, Any]]:
    """Run :func:`bench_setting` for each method x backbone on ``device`` (default ``None``: CUDA if available,
    else the CPU). ``dataset`` (``fashion-mnist`` or ``synthetic``) is used for every backbone; by default
    (``None``) ``small_resnet``/``convnet`` run on Fashion-MNIST and torchvision ResNets on 3x32x32 synthetic images
    with the CIFAR stem (the CIFAR setting).

    ``plugins``: each setting runs twice, side by side: without plug-ins (``plugins.*`` overrides dropped) and
    with the named plug-ins on (each with its ``bench_options``, then the ``plugins.*`` of ``overrides``).

    ``repeats``: every setting and variant runs once per round, ``repeats`` rounds (host, plug-in, host, plug-in, ...;
    with several methods, e.g. all4one, nnclr, all4one, nnclr), so that a drift of the machine's speed (other jobs,
    CPU frequency) hits all alike; each record carries its ``repeat`` index, and :func:`compare_repeats` gives each
    variant's median and its ratio to the host's.

    Raises:
        ConfigError: ``steps`` < 1, ``warmup`` < 0, ``batch_size`` < 2, an unknown ``dataset`` or ``precision``,
            or a CUDA device on a machine without one (checked before anything runs).
    """
    from contrastkit.errors import ConfigError

    for name, value, low in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--batch-size", batch_size, 2),
                             ("--repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"bench {name} must be an integer >= {low}, got {value!r}")
    if dataset is not None and dataset not in BENCH_DATASETS:
        raise ConfigError(f"bench --dataset {dataset!r} is not supported; use one of {', '.join(BENCH_DATASETS)}")
    if precision not in _PRECISIONS:
        raise ConfigError(f"bench --precision {precision!r}: use one of {', '.join(_PRECISIONS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"bench --device {device}: CUDA is not available on this machine; use --device cpu")
    if torch.device(device).type != "cuda" and precision == "16":
        raise ConfigError("bench --precision 16 needs a CUDA device; use --precision bf16 or 32 on the CPU")
    base = [o for o in overrides or [] if not o.startswith("plugins")]
    variants = [("-", base)]
    if plugins:
        from contrastkit.plugins.registry import plugin_class

        # each plug-in on with its bench defaults (e.g. no curation warm-up), under the configured options
        on = [f"plugins.{name}={_flow(plugin_class(name).bench_options)}" for name in plugins]
        variants.append((",".join(plugins), on + list(overrides or [])))
    records = []
    for repeat in range(repeats):  # outermost: the repeats alternate over every method, backbone and variant
        for method in methods or ["simclr"]:
            for backbone in backbones:
                ds = dataset or ("synthetic" if backbone.startswith("resnet") else "fashion-mnist")
                for label, ov in variants:
                    r = bench_setting(backbone, method, ds, batch_size, steps, warmup, device, precision, ov)
                    r["plugins"], r["repeat"] = label, repeat
                    records.append(r)
                    if not as_json:
                        _print_record(r)
    if repeats > 1 and not as_json:
        for row in compare_repeats(records):
            print(f"{row['method']:8s} {row['plugins']:6s} {row['backbone']:13s} median of {row['n']}: end-to-end "
                  f"{row['end_to_end_images_per_sec']:7.0f}/s (range {row['min']:.0f}-{row['max']:.0f}), "
                  f"{row['ratio_to_host']:.3f} x the host")
    return records


def compare_repeats(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, backbone, dataset, plug-ins): the median end-to-end images/s over the repeats, its range, and
    the ratio of that median to the same setting's without plug-ins (``"-"``)."""
    import statistics

    groups: dict[tuple[str, ...], list[float]] = {}
    for r in records:
        key = (r["method"], r["backbone"], r["dataset"], r["plugins"])
        groups.setdefault(key, []).append(r["end_to_end_images_per_sec"])
    rows = []
    for (method, backbone, ds, label), values in groups.items():
        host = statistics.median(groups[(method, backbone, ds, "-")])
        median = statistics.median(values)
        rows.append({"method": method, "backbone": backbone, "dataset": ds, "plugins": label, "n": len(values),
                     "end_to_end_images_per_sec": median, "min": min(values), "max": max(values),
                     "ratio_to_host": median / host})
    return rows


def _flow(options: dict[str, Any]) -> str:
    """``options`` as a one-line YAML mapping (a command-line override value)."""
    import yaml

    return yaml.safe_dump(options, default_flow_style=True).strip() if options else "{}"


def _print_record(r: dict[str, Any]) -> None:
    print(f"{r['method']:8s} {r['plugins']:6s} {r['backbone']:13s} {r['dataset']:14s} "
          f"views {r['views_images_per_sec']:9.0f}/s  "
          f"model {r['model_images_per_sec']:7.0f}/s  end-to-end {r['end_to_end_images_per_sec']:7.0f}/s"
          f"  ratio {r['ratio_end_to_end_over_model']:.2f}  peak {r['peak_memory_mb']:.0f} MB")
