"""Output files are written whole or not at all: to a temporary file beside the target,
then renamed over it, so an interrupted run never leaves a half-written output."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from calibrator.errors import CalibratorError


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of an input file, or a one-line CalibratorError naming it."""
    path = Path(path)
    if not path.exists():
        raise CalibratorError(f"{path}: {what} not found")
    if path.is_dir():
        raise CalibratorError(f"{path}: {what} is a folder, expected a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CalibratorError(f"{path}: cannot read {what}: {exc.strerror}") from None
