"""Batch curation as a plug-in: train on the pairs (or the batch) of a larger candidate pool that fit the
contrastive objective best, on every two-view host.

Papers: Welle, Poklukar & Kragic, "Batch Curation for Unsupervised Contrastive Representation Learning", arXiv 2021,
https://arxiv.org/abs/2108.08643 (SimCLR on CIFAR-10; random crops and colour changes can make "similar" pairs that
are semantically dissimilar, and batches are curated during training); its criterion, pool size, schedule and
numbers are not public beyond the abstract, and no code exists. Goksu & Pugeault, "The Bad Batches: Enhancing
Self-Supervised Learning in Image Classification Through Representative Batch Curation", IJCNN 2024,
https://arxiv.org/abs/2403.19579: filters whole batches by the Frechet distance between the embeddings of the two
augmented batches (threshold and what happens to a bad batch not public). ``shared/research/seed-methods.md`` §2 and
§9 hold what is known. This module is therefore a documented reconstruction: every choice below is labelled *paper*
(from the abstracts) or *ours*, and every choice is an option.

Step (``select_batch``, the batch hook; ``B = optim.batch_size``):

1. The loader delivers a pool of ``pool_factor x B`` indices (:class:`~contrastkit.training.module.PoolBatchSampler`:
   the host's batch ``t`` followed by the next ``pool_factor - 1`` batches of the epoch's order) [ours]. The
   learning rate, its schedule and the epoch length follow ``B`` (the host's, unchanged); each image lies in
   ``pool_factor`` pools per epoch, so it may be trained 0 to ``pool_factor`` times per epoch [ours].
2. Warm-up: for the first ``warmup_epochs`` the pool's first ``B`` indices (exactly the host's batch) are trained
   and nothing is embedded [ours; seed-methods §2.3]. After it, the first ``M = B + round(lam (pool_factor - 1) B)``
   indices of the pool are scored, ``lam`` from ``schedule``: the kept fraction ``B / M`` goes from 1 to
   ``1 / pool_factor`` [ours].
3. Two views of each of the ``M`` images are drawn from the run's checkpointed augmentation generator and embedded
   under ``no_grad`` by the backbone and projector: the momentum teacher's where the host has one (MoCo, BYOL,
   All4One) with ``encoder=auto``, else the student's [ours]. BatchNorm running statistics are never changed:
   ``bn=eval`` runs the networks in eval mode (running statistics), ``bn=batch`` in train mode (batch statistics,
   like the training forward) with the running statistics saved and restored [ours]. ``z1, z2``: ``M x P``,
   L2-normalised.
4. Criterion ``pair`` [ours, from the abstract of Welle et al.]: positive agreement ``s_i = <z1_i, z2_i>``, hardest
   in-pool negative ``m_i = max_{j != i} max(<z1_i, z1_j>, <z1_i, z2_j>)``, margin ``s_i - m_i``. The
   ``floor(drop_quantile x M)`` pairs with the lowest ``s`` are dropped (likely semantically different "positives";
   ties by pool position); with ``drop_false_negatives`` also the pairs with ``m_i > s_i`` (an in-pool negative
   closer than the positive: a likely false negative). The ``B`` kept pairs are the remaining ones with the largest
   margin; if fewer than ``B`` remain, the dropped ones with the largest margin fill the batch.
   Criterion ``frd`` [paper: Goksu & Pugeault's distance]: the pool is cut into ``C = M // B`` candidate batches
   (batch ``c`` = pool positions ``cB .. (c+1)B``; candidate 0 is the host's batch), each scored by
   ``FRD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of its ``z1`` and ``z2`` (means ``P``, covariances
   ``P x P``, unbiased); the best (lowest) candidate is trained [ours: best of ``C`` rather than re-drawing the
   augmentations, so the cost is bounded and equal to the pair criterion's]; with ``frd_threshold`` the host's
   batch is kept unless its FRD exceeds the threshold, as the paper's filter [paper; its value is not public].
   ``Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2))``: two symmetric eigendecompositions in float64
   (:func:`trace_sqrt_product`) instead of a general matrix square root [ours; tested against scipy].
5. The kept pairs train with the very views that were scored (``batch_views``), in pool order; the host, the other
   plug-ins (ASCL's targets, batch fusion's input transform) and the optimizer see an ordinary batch of ``B``.

Identity: ``pool_factor=1`` with ``drop_quantile=0`` trains the host's batches with the host's views, exactly (the
scoring forward changes no state and draws no random number outside the views).

Logged (``train/curation_<key>``, every step after the warm-up): ``rejected`` (``1 - B / M``, the fraction of the
scored pool not trained), ``agreement_kept`` / ``agreement_rejected`` (mean ``s_i``), ``false_negatives`` (pair:
fraction of the pool with ``m_i > s_i``), ``frd_kept`` / ``frd_host`` (frd). On every ``monitor_every_n_steps``-th
step (a multiple of ``train.log_every_n_steps``, so that the values reach the log), when the training split has
labels and the run has a kNN monitor bank (``data.monitor_bank_split``):
``knn_error_kept`` / ``knn_error_rejected``, the fraction of the kept / rejected views that a weighted kNN
(``train.knn_k``, ``train.knn_temperature``) on the scoring backbone's features (eval mode) of
``monitor_bank_size`` bank images would misclassify: the evidence for or against the premise that rejected pairs
are semantically wrong (between two checks Lightning's log repeats the last value).
Labels are read for this log only, never for the selection. The bank may contain pool images (the default bank is
the training split without the validation images), which lowers both errors alike.

Distributed: each process curates its own shard's pool (no communication; the kept batches of the processes then
meet in the host's loss as usual). With ``bn=batch`` and SyncBatchNorm the scoring forward synchronises statistics
over the processes (all have pools of equal size). Logs are rank 0's.

State and resume: none beyond the host's: the pool comes from the deterministic sampler, the views from the
checkpointed generator, so ``--resume`` continues exactly (tested).

Hosts: ``simclr``, ``moco``, ``nnclr``, ``all4one`` (any ``method.loss``), ``byol``, ``barlow``: every two-view host
with a ``projector``. A new host is one entry in ``Curation.hosts``.

Options (``plugins.curation.<key>``):

- ``criterion`` (``pair`` default, ``frd``).
- ``pool_factor`` (int >= 1, default 2 [ours; seed-methods §2.3 suggests 2-4]): pool = ``pool_factor x B``.
- ``drop_quantile`` (in [0, 1), default 0.25 [ours]): pair: fraction of the pool dropped for low agreement.
- ``drop_false_negatives`` (default false [ours]): pair: also drop pairs with ``m_i > s_i``.
- ``frd_threshold`` (null default, or a number >= 0 [paper's filter, value ours]): frd: keep the host's batch
  unless its FRD exceeds it; null: always the best candidate.
- ``warmup_epochs`` (>= 0, default 1.0 [ours]): epochs (fractions allowed) without curation.
- ``schedule`` (``constant`` default, ``linear``, ``cosine`` [ours]): ``lam`` after the warm-up: 1, or rising from
  0 to 1 over the rest of training (the kept fraction falls from 1 to ``1 / pool_factor``).
- ``encoder`` (``auto`` default: the momentum teacher where the host has one, else the student; ``student``).
- ``bn`` (``eval`` default, ``batch``): BatchNorm statistics of the scoring forward (running stats untouched).
- ``monitor_every_n_steps`` (int >= 0, default 100; 0 = off): how often the kNN premise check runs; a multiple of
  ``train.log_every_n_steps`` (Lightning writes a step's values only on its logged steps, and repeats the last check
  on the logged steps between two checks: equal intervals give one row per check).
- ``monitor_bank_size`` (int >= 1, default 1000): bank images for it (evenly spaced over the kNN monitor's bank).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit.config import Config, check_value
from contrastkit.models import MomentumTeacher
from contrastkit.plugins.base import Plugin, StepContext
from contrastkit.plugins.registry import register

CRITERIA = ("pair", "frd")
SCHEDULES = ("constant", "linear", "cosine")


# ---------------------------------------------------------------------------------------------------- criteria
def pair_scores(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """Positive agreement ``s`` (``M``) and hardest in-pool negative ``m`` (``M``) of L2-normalised ``z1, z2``
    (``M x P``): ``s_i = <z1_i, z2_i>``, ``m_i = max_{j != i} max(<z1_i, z1_j>, <z1_i, z2_j>)``."""
    n = z1.shape[0]
    s = (z1 * z2).sum(dim=1)  # M
    sim = z1 @ torch.cat([z1, z2]).T  # M x 2M
    own = torch.arange(n, device=z1.device)
    sim[own, own] = -math.inf  # itself
    sim[own, own + n] = -math.inf  # its positive
    m = sim.max(dim=1).values if n > 1 else torch.full_like(s, -math.inf)  # M
    return s, m


def select_pairs(s: Tensor, m: Tensor, keep: int, drop_quantile: float,
                 drop_false_negatives: bool) -> tuple[Tensor, Tensor]:
    """The pair criterion (module docstring, step 4): ``(kept, dropped)``, the sorted pool positions of the ``keep``
    kept pairs and a boolean ``M`` mask of the pairs the rules dropped (before the fill)."""
    n = s.shape[0]
    dropped = torch.zeros(n, dtype=torch.bool, device=s.device)
    dropped[torch.argsort(s, stable=True)[: int(math.floor(drop_quantile * n))]] = True  # lowest agreement
    if drop_false_negatives:
        dropped |= m > s
    order = torch.argsort(-(s - m), stable=True)  # largest margin first, ties by position
    order = order[torch.argsort(dropped[order].to(torch.int8), stable=True)]  # survivors first
    return order[:keep].sort().values, dropped


def sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (``P x P``) by its eigendecomposition; negative
    round-off eigenvalues are clamped to 0."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(s1: Tensor, s2: Tensor) -> Tensor:
    """``Tr((s1 s2)^(1/2))`` for symmetric PSD ``s1, s2`` (``P x P``): the eigenvalues of ``s1 s2`` are those of the
    symmetric PSD ``s1^(1/2) s2 s1^(1/2)``, so the trace is the sum of their square roots (stable, real), rather than
    a general (non-symmetric) matrix square root as in scipy.linalg.sqrtm."""
    r = sqrtm_psd(s1)
    return torch.linalg.eigvalsh(r @ s2 @ r).clamp_min(0).sqrt().sum()


def frechet_distance(z1: Tensor, z2: Tensor) -> Tensor:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between the rows of ``z1`` and ``z2`` (``n x P`` each,
    ``n >= 2``; unbiased covariances), in float64."""
    a, b = z1.double(), z2.double()
    s1, s2 = torch.cov(a.T), torch.cov(b.T)  # P x P
    return (a.mean(0) - b.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt_product(s1, s2)


def select_frd(z1: Tensor, z2: Tensor, batch: int, threshold: float | None) -> tuple[Tensor, Tensor, int]:
    """The frd criterion (module docstring, step 4): ``(kept, frds, c)``: the pool positions of the chosen candidate
    batch ``c``, and the FRD of every candidate batch (``C``, float64)."""
    candidates = z1.shape[0] // batch
    frds = torch.stack([frechet_distance(z1[c * batch:(c + 1) * batch], z2[c * batch:(c + 1) * batch])
                        for c in range(candidates)])  # C
    c = 0 if threshold is not None and frds[0] <= threshold else int(torch.argmin(frds))
    return torch.arange(c * batch, (c + 1) * batch, device=z1.device), frds, c


def curation_strength(schedule: str, progress: float) -> float:
    """``lam`` in [0, 1] at ``progress`` in [0, 1] of the training after the warm-up."""
    if schedule == "constant":
        return 1.0
    p = min(1.0, max(0.0, progress))
    return p if schedule == "linear" else (1 - math.cos(math.pi * p)) / 2


@contextmanager
def frozen_statistics(net: nn.Module, mode: str):
    """Run ``net`` without changing its BatchNorm running statistics: ``eval`` (eval mode, running statistics) or
    ``batch`` (train mode, batch statistics; the running statistics are saved and restored). Every module's
    ``training`` flag is restored."""
    modes = [(m, m.training) for m in net.modules()]
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in bns]
    net.train(mode == "batch")
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for bn, buffers in zip(bns, saved):
                for k, v in bn.named_buffers(recurse=False):
                    v.copy_(buffers[k])


