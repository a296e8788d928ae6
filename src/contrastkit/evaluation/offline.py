"""Offline evaluation of a training checkpoint: kNN, kNN grid, linear probe, with cached features.

:class:`CheckpointEvaluator` loads a checkpoint once (``torch.load(weights_only=True)`` through
:mod:`contrastkit.checkpoint`), puts the model on the evaluation device (CUDA when available) and hands out the
features of any split, extracted in batches on that device and cached beside the checkpoint
(:mod:`contrastkit.evaluation.cache`). The ``contrastkit eval``, ``embed`` and ``plot`` commands are thin wrappers
around it. Protocols and their exact settings: ``docs/evaluation.md``.

>>> ev = CheckpointEvaluator("runs/x/checkpoints/last.ckpt")
>>> ev.knn()                          # {"top1": ..., "top5": ..., "k": 200, "temperature": 0.1, ...}
>>> ev.linear(epochs=100, augmented=True)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from contrastkit.errors import ConfigError, ContrastkitError, DataError
from contrastkit.validation import resolve_device
from contrastkit.evaluation.cache import (
    CachedFeatures,
    cache_dir,
    cache_file,
    cached_features,
    checkpoint_stamp,
    make_key,
)
from contrastkit.evaluation.features import extract_augmented_features, extract_features
from contrastkit.evaluation.knn import knn_evaluate, knn_grid
from contrastkit.evaluation.linear import linear_probe
from contrastkit.io import write_json_atomic

#: What features can be evaluated: the backbone's output or the projector's output (backbone -> projector).
FEATURE_KINDS: tuple[str, ...] = ("backbone", "projector")
#: kNN grid defaults of ``contrastkit eval knn --grid`` (as :func:`~contrastkit.evaluation.knn_grid`).
GRID_KS: tuple[int, ...] = (10, 20, 50, 100, 200)
GRID_TEMPERATURES: tuple[float, ...] = (0.05, 0.07, 0.1, 0.2, 0.5)
GRID_METRICS: tuple[str, ...] = ("cosine", "euclidean")
#: Augmentation of ``linear --augmented``: random resized crop with this area range, and horizontal flips.
AUG_CROP_SCALE: tuple[float, float] = (0.08, 1.0)
AUG_HFLIP_PROB: float = 0.5
#: Keys of an evaluation record that are results, not settings (see :meth:`CheckpointEvaluator.save_result`).
_RESULT_VALUES = frozenset({"top1", "top5", "val_top1", "lr", "weight_decay", "grid", "best", "checkpoint"})
#: Distinct augmented passes of ``linear --augmented`` (pass ``epoch % passes`` is used in each epoch).
AUG_PASSES: int = 4


def default_device() -> torch.device:
    """CUDA (the current device) when available, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def crop_flip_policy(crop_size: int, crop_scale: tuple[float, float] = AUG_CROP_SCALE,
                     hflip_prob: float = AUG_HFLIP_PROB) -> Any:
    """A :class:`~contrastkit.augment.ViewPolicy` with only a random resized crop (``crop_scale``, default
    (0.08, 1), aspect ratio (3/4, 4/3)) to ``crop_size`` and a horizontal flip (``hflip_prob``, default 0.5):
    solo-learn's and lightly's linear-evaluation training transform."""
    from contrastkit.augment import ViewPolicy

    policy = ViewPolicy(crop_size=crop_size, crop_scale=tuple(crop_scale), hflip_prob=hflip_prob, jitter_prob=0.0,
                        brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_prob=0.0,
                        solarize_prob=0.0)
    policy.validate()
    return policy


def _num_classes(*sets: CachedFeatures) -> int:
    for s in sets:
        if s.classes:
            return max(2, len(s.classes))
    return max(2, max(int(s.labels.max()) for s in sets if s.labels is not None) + 1)


