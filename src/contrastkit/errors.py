"""User-facing errors.

Every error that a user can fix (a wrong path, a corrupt file, an invalid configuration value) is raised as
:class:`ContrastkitError` with a one-line message that says what is wrong and how to fix it. The CLI prints it as
``error: <message>`` and exits with status 2; library users catch it like any exception.
"""

from __future__ import annotations


class ContrastkitError(Exception):
    """An error caused by user input, with a one-line message that says how to fix it."""


class ConfigError(ContrastkitError):
    """An invalid configuration key or value."""


class DataError(ContrastkitError):
    """A missing, corrupt or unsuitable dataset."""


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT); the message says what was kept and how to continue. The CLI prints it
    and exits with status 130 (128 + SIGINT)."""
