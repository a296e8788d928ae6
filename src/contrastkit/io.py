"""Atomic file writing: the one helper every contrastkit output goes through.

Checkpoints, ``results.json``, ``config.yaml``, reports, plots, exports, ``embed`` outputs and caches are written to
a temporary file in the destination's folder and renamed onto the final name (``os.replace``, atomic on POSIX), so
a reader sees either the old file, no file, or the complete new one. The temporary name is unique
(``tempfile.mkstemp``: ``.NAME.XXXXXXXX.tmp``), so two writers of the same file never share a temporary file,
and a hidden ``.NAME.*.tmp`` left by a killed process is never mistaken for an output (safe to delete).

:func:`writable_file` and :func:`writable_folder` check an output path given on the command line (``--out``)
before the work that produces it starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contrastkit.errors import ConfigError


def atomic_write(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a unique temporary path in ``final``'s folder, then rename it onto ``final``.

    The temporary file is removed when ``write`` fails or is interrupted, so ``final`` is either absent, the old
    version, or complete. ``write`` must write to the path it is given (not derive another name from it).
    Returns ``final`` as a :class:`~pathlib.Path`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions of a new file
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (numbers that JSON lacks, e.g. numpy, as float)."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=float))


def writable_folder(folder: str | Path, what: str, target: str | Path | None = None) -> Path:
    """Create ``folder`` (and its parents) and check that a file can be written in it; returns it as a Path.

    ``what`` names the option in the error (e.g. ``"--out"``), ``target`` the path given to it (default
    ``folder``). Raises :class:`ConfigError` (one line) when the folder cannot be created or written to."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a probe, deleted on close
            pass
    except OSError as e:
        given = str(folder if target is None else target)
        reason = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise ConfigError(f"{what} {given!r}: cannot write in {str(path)!r} ({reason or type(e).__name__}); "
                          "choose another path") from None
    return path


def writable_file(path: str | Path, what: str) -> Path:
    """Check that the file ``path`` can be written (its folder is created if needed); returns it as a Path."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; give a file name")
    writable_folder(p.parent, what, target=path)
    return p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
