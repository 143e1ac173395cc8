"""Process-wide settings of the command-line process (calibrator.runtime)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_CHILD = """
import json, torch
from calibrator.runtime import release_memory, tune_allocator

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20

tune_allocator()
base = rss()
blocks = [torch.ones(10 * 2 ** 20) for _ in range(10)]   # 400 MB, touched
del blocks
kept = rss()
release_memory()
print(json.dumps({"base": base, "kept": kept, "released": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_release_memory_gives_back_what_the_tuned_heap_keeps():
    """The tuned heap keeps freed buffers (the next layer reuses them); between the run's
    phases release_memory hands them back, so one phase's buffers do not add to the next's."""
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["kept"] > figures["base"] + 300          # freed, still resident
    assert figures["released"] < figures["base"] + 50       # given back
