"""All4One (Estepa, Sarasua, Nagarajan, Radeva, ICCV 2023, https://arxiv.org/abs/2303.09417): neighbour, centroid
and feature contrast, on NNCLR with a momentum encoder.

Reproduces what the official code computes: github.com/ImaGonEs/all4one, upstreamed as vturrisi/solo-learn
``solo/methods/all4one.py`` (PR #382) with ``solo/losses/nnclr.py`` and ``solo/utils/positional_encodings.py``.
Per step, for the two views ``x1, x2`` of ``B`` images (shapes per view)::

    z_a   = g(f(x_a))                      BxD   online projector g over the backbone f
    p_a   = h1(z_a);  p2_a = h2(z_a)       BxD   two predictors: neighbour term, centroid term
    zm_a  = normalize(g_m(f_m(x_a)))       BxD   momentum (EMA) backbone and projector, no gradient
    NN_a  = top-k of zm_a in the support set S, most similar first                BxkxD;  nn_a = NN_a[:, 0]
    c_a   = T(NN_a + P)[:, 0];   s_a = T([p2_a, NN_a[:, :k-1]] + P)[:, 0]         BxD   (CentroidTransformer)
    l(u, v, t) = CE(normalize(u) @ normalize(v).T / t, diagonal)                  (QueueInfoNCELoss, no bank)
    L_cent = (l(c_1, s_2, t_c) + l(c_2, s_1, t_c)) / 2
    L_nn   = (l(nn_1, p_2, t) + l(nn_2, p_1, t)) / 2
    L_feat = FeatureContrastLoss(zm_1, z_2, zm_2, z_1)
    L      = w_c L_cent + w_n L_nn + w_f L_feat;   then S <- S + zm_1   (staged, pushed after the optimizer step)

Shared parts: the momentum teacher (:meth:`SSLMethod.add_teacher`, float32, cosine schedule, skipped steps leave
it), the support set (:class:`~contrastkit.models.MemoryQueue`, view 1's momentum projections, global under DDP),
the top-k search (:func:`~contrastkit.models.nearest_neighbours`), the heads (:func:`build_projector`,
:func:`build_predictor`), the contrastive loss (:func:`~contrastkit.losses.build_queue_loss` with in-batch
negatives, the negatives gathered from all processes), the centroid (:class:`~contrastkit.models.CentroidTransformer`)
and the feature term (:class:`~contrastkit.losses.FeatureContrastLoss`).

Where we differ from the official code, and why:

- The centroid term's temperature is 0.1 in the code because ``nnclr_loss_func`` is called without one (its
  default), not the configured 0.2; kept, and configurable (``centroid_temperature``).
- The paper's loss weights are written as lambdas; the code uses 0.5 for each term and ``(0.5 on + 0.5 off) * 10``
  inside the feature term (effective 2.5 on each of ``on`` and ``off``); we follow the code.
- The feed-forward width of the transformer is ``2 * D`` in the code (512 at ``D = 256``), not a fixed 512.
- Support set at the start: solo-learn fills its queue with random unit vectors; a :class:`MemoryQueue` starts
  empty. While it holds fewer than ``k`` entries (the first step), every neighbour of a sample is its own momentum
  projection, as NNCLR here uses the projection itself on an empty support set [ours].
- Under DDP with ``method.gather_distributed=true`` the feature term uses the global batch (exact: ``W`` processes
  equal one); the code computes it on each process's local batch (``gather_distributed=false`` here). The contrastive
  terms gather their columns from all processes in both. With transformer dropout > 0 every process draws its
  masks from the same (global) generator state, so 2 processes equal 1 only in distribution.
- BatchNorm: the backbone sees both views in one batch (:meth:`SSLMethod.encode_views`, as every method here);
  solo-learn runs the backbone once per view. The projector runs per view, as in the code.
- ``method.loss`` (``dcl``/``dclw``) may replace InfoNCE in the neighbour and centroid terms [ours]; the code is
  InfoNCE.

Options (``method.options.<key>``), with their defaults and sources:

- ``neighbours`` (5, official code, hard-coded): ``k``, the neighbours per sample (and the transformer's tokens).
- ``neighbour_weight`` (0.5), ``centroid_weight`` (0.5), ``feature_weight`` (0.5): official code; ``>= 0``. A zero
  weight skips its term (a zero centroid weight also skips the transformer). Centroid and feature weights 0 and
  neighbour weight 1 are NNCLR with its support set filled by a momentum encoder (tests/test_all4one.py).
- ``feature_scale`` (10, official code): the factor inside the feature term.
- ``centroid_temperature`` (0.1, official code: ``nnclr_loss_func``'s default). The neighbour term uses
  ``method.temperature`` (0.2 in solo-learn's recipes and our presets).
- ``transformer_layers`` (3), ``transformer_heads`` (8; must divide ``method.proj_out_dim``),
  ``transformer_ffn_dim`` (null = ``2 * proj_out_dim``), ``transformer_dropout`` (0.1): official code.
- ``centroid_lr`` (0.1, official code): the fixed peak learning rate of the transformer's parameter group
  (``centroid``), not scaled with the batch size; the warm-up + cosine schedule applies to it. null: the run's
  learning rate, like the other groups.

Other configuration: ``method.queue_size`` (official CIFAR recipe 98304, solo-learn's default 65536),
``method.temperature``, ``method.momentum_base`` / ``momentum_final`` (0.99 -> 1.0, official code),
``method.proj_*`` and ``method.pred_hidden_dim`` (both predictors; official 2048 -> 256 with BN on every projector
layer, predictors 4096). Parameter groups: ``backbone``, ``projector``, ``predictor`` (the neighbour predictor
``h1``; ``optim.predictor_lr_factor``), ``centroid_predictor`` (``h2``) and ``centroid`` (the transformer).
Logged terms: ``train/neighbour_loss``, ``train/centroid_loss``, ``train/feature_loss`` (unweighted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contrastkit.config import MethodConfig
from contrastkit.losses import FeatureContrastLoss, build_queue_loss
from contrastkit.methods.base import ParamGroup, SSLMethod, build_predictor, build_projector, check_two_views
from contrastkit.models import CentroidTransformer, MemoryQueue, nearest_neighbours
from contrastkit.validation import check_value


@dataclass
class All4OneOptions:
    """``method.options`` of All4One; see the module docstring for their sources."""

    neighbours: int = 5  #: k nearest neighbours per sample (transformer tokens)
    neighbour_weight: float = 0.5  #: weight of the neighbour (NNCLR) term
    centroid_weight: float = 0.5  #: weight of the centroid term
    feature_weight: float = 0.5  #: weight of the feature term
    feature_scale: float = 10.0  #: factor inside the feature term
    centroid_temperature: float = 0.1  #: temperature of the centroid term
    transformer_layers: int = 3  #: encoder layers
    transformer_heads: int = 8  #: attention heads (divide method.proj_out_dim)
    transformer_ffn_dim: int | None = None  #: feed-forward width; null = 2 * method.proj_out_dim
    transformer_dropout: float = 0.1  #: dropout of the encoder layers
    centroid_lr: float | None = 0.1  #: fixed peak lr of the transformer (not batch-scaled); null = the run's lr

    def validate(self, prefix: str) -> None:
        for key in ("neighbours", "transformer_layers", "transformer_heads"):
            check_value(getattr(self, key) >= 1, f"{prefix}.{key}", getattr(self, key), "an integer >= 1")
        check_value(self.transformer_ffn_dim is None or self.transformer_ffn_dim >= 1,
                    f"{prefix}.transformer_ffn_dim", self.transformer_ffn_dim, "an integer >= 1 or null")
        for key in ("neighbour_weight", "centroid_weight", "feature_weight"):
            value = getattr(self, key)
            check_value(math.isfinite(value) and value >= 0, f"{prefix}.{key}", value, "a finite number >= 0")
        weights = (self.neighbour_weight, self.centroid_weight, self.feature_weight)
        check_value(any(w > 0 for w in weights), f"{prefix}.neighbour_weight", self.neighbour_weight,
                    "a positive weight for at least one of neighbour_weight, centroid_weight, feature_weight")
        for key in ("feature_scale", "centroid_temperature"):
            value = getattr(self, key)
            check_value(math.isfinite(value) and value > 0, f"{prefix}.{key}", value, "a finite number > 0")
        check_value(0 <= self.transformer_dropout < 1, f"{prefix}.transformer_dropout", self.transformer_dropout,
                    "in [0, 1)")
        check_value(self.centroid_lr is None or (math.isfinite(self.centroid_lr) and self.centroid_lr > 0),
                    f"{prefix}.centroid_lr", self.centroid_lr, "a finite number > 0, or null for the run's lr")


class All4One(SSLMethod):
    """All4One; see the module docstring."""

    two_views = True
    Options = All4OneOptions

    @classmethod
    def parse_options(cls, cfg: MethodConfig) -> All4OneOptions:
        options: All4OneOptions = super().parse_options(cfg)
        heads = options.transformer_heads
        check_value(cfg.proj_out_dim % heads == 0, "method.options.transformer_heads", heads,
                    f"a divisor of method.proj_out_dim={cfg.proj_out_dim} (the transformer's width)")
        check_value(options.neighbours <= cfg.queue_size, "method.options.neighbours", options.neighbours,
                    f"at most method.queue_size={cfg.queue_size}")
        check_value(options.feature_weight == 0 or cfg.proj_out_dim >= 2, "method.proj_out_dim", cfg.proj_out_dim,
                    ">= 2 for the feature term (or method.options.feature_weight=0)")
        return options

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> None:
        super().__init__(backbone, feature_dim, cfg)
        self.options = o = self.parse_options(cfg)
        self.projector = build_projector(feature_dim, cfg)  # g
        self.predictor = build_predictor(cfg)  # h1, neighbour term
        self.add_teacher(backbone=self.backbone, projector=self.projector)  # f_m, g_m
        self.centroid_predictor = build_predictor(cfg)  # h2, centroid term
        self.centroid = CentroidTransformer(cfg.proj_out_dim, tokens=o.neighbours, layers=o.transformer_layers,
                                            heads=o.transformer_heads, ffn_dim=o.transformer_ffn_dim,
                                            dropout=o.transformer_dropout)
        self.queue = MemoryQueue(cfg.queue_size, cfg.proj_out_dim, gather_distributed=cfg.gather_distributed)
        loss: dict[str, Any] = dict(sigma=cfg.sigma, gather_distributed=cfg.gather_distributed)
        self.criterion = build_queue_loss(cfg.contrastive_loss, temperature=cfg.temperature, **loss)
        self.centroid_criterion = build_queue_loss(cfg.contrastive_loss, temperature=o.centroid_temperature, **loss)
        self.feature_criterion = FeatureContrastLoss(o.feature_scale, gather_distributed=cfg.gather_distributed)

    def neighbours(self, zm: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """The ``k`` support-set rows nearest to each row of ``zm`` (``BxD``, normalised), most similar first,
        ``BxkxD``; ``zm`` itself in every slot while the support set holds fewer than ``k`` rows."""
        k = self.options.neighbours
        if support.shape[0] < k:
            return zm.detach().unsqueeze(1).expand(-1, k, -1)  # BxkxD
        return nearest_neighbours(zm, support, k=k).embeddings  # BxkxD

    def forward_loss(self, views: list[torch.Tensor], progress: float) -> dict[str, torch.Tensor]:
        check_two_views(views, "all4one")
        o = self.options
        z1, z2 = [self.projector(h) for h in self.encode_views(views)]  # BxD each, online
        with torch.no_grad():
            zm1, zm2 = [F.normalize(self.teacher.projector(h), dim=1)
                        for h in self.encode_views(views, self.teacher.backbone)]  # BxD each, momentum
        support = self.queue.get()  # MxD snapshot: earlier steps only
        nn1, nn2 = self.neighbours(zm1, support), self.neighbours(zm2, support)  # BxkxD each, no gradient
        out: dict[str, torch.Tensor] = {}
        terms: list[tuple[float, torch.Tensor]] = []
        if o.neighbour_weight > 0:
            p1, p2 = self.predictor(z1), self.predictor(z2)  # BxD each
            loss_nn = (self.criterion(nn1[:, 0], p2) + self.criterion(nn2[:, 0], p1)) / 2
            terms.append((o.neighbour_weight, loss_nn))
            out["neighbour_loss"] = loss_nn.detach()
        if o.centroid_weight > 0:
            q1, q2 = self.centroid_predictor(z1), self.centroid_predictor(z2)  # BxD each
            # the four sequences in one batch (one pass is faster; each sequence is encoded on its own all the same)
            seqs = [nn1, nn2, self.centroid.shift(q1, nn1), self.centroid.shift(q2, nn2)]  # BxkxD each
            dtype = seqs[2].dtype  # float32 (or float64): the neighbours' dtype, promoted with the predictions'
            c1, c2, s1, s2 = self.centroid(torch.cat([s.to(dtype) for s in seqs])).chunk(4)  # BxD each
            loss_cent = (self.centroid_criterion(c1, s2) + self.centroid_criterion(c2, s1)) / 2
            terms.append((o.centroid_weight, loss_cent))
            out["centroid_loss"] = loss_cent.detach()
        if o.feature_weight > 0:
            loss_feat = self.feature_criterion(zm1, z2, zm2, z1)
            terms.append((o.feature_weight, loss_feat))
            out["feature_loss"] = loss_feat.detach()
        loss = terms[0][0] * terms[0][1]
        for weight, term in terms[1:]:
            loss = loss + weight * term
        self.queue.stage(zm1)  # view 1's momentum projections, enqueued at the optimizer step
        return {"loss": loss, **out}

    def parameter_groups(self) -> list[ParamGroup]:
        """The default groups; the transformer's (``centroid``) at the fixed ``centroid_lr`` when set."""
        groups = super().parameter_groups()
        for g in groups:
            if g.name == "centroid":
                g.lr = self.options.centroid_lr
        return groups
