"""Silence the known-benign messages Lightning prints on every run, each by its exact text.

Lightning logs availability banners and advertising tips at INFO level on every run, and its internals trigger
deprecation warnings that a user cannot act on. They drown the messages that matter, so :func:`quiet_lightning`
drops exactly these (by logger and message prefix, or by warning category and message); every other warning, e.g.
Lightning's "fewer batches than the logging interval" hint, still shows.
"""

from __future__ import annotations

import logging
import warnings

#: Lightning's rank-zero INFO messages that say nothing about the run (prefixes of the message text).
BENIGN_INFO_PREFIXES: tuple[str, ...] = (
    "GPU available:",  # device banners: the run's devices are in config.yaml and results.json
    "TPU available:",
    "HPU available:",
    "💡 Tip:",  # litlogger / litmodels advertising
    "`Trainer.fit` stopped:",  # the run's own summary says how many epochs and steps ran
    "You are using a CUDA device",  # float32 matmul precision tip
    "LOCAL_RANK:",  # CUDA_VISIBLE_DEVICES banner
)
#: Warnings (category, message regex) raised inside Lightning or torch that the user cannot act on.
BENIGN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning's _pytree on torch 2.14
    (UserWarning, r"The dirpath has changed from"),  # resume from a checkpoint written in another place
    (UserWarning, r"Checkpoint directory .* exists and is not empty"),  # resume into the run's own directory
)
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropBenignInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.getMessage().startswith(BENIGN_INFO_PREFIXES))


def quiet_lightning() -> None:
    """Install the filters (idempotent): a logging filter on Lightning's rank-zero logger and warning filters."""
    logger = logging.getLogger(_RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropBenignInfo) for f in logger.filters):
        logger.addFilter(_DropBenignInfo())
    for category, message in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
