"""Where a relative path in a prototxt points: Caffe opens it from the working directory,
but a prototxt usually names files relative to itself, so its folder is tried first."""

from __future__ import annotations

from pathlib import Path

from calibrator.errors import shorten
from calibrator.fileio import exists


def resolve_path(path: str, base_dir: Path) -> Path | None:
    """``path`` itself if absolute, else the first of base_dir/path and cwd/path that
    exists; None when none does."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate if exists(candidate) else None
    for root in (Path(base_dir), Path.cwd()):
        if exists(root / candidate):
            return root / candidate
    return None


def looked_in(path: str, base_dir: Path) -> str:
    """The places ``resolve_path`` searched, for a not-found message."""
    if Path(path).is_absolute():
        return shorten(path)
    return f"looked in {shorten(Path(base_dir) / path)} and {shorten(Path.cwd() / path)}"
