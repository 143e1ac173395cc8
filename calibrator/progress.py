"""Progress bars on stderr for long passes; silent with --quiet or when not a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, desc: str, quiet: bool = False,
                 total: int | None = None) -> Iterable[T]:
    if quiet or not sys.stderr.isatty():
        return items
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
