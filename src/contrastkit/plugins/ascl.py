"""ASCL as a plug-in: soft contrastive targets on the MoCo, SimCLR and BYOL hosts.

Paper: Feng & Patras, "Adaptive Soft Contrastive Learning", ICPR 2022, https://arxiv.org/abs/2207.11163; official
code github.com/MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022 (``model.py``). The equations, the three
variants and their sources are in :mod:`contrastkit.losses.ascl`; this plug-in only swaps the host's loss for the
matching variant (the *targets* hook) and logs ``train/ascl_confidence`` (mean ``c``) and ``train/ascl_mass``
(target mass outside the positive).

Hosts:

- ``moco`` with ``method.loss=infonce``: :class:`~contrastkit.losses.ASCLLoss` at ``method.temperature``, targets
  from the queue *before* this step's keys are enqueued (MoCo's order; the paper). Symmetric MoCo applies it to
  both directions. The official recipe (``configs/cifar10_moco_ascl_resnet18.yaml``) is asymmetric with a weak key
  view.
- ``simclr`` with ``method.loss=infonce``: :class:`~contrastkit.losses.InBatchASCLLoss` over the ``2N - 2`` in-batch
  candidates [ours].
- ``byol``: :class:`~contrastkit.losses.ASCLNormalizedMSELoss`, in-batch targets over the other ``B - 1`` keys
  (official code), both directions of BYOL's symmetrised loss.

Refused: ``method.loss=dcl``/``dclw`` (DCL removes the positive from the denominator on which the targets are a
distribution), NNCLR (its positive is a support-set neighbour already, and its negatives are predictions, not
keys: the targets are undefined there) and Barlow Twins (no contrastive targets).

Distributed: MoCo's queue is global, so each process computes the targets of its own queries from the same queue
and the loss is a per-query mean: ``W`` processes equal one process on the whole batch (tested). SimCLR and BYOL
take their in-batch candidates from all processes when ``method.gather_distributed=true``.

Options (``plugins.ascl.<key>``):

- ``neighbours`` (int >= 1, default 1, official code ``--K``/``nn_num``; its README's CIFAR-100 example uses 5).
- ``target_temperature`` (> 0, default 0.05, official code ``T2``).
- ``targets`` (``ascl`` default, ``ahcl``, ``hard``, ``normal``; official code ``--type``). ``normal`` is the host's
  own loss exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from contrastkit.config import MethodConfig
from contrastkit.validation import check_value
from contrastkit.losses import ASCLLoss, ASCLNormalizedMSELoss, InBatchASCLLoss
from contrastkit.losses.ascl import ASCL_TARGETS
from contrastkit.plugins.base import Plugin
from contrastkit.plugins.registry import register


@dataclass
class ASCLOptions:
    """``plugins.ascl`` options; see the module docstring for their sources."""

    neighbours: int = 1  #: K: scales the soft targets (ascl) or the top-K count (ahcl, hard)
    target_temperature: float = 0.05  #: t' of the key-to-candidate distribution
    targets: str = "ascl"  #: ascl, ahcl, hard, normal

    def validate(self, prefix: str) -> None:
        check_value(self.neighbours >= 1, f"{prefix}.neighbours", self.neighbours, "an integer >= 1")
        check_value(self.target_temperature > 0 and math.isfinite(self.target_temperature),
               f"{prefix}.target_temperature", self.target_temperature, "a finite number > 0")
        check_value(self.targets in ASCL_TARGETS, f"{prefix}.targets", self.targets, "one of " + ", ".join(ASCL_TARGETS))


@register
class ASCL(Plugin):
    """Adaptive soft contrastive targets; see the module docstring."""

    name = "ascl"
    hosts = {"moco": ("infonce", "ntxent"), "simclr": ("infonce", "ntxent"), "byol": None}
    Options = ASCLOptions

    def __init__(self, options: ASCLOptions) -> None:
        super().__init__(options)
        self._losses: list[nn.Module] = []  # the loss it made (a plain list: the method owns the module)

    def criterion(self, host: str, default: nn.Module | None, cfg: MethodConfig) -> nn.Module:
        o = self.options
        kw = dict(target_temperature=o.target_temperature, neighbours=o.neighbours, targets=o.targets,
                  gather_distributed=cfg.gather_distributed)
        loss: nn.Module
        if host == "moco":
            loss = ASCLLoss(temperature=cfg.temperature, **kw)
        elif host == "simclr":
            loss = InBatchASCLLoss(temperature=cfg.temperature, **kw)
        else:
            loss = ASCLNormalizedMSELoss(**kw)
        self._losses = [loss]
        return loss

    def logs(self) -> dict[str, Tensor]:
        return self._losses[0].pop_stats() if self._losses else {}
