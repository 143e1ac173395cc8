"""`-q` on the shared MobileNetV2 writes the same bytes as the recorded run (see
tests/data/mobilenet_v2_q_golden.json): a restructuring or a speed-up that changes no
algorithm must not change a single scale."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from calibrator.cli.main import main

GOLDEN = Path(__file__).parent / "data" / "mobilenet_v2_q_golden.json"


def _without_paths(text: str) -> str:
    return "\n".join(line for line in text.splitlines()
                     if not re.match(r"\s*(source|root_folder):", line))


@pytest.mark.slow
def test_mobilenet_v2_quantize_only_is_byte_identical_to_the_recorded_run(shared, tmp_path):
    golden = json.loads(GOLDEN.read_text())
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
