"""Shared fixtures: where ../shared is, and skipping real-model tests when it is absent."""

import os

# before torch loads: the suite shares its cores with the processes it starts (cli/__init__.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import pytest

from calibrator.runtime import tune_allocator

tune_allocator()  # the real-model tests run batch-50 CNNs on the CPU

REPO = Path(__file__).resolve().parents[1]


def shared_path() -> Path | None:
    env = os.environ.get("CALIBRATOR_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_path()
    if path is None:
        pytest.skip("../shared (or $CALIBRATOR_SHARED) not found")
    return path