class CheckpointEvaluator:
    """Evaluate the backbone of one training checkpoint; features are extracted once and cached.

    Args:
        checkpoint: a ``.ckpt`` written by ``contrastkit train``.
        overrides: ``key=value`` config overrides applied to the checkpoint's configuration, e.g.
            ``data.root=/data/cifar10`` when the data moved (default none).
        device: where to extract and evaluate (default ``None``: CUDA if available, else CPU).
        batch_size: feature-extraction batch size (default ``None``: the checkpoint's ``eval.batch_size``).
        cache: read and write the feature cache ``<checkpoint>.features/`` (default ``True``).
        progress: show tqdm progress bars for extraction and probe training (default ``False``).

    Raises:
        ContrastkitError: a missing, corrupt or unsafe checkpoint, or a bad override.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        overrides: Sequence[str] = (),
        *,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        cache: bool = True,
        progress: bool = False,
    ) -> None:
        from contrastkit.checkpoint import load_module
        from contrastkit.config import apply_overrides

        self.checkpoint = Path(checkpoint)
        module = load_module(self.checkpoint)
        #: the configuration the checkpoint was trained with (before ``overrides``): its own evaluation protocol
        self.trained_cfg = copy.deepcopy(module.cfg)
        self.cfg = cfg = apply_overrides(module.cfg, list(overrides))
        self.device = resolve_device(device, default_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {str(self.device)!r} requested but CUDA is not available; use --device cpu")
        self.module = module.to(self.device)
        hp = module.hparams
        self.mean: list[float] = [float(v) for v in hp["mean"]]
        self.std: list[float] = [float(v) for v in hp["std"]]
        self.in_channels: int = int(hp["in_channels"])
        self.image_size: int = int(hp["image_size"])
        #: side of the images the backbone was trained on (the crop size); evaluation images are resized to it
        self.input_size: int = int(cfg.views.crop_size or self.image_size)
        self.batch_size = int(batch_size or cfg.eval.batch_size)
        self.cache = cache
        self.progress = progress
        self._datasets: dict[tuple[Any, ...], Any] = {}

    # ------------------------------------------------------------------------------------------------ data
    def _dataset_fields(self, split: str, dataset: str | None, root: str | None,
                        image_size: int | None) -> dict[str, Any]:
        d = self.cfg.data
        if dataset is None or dataset == d.name:
            return {"dataset": d.name, "root": root if root is not None else d.root, "split": split,
                    "image_size": image_size if image_size is not None else d.image_size,
                    "options": dict(d.options), "val": {"val_size": d.val_size, "val_seed": d.val_seed}}
        if image_size is None and dataset == "imagefolder":
            image_size = self.input_size
        return {"dataset": dataset, "root": root, "split": split, "image_size": image_size, "options": {},
                "val": {"val_size": None, "val_seed": 0}}

    def dataset(self, split: str, dataset: str | None = None, root: str | None = None,
                image_size: int | None = None) -> Any:
        """The :class:`~contrastkit.data.ImageTensors` of ``split`` (memoised).

        Args:
            split: the split name, e.g. ``"test"``.
            dataset: dataset name (default ``None``: the checkpoint's ``data.name`` with its root and options).
            root: dataset folder (default ``None``: the checkpoint's ``data.root`` for its own dataset, else the
                dataset's default location).
            image_size: decode size (imagefolder; default: the checkpoint's, or the model's input size).
        """
        from contrastkit.data import load_dataset

        f = self._dataset_fields(split, dataset, root, image_size)
        memo = (f["dataset"], f["root"], split, f["image_size"],
                json.dumps([f["options"], f["val"]], sort_keys=True, default=str))
        if memo not in self._datasets:
            self._datasets[memo] = load_dataset(f["dataset"], root=f["root"], split=split,
                                                image_size=f["image_size"], **f["val"], **f["options"])
        return self._datasets[memo]

    def _key_fields(self, split: str, kind: str, dataset: str | None, root: str | None,
                    image_size: int | None) -> dict[str, Any]:
        f = self._dataset_fields(split, dataset, root, image_size)
        if f["root"] is not None:
            f["root"] = str(Path(f["root"]).expanduser().resolve())
        f.update(kind=kind, input_size=self.input_size, mean=self.mean, std=self.std)
        return f

    def model(self, kind: str = "backbone") -> nn.Module:
        """The feature extractor: the backbone, or backbone followed by the projector (``kind="projector"``)."""
        if kind not in FEATURE_KINDS:
            raise ConfigError(f"unknown feature kind {kind!r}; choose one of {', '.join(FEATURE_KINDS)}")
        backbone = self.module.backbone
        if kind == "backbone":
            return backbone
        projector = getattr(self.module.method, "projector", None)
        if not isinstance(projector, nn.Module):
            raise ConfigError(f"method {self.cfg.method.name!r} has no projector; use --features backbone")
        return nn.Sequential(backbone, projector)

    def _checked(self, ds: Any) -> Any:
        if ds.channels != self.in_channels:
            raise DataError(
                f"{ds.name} has {ds.channels}-channel images but the backbone was trained on "
                f"{self.in_channels}-channel images; use a dataset with the same number of channels"
            )
        return ds

    # ------------------------------------------------------------------------------------------------ features
    def features(self, split: str, kind: str = "backbone", *, dataset: str | None = None, root: str | None = None,
                 image_size: int | None = None) -> CachedFeatures:
        """Features (float32 N x D on :attr:`device`), labels (on :attr:`device`, or ``None``) and class names of a
        split, from the cache when its key matches, else extracted (un-augmented, resized to :attr:`input_size`
        when the images differ from it) and cached."""
        self.model(kind)  # validates kind before anything expensive
        fields = self._key_fields(split, kind, dataset, root, image_size)
        path = cache_file(self.checkpoint, fields["dataset"], split, kind) if self.cache else None

        def compute() -> CachedFeatures:
            ds = self._checked(self.dataset(split, dataset, root, image_size))
            h, w = ds.image_size
            size = self.input_size if (h, w) != (self.input_size, self.input_size) else None
            feats = extract_features(self.model(kind), ds.images, self.mean, self.std, self.batch_size, self.device,
                                     size=size, progress=self.progress)
            return CachedFeatures(feats, ds.labels, ds.classes)

        entry = cached_features(path, make_key(self.checkpoint, **fields), compute)
        return self._on_device(entry)

    def augmented_features(self, split: str, kind: str = "backbone", *, pass_index: int = 0, seed: int = 0,
                           crop_scale: tuple[float, float] = AUG_CROP_SCALE,
                           hflip_prob: float = AUG_HFLIP_PROB) -> CachedFeatures:
        """Features of augmented pass ``pass_index`` of a split (crop + flip, :func:`crop_flip_policy`, at
        :attr:`input_size`), with the augmentation seeded by ``seed + pass_index``; cached like :meth:`features`."""
        self.model(kind)
        policy = crop_flip_policy(self.input_size, crop_scale, hflip_prob)
        fields = self._key_fields(split, kind, None, None, None)
        fields["augment"] = {"policy": dataclasses.asdict(policy), "seed": seed + pass_index,
                             "device_type": self.device.type}
        path = (cache_file(self.checkpoint, fields["dataset"], split, kind, suffix=f"-aug{pass_index}")
                if self.cache else None)

        def compute() -> CachedFeatures:
            ds = self._checked(self.dataset(split))
            feats = extract_augmented_features(self.model(kind), ds.images, self.mean, self.std, policy,
                                               self.batch_size, self.device, seed=seed + pass_index,
                                               progress=self.progress)
            return CachedFeatures(feats, ds.labels, ds.classes)

        return self._on_device(cached_features(path, make_key(self.checkpoint, **fields), compute))

    def _on_device(self, entry: CachedFeatures) -> CachedFeatures:
        entry.features = entry.features.to(self.device)
        if entry.labels is not None:
            entry.labels = entry.labels.to(self.device)
        return entry

    def splits(self) -> tuple[str, str]:
        """The labelled ``(bank, query)`` splits: ``data.monitor_bank_split`` and ``data.monitor_query_split``."""
        bank, query = self.cfg.data.monitor_bank_split, self.cfg.data.monitor_query_split
        if not bank or not query:
            raise ContrastkitError("evaluation needs labelled splits: set data.monitor_bank_split and "
                                   "data.monitor_query_split (e.g. data.monitor_bank_split=train)")
        return bank, query

    def labelled(self, kind: str = "backbone") -> tuple[CachedFeatures, CachedFeatures]:
        """Features of the bank (training) and query (test) splits; both must be labelled."""
        bank_split, query_split = self.splits()
        bank, query = self.features(bank_split, kind), self.features(query_split, kind)
        for s, name in ((bank, bank_split), (query, query_split)):
            if s.labels is None:
                raise DataError(f"{self.cfg.data.name} split {name!r} has no labels; set data.monitor_bank_split / "
                                "data.monitor_query_split to labelled splits")
        return bank, query

    def _record(self, protocol: str, kind: str) -> dict[str, Any]:
        bank, query = self.splits()
        return {"protocol": protocol, "checkpoint": str(self.checkpoint), "dataset": self.cfg.data.name,
                "bank_split": bank, "query_split": query, "features": kind}

    # ------------------------------------------------------------------------------------------------ protocols
    def knn(self, k: int = 200, temperature: float = 0.1, metric: str = "cosine",
            kind: str = "backbone") -> dict[str, Any]:
        """Weighted kNN (default k=200, T=0.1, cosine) of the query split against the bank split; top-1/top-5 %."""
        bank, query = self.labelled(kind)
        res: dict[str, Any] = knn_evaluate(bank.features, bank.labels, query.features, query.labels,
                                           _num_classes(bank, query), k=k, temperature=temperature, metric=metric)
        res.update(self._record("knn", kind), k=k, temperature=temperature, metric=metric)
        return res

    def knn_grid(self, ks: Sequence[int] = GRID_KS, temperatures: Sequence[float] = GRID_TEMPERATURES,
                 metrics: Sequence[str] = GRID_METRICS, kind: str = "backbone") -> dict[str, Any]:
        """The kNN grid over ``ks`` x ``temperatures`` x ``metrics`` (euclidean ignores T): ``{"grid": rows, ...}``
        with one ``{"metric", "k", "temperature", "top1", "top5"}`` row per setting. The best row is the best on the
        query split (``data.monitor_query_split``): a choice when that is ``val``; with ``test`` an upper bound, never a
        tuned result."""
        bank, query = self.labelled(kind)
        rows = knn_grid(bank.features, bank.labels, query.features, query.labels, _num_classes(bank, query),
                        ks=tuple(ks), temperatures=tuple(temperatures), metrics=tuple(metrics))
        best = max(rows, key=lambda r: r["top1"])
        res = self._record("knn-grid", kind)
        res.update(grid=rows, best=best, top1=best["top1"], top5=best["top5"])
        return res

    def linear(self, epochs: int = 100, *, augmented: bool = False, passes: int = AUG_PASSES, seed: int = 0,
               kind: str = "backbone", **probe_kwargs: Any) -> dict[str, Any]:
        """The linear probe (:func:`~contrastkit.evaluation.linear_probe`: validation split chooses lr and weight
        decay, the test split is used once).

        Args:
            epochs: probe epochs (default 100).
            augmented: train on augmented features (default ``False``): pass ``epoch % passes`` of crop + flip
                augmentations of the training images (each extracted once, cached); validation rows and the
                standardisation still use un-augmented features.
            passes: distinct augmented passes (default 4).
            seed: probe seed (split and batch order) and base seed of the augmentations (default 0).
            kind: ``backbone`` (default) or ``projector`` features.
            probe_kwargs: further :func:`linear_probe` options (``lr``, ``weight_decay``, ``batch_size``, ...).
        """
        bank, query = self.labelled(kind)
        feature_fn = None
        if augmented:
            if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
                raise ConfigError(f"passes must be an integer >= 1, got {passes!r}")
            bank_split = self.splits()[0]
            memo: dict[int, Tensor] = {}

            def feature_fn(epoch: int) -> tuple[Tensor, Tensor]:
                i = epoch % passes
                if i not in memo:
                    memo[i] = self.augmented_features(bank_split, kind, pass_index=i, seed=seed).features
                assert bank.labels is not None
                return memo[i], bank.labels

        res = linear_probe(bank.features, bank.labels, query.features, query.labels, _num_classes(bank, query),
                           epochs=epochs, seed=seed, device=self.device, feature_fn=feature_fn,
                           progress=self.progress, **probe_kwargs).to_dict()
        res.update(self._record("linear", kind))
        res["augmented"] = ({"passes": passes, "crop_scale": list(AUG_CROP_SCALE), "hflip_prob": AUG_HFLIP_PROB}
                            if augmented else None)
        return res

    # ------------------------------------------------------------------------------------------------ results
    def own_protocol(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` evaluates the run on its own protocol, so that it counts as the run's result.

        That is: the dataset the run was trained on (every ``data.*`` setting unchanged except ``data.root``, so
        also the same monitor splits; querying the run's ``data.test_split`` instead of its validation split
        counts), backbone features, and the standard settings of the protocol: for
        ``linear``, ``eval.linear_epochs`` epochs without augmentation; for ``knn``, ``train.knn_k``,
        ``train.knn_temperature`` and the cosine metric. Anything else (a transfer to another dataset, a short
        probe, projector features, a kNN grid) is another evaluation, reported with its settings."""
        trained, now = dataclasses.asdict(self.trained_cfg.data), dataclasses.asdict(self.cfg.data)
        trained.pop("root")
        now.pop("root")
        if now["monitor_query_split"] and now["monitor_query_split"] == trained.get("test_split"):
            now["monitor_query_split"] = trained["monitor_query_split"]  # the run's own test split: its final number
        if trained != now or record.get("features") != "backbone":
            return False
        t = self.trained_cfg
        if record.get("protocol") == "linear":
            return not record.get("augmented") and record.get("epochs") == t.eval.linear_epochs
        if record.get("protocol") == "knn":
            return (record.get("k") == t.train.knn_k and record.get("temperature") == t.train.knn_temperature
                    and record.get("metric") == "cosine")
        return False

    def save_result(self, record: dict[str, Any]) -> Path | None:
        """Store an evaluation record (atomically) beside the checkpoint, stamped with the checkpoint's size and
        mtime and with ``own_protocol`` (:meth:`own_protocol`): as ``<checkpoint>.features/results-<protocol>.json``
        when it is on the run's own protocol, else as ``results-<protocol>-<settings hash>.json`` (so a transfer
        probe never replaces the run's result). ``contrastkit report`` reads them (:func:`saved_results`)."""
        own = self.own_protocol(record)
        name = f"results-{record['protocol']}"
        if not own:
            settings = {k: v for k, v in record.items() if k not in _RESULT_VALUES}
            settings["data"] = dataclasses.asdict(self.cfg.data)
            blob = json.dumps(settings, sort_keys=True, default=str).encode()
            name += "-" + hashlib.sha256(blob).hexdigest()[:12]
        path = cache_dir(self.checkpoint) / f"{name}.json"
        data = {**record, "own_protocol": own, "checkpoint_stamp": checkpoint_stamp(self.checkpoint)}
        try:
            write_json_atomic(path, data)
        except OSError:
            return None
        return path


def saved_results(checkpoint: str | Path, protocol: str) -> list[dict[str, Any]]:
    """The records saved by :meth:`CheckpointEvaluator.save_result` for ``protocol``, the run's own-protocol one
    first (``own_protocol`` true; records written before that field existed count as other evaluations); records
    of an earlier version of the checkpoint (its size or mtime differ) are left out."""
    folder = cache_dir(checkpoint)
    try:
        stamp = checkpoint_stamp(checkpoint)
        paths = sorted(folder.glob(f"results-{protocol}*.json"))
    except OSError:
        return []
    records = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("protocol") == protocol and data.get("checkpoint_stamp") == stamp:
            if path.name != f"results-{protocol}.json":
                data["own_protocol"] = False
            records.append(data)
    return sorted(records, key=lambda r: not r.get("own_protocol"))
