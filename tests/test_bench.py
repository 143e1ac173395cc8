"""The bench's own measurements (the figures themselves live in ``make bench``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_a_child_process_reports_its_own_peak_memory_not_its_parents():
    """ru_maxrss of a subprocess carries the parent's high-water mark across fork/exec: the
    peers section's children reported the bench process's 3 GB as their own peak."""
    held = bytearray(600 * 2 ** 20)
    held[::4096] = b"\1" * len(held[::4096])         # resident, not just reserved
    code = ("import json, resource; from calibrator.bench import peak_rss_mb; "
            "print(json.dumps([peak_rss_mb(), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True)
    own, inherited = json.loads(done.stdout)
    assert own < 500                                 # the child imports torch, holds no 600 MB
    assert own > 10
    del held
    if inherited < 600:                              # a kernel without the carry-over
        pytest.skip("ru_maxrss is the child's own here")
    assert inherited > own


def test_the_seed_spread_is_the_median_and_range_of_the_seeds_runs():
    from calibrator.bench.accuracy import _seed_spread
    entries = [{"seed": seed, "unseen": {"drop_pt": drop, "agreement": agree}}
               for seed, drop, agree in ((0, 1.2, 0.948), (1, 1.2, 0.964), (2, 0.4, 0.964),
                                         (3, -0.4, 0.968))]
    spread = _seed_spread(entries)
    assert spread == {"seeds": [0, 1, 2, 3], "drop_pt": "+0.8 (-0.4..+1.2)",
                      "agreement": "0.964 (0.948..0.968)"}


def test_fp32_section_names_an_opencv_without_caffe_importer(monkeypatch, tmp_path):
    """OpenCV 5 dropped readNetFromCaffe: the fp32 section stops with one line (exit 2)
    naming the version, not a traceback."""
    import types

    import cv2

    from calibrator.bench import fp32
    from calibrator.errors import CalibratorError

    dnn = types.SimpleNamespace(**{k: v for k, v in vars(cv2.dnn).items()
                                   if k != "readNetFromCaffe"})
    monkeypatch.setattr(cv2, "dnn", dnn)
    files = {"deploy": tmp_path / "deploy.prototxt", "weights": tmp_path / "w.caffemodel"}
    with pytest.raises(CalibratorError, match=rf"OpenCV {cv2.__version__} has no Caffe "
                                              r"importer.*opencv-python-headless<5"):
        fp32._opencv_net(files, None, fusion=True)


def test_the_peers_figures_are_the_min_and_median_of_the_rounds():
    from calibrator.bench.peers import _shown, _spread
    runs = [{"s": 9.0}, {"s": 7.0}, {"s": 8.0}, {"s": 20.0}]
    assert _spread(runs, "s") == (7.0, 8.5)
    assert _spread(runs[:3], "s") == (7.0, 8.0)
    assert _shown((7.0, 8.5), "{:.1f}") == "7.0 / 8.5"