# ------------------------------------------------------------------------------------------------------ plug-in
@dataclass
class CurationOptions:
    """``plugins.curation`` options; see the module docstring for their sources."""

    criterion: str = "pair"  #: pair or frd
    pool_factor: int = 2  #: the pool is pool_factor x optim.batch_size images
    drop_quantile: float = 0.25  #: pair: fraction of the pool dropped for the lowest agreement
    drop_false_negatives: bool = False  #: pair: also drop pairs whose hardest in-pool negative beats the positive
    frd_threshold: float | None = None  #: frd: keep the host's batch unless its FRD exceeds this (null: best)
    warmup_epochs: float = 1.0  #: epochs without curation
    schedule: str = "constant"  #: constant, linear, cosine: the curation strength after the warm-up
    encoder: str = "auto"  #: auto (momentum teacher where the host has one) or student
    bn: str = "eval"  #: eval or batch: BatchNorm statistics of the scoring forward
    monitor_every_n_steps: int = 100  #: kNN premise check every N steps (0: off; a multiple of train.log_every_n_steps)
    monitor_bank_size: int = 1000  #: bank images of the kNN premise check

    def validate(self, prefix: str) -> None:
        check_value(self.criterion in CRITERIA, f"{prefix}.criterion", self.criterion, "one of " + ", ".join(CRITERIA))
        check_value(self.pool_factor >= 1, f"{prefix}.pool_factor", self.pool_factor, "an integer >= 1")
        check_value(0 <= self.drop_quantile < 1, f"{prefix}.drop_quantile", self.drop_quantile, "a number in [0, 1)")
        check_value(self.frd_threshold is None or (self.frd_threshold >= 0 and math.isfinite(self.frd_threshold)),
                    f"{prefix}.frd_threshold", self.frd_threshold, "null or a finite number >= 0")
        check_value(self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs), f"{prefix}.warmup_epochs",
                    self.warmup_epochs, "a finite number >= 0")
        check_value(self.schedule in SCHEDULES, f"{prefix}.schedule", self.schedule, "one of " + ", ".join(SCHEDULES))
        check_value(self.encoder in ("auto", "student"), f"{prefix}.encoder", self.encoder, "auto or student")
        check_value(self.bn in ("eval", "batch"), f"{prefix}.bn", self.bn, "eval or batch")
        check_value(self.monitor_every_n_steps >= 0, f"{prefix}.monitor_every_n_steps", self.monitor_every_n_steps,
                    "an integer >= 0 (0: off)")
        check_value(self.monitor_bank_size >= 1, f"{prefix}.monitor_bank_size", self.monitor_bank_size,
                    "an integer >= 1")


