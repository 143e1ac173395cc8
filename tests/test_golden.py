"""`-q` on the shared MobileNetV2 writes the same bytes as the recorded run (see
tests/data/mobilenet_v2_q_golden.json): a restructuring or a speed-up that changes no
algorithm must not change a single scale. oneDNN's FP32 convolutions sum in another order
on each CPU kernel family (AVX2, AVX-512), so the record is per family; a CPU of another
family has none to compare with and skips."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from calibrator.cli.main import main

GOLDEN = Path(__file__).parent / "data" / "mobilenet_v2_q_golden.json"


def cpu_family() -> str | None:
    """The family of oneDNN's FP32 convolution kernels this CPU runs: ``avx512_core``
    (AVX-512 F, BW, VL and DQ), ``avx2``, or None (another CPU, or no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512_core"
    return "avx2" if "avx2" in flags else None


def _without_paths(text: str) -> str:
    return "\n".join(line for line in text.splitlines()
                     if not re.match(r"\s*(source|root_folder):", line))


@pytest.mark.slow
def test_mobilenet_v2_quantize_only_is_byte_identical_to_the_recorded_run(shared, tmp_path):
    golden = json.loads(GOLDEN.read_text())["by_cpu"].get(cpu_family())
    if golden is None:
        pytest.skip(f"no recorded run for this CPU's kernels ({cpu_family()})")
    folder = shared / "models/mobilenet_v2"
    out = tmp_path / "q.prototxt"
    assert main(["-m", str(folder / "test.prototxt"), "-w",
                 str(folder / "mobilenet_v2.caffemodel"), "-q", "--quiet", "--output", str(out),
                 "--table", str(tmp_path / "q.table"), "--json", str(tmp_path / "q.json")]) == 0
    digest = {
        "prototxt_without_paths": hashlib.sha256(
            _without_paths(out.read_text()).encode()).hexdigest(),
        "table": hashlib.sha256((tmp_path / "q.table").read_bytes()).hexdigest(),
        "json": hashlib.sha256((tmp_path / "q.json").read_bytes()).hexdigest(),
    }
    assert digest == {key: golden[key] for key in digest}