@register
class Curation(Plugin):
    """Batch curation from a candidate pool; see the module docstring."""

    name = "curation"
    hosts = dict.fromkeys(["simclr", "moco", "nnclr", "byol", "barlow", "all4one"])  # any loss
    Options = CurationOptions
    bench_options: ClassVar[dict[str, Any]] = {"warmup_epochs": 0}  # measure the curated steps

    @classmethod
    def check_config(cls, options: CurationOptions, cfg: Config) -> None:
        every, log = options.monitor_every_n_steps, cfg.train.log_every_n_steps
        check_value(every % log == 0, f"plugins.{cls.name}.monitor_every_n_steps", every,
                    f"0 or a multiple of train.log_every_n_steps={log} (the premise check's values are written on "
                    "logged steps only)")

    def __init__(self, options: CurationOptions) -> None:
        super().__init__(options)
        self._views: list[Tensor] | None = None
        self._logs: dict[str, Tensor] = {}

    @property
    def pool_factor(self) -> int:
        return self.options.pool_factor

    def batch_views(self) -> list[Tensor] | None:
        views, self._views = self._views, None
        return views

    def logs(self) -> dict[str, Tensor]:
        logs, self._logs = self._logs, {}
        return logs

    # ------------------------------------------------------------------------------------------------ the step
    def pool_size(self, batch: int, ctx: StepContext, module: Any) -> int | None:
        """``M``: how many pool images are scored at this step, or None during the warm-up."""
        o = self.options
        warm = int(round(o.warmup_epochs * module.steps_per_epoch))
        if ctx.global_step < warm:
            return None
        rest = (ctx.global_step - warm) / max(1, module.total_steps - warm)
        return batch + int(round(curation_strength(o.schedule, rest) * (o.pool_factor - 1) * batch))

    def networks(self, method: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The (backbone, projector) that embed the pool."""
        teacher = getattr(method, "teacher", None)
        if self.options.encoder == "auto" and isinstance(teacher, MomentumTeacher):
            return teacher.backbone, teacher.projector
        return method.backbone, method.projector

    @torch.no_grad()
    def embed(self, method: nn.Module, views: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Backbone features ``V x (M x D)`` (float32) and L2-normalised projections ``V x (M x P)``, both views in
        one forward pass (BatchNorm statistics untouched, see :func:`frozen_statistics`)."""
        backbone, projector = self.networks(method)
        with frozen_statistics(backbone, self.options.bn), frozen_statistics(projector, self.options.bn):
            h = backbone(torch.cat(views))  # (V*M) x D
            z = F.normalize(projector(h).float(), dim=1)  # (V*M) x P
        return h.float(), list(z.chunk(len(views)))

    def select_batch(self, indices: Tensor, ctx: StepContext, module: Any) -> Tensor:
        self._views, self._logs = None, {}
        o = self.options
        batch = indices.shape[0] // o.pool_factor
        m = self.pool_size(batch, ctx, module)
        if m is None:  # warm-up: the host's batch, views made by the module
            self._logs = {"rejected": torch.zeros((), device=indices.device)}
            return indices[:batch]
        pool = indices[:m]  # M
        views = module.make_views(module.images[pool], ctx.generator)  # V x (M x C x h x w)
        feats, (z1, z2) = self.embed(module.method, views[:2])
        s, hardest = pair_scores(z1, z2)
        if o.criterion == "pair":
            kept, dropped = select_pairs(s, hardest, batch, o.drop_quantile, o.drop_false_negatives)
            self._logs["false_negatives"] = (hardest > s).float().mean()
        else:
            kept, frds, c = select_frd(z1, z2, batch, o.frd_threshold)
            self._logs.update(frd_kept=frds[c].float(), frd_host=frds[0].float())
        rejected = torch.ones(m, dtype=torch.bool, device=s.device)
        rejected[kept] = False
        self._logs["rejected"] = rejected.float().mean()
        self._logs["agreement_kept"] = s[kept].mean()
        if rejected.any():
            self._logs["agreement_rejected"] = s[rejected].mean()
        every = o.monitor_every_n_steps
        if every and (ctx.global_step + 1) % every == 0 and rejected.any():  # Lightning's logged steps
            self._logs.update(self.premise_check(module, pool, feats, rejected))
        self._views = [v[kept] for v in views]
        return pool[kept]

    # -------------------------------------------------------------------------------------- the premise check
    def premise_check(self, module: Any, pool: Tensor, feats: Tensor, rejected: Tensor) -> dict[str, Tensor]:
        """``knn_error_kept`` / ``knn_error_rejected``: the fraction of the kept / rejected views (``feats``:
        ``V*M x D`` backbone features of the pool's views) a kNN on the monitor bank misclassifies; empty without
        training labels or a monitor bank. Labels are read here only."""
        from contrastkit.evaluation import eval_size, extract_features, knn_predict

        bank, labels = getattr(module, "monitor_bank", None), getattr(module, "labels", None)
        if bank is None or bank.labels is None or labels is None:
            return {}
        n = min(self.options.monitor_bank_size, len(bank))
        pick = torch.linspace(0, len(bank) - 1, n).round().long()  # fixed, draws no random number
        backbone, _ = self.networks(module.method)
        bank_f = extract_features(backbone, bank.images[pick], module.hparams.mean, module.hparams.std,  # eval mode
                                  module.cfg.eval.batch_size, feats.device,
                                  eval_size(module.cfg, int(module.images.shape[-1])))  # n x D
        bank_y = bank.labels[pick].to(feats.device)
        num_classes = int(max(int(bank_y.max()), int(labels.max()))) + 1
        scores = knn_predict(bank_f, bank_y, feats, num_classes, k=min(module.cfg.train.knn_k, n),
                             temperature=module.cfg.train.knn_temperature)  # (V*M) x C
        views = feats.shape[0] // pool.shape[0]
        wrong = (scores.argmax(1) != labels.to(pool.device)[pool].repeat(views)).float().view(views, -1)  # V x M
        return {"knn_error_kept": wrong[:, ~rejected].mean(), "knn_error_rejected": wrong[:, rejected].mean()}
