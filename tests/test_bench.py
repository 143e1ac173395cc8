"""The bench's own measurements (the figures themselves live in ``make bench``)."""

from __future__ import annotations

import json
import math
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
    entries = [{"seed": seed, "unseen": {"drop_pt": drop, "agreement": agree,
                                         "kl_divergence": kl}}
               for seed, drop, agree, kl in ((0, 1.2, 0.948, 0.012), (1, 1.2, 0.964, 0.0142),
                                             (2, 0.4, 0.964, 0.0165), (3, -0.4, 0.968, 0.013))]
    spread = _seed_spread(entries)
    assert spread == {"seeds": [0, 1, 2, 3], "drop_pt": "+0.8 (-0.4..+1.2)",
                      "mean_drop_pt": 0.6,
                      "agreement": "0.964 (0.948..0.968)", "mean_agreement": 0.961,
                      "kl_divergence": "13.6 (12.0..16.5)"}


def test_the_headline_setting_is_also_calibrated_on_the_second_half_at_every_seed(
        monkeypatch, tmp_path):
    """The accuracy section's swapped runs calibrate on the half the others are judged on
    and are judged on the other; each split's seeds get a spread row of their own. The
    7-bit setting runs at the same eight seeds, on the standard halves only."""
    import torch

    from calibrator.bench import Context
    from calibrator.bench import accuracy as bench

    halves = {name: tmp_path / f"{name}.prototxt" for name in ("calib", "judge", "all")}
    calls = []

    def fake_run(ctx, files, calib, judge, everything, out, label, options, extra, seed):
        calls.append((label, calib.stem, judge.stem, seed))
        agreement = (0.96 if calib.stem == "calib" else 0.98) + seed / 1000
        return {"setting": label, "seed": seed, "exit": 0, "wall_seconds": 1.0,
                "unseen": {"drop_pt": seed * 0.4, "agreement": agreement,
                           "agreement_95": (0.9, 1.0), "fp32_only_right": 1,
                           "int8_only_right": 1, "kl_divergence": 0.01},
                "all_dev": {"drop_pt": 0.0}, "int8_layers": 51, "fp32_layers": 1,
                "full_evaluations": None, "met_on_calibration_half": None}

    monkeypatch.setattr(bench, "_files", lambda ctx: {})
    monkeypatch.setattr(bench, "_split", lambda files, folder: tuple(halves.values()))
    monkeypatch.setattr(bench, "_run", fake_run)
    monkeypatch.setattr(bench, "_nncf_unseen", lambda *args: None)
    result = bench.accuracy(Context(shared=tmp_path, device=torch.device("cpu"), quiet=True))

    (headline, _, _), = bench.HEADLINE
    swapped = [c for c in calls if c[0].endswith("halves swapped")]
    assert swapped and all(c[0].startswith(headline) for c in swapped)
    assert {(c[1], c[2]) for c in swapped} == {("judge", "calib")}
    assert sorted(c[3] for c in swapped) == list(range(8))
    standard = [c for c in calls if c[0].startswith(headline) and c not in swapped
                and "--easyquant-images" not in c[0]]
    assert {(c[1], c[2]) for c in standard} == {("calib", "judge")}
    assert sorted(c[3] for c in standard) == list(range(8))
    spreads = result.data["easyquant_seed_spread"]
    assert spreads[headline]["seeds"] == list(range(8))
    assert spreads[f"{headline}, halves swapped"]["mean_agreement"] == 0.9835
    assert spreads[headline]["mean_agreement"] == 0.9635
    labels = [row[0] for row in result.tables[0].rows]
    assert f"{headline}, halves swapped, seeds 0-7: median (min..max), mean" in labels
    assert f"{headline}, seeds 0-7: median (min..max), mean" in labels
    assert all(e["halves_swapped"] == e["setting"].endswith("swapped")
               for e in result.data["settings"])
    seven = "-q --bits 7 -c multiple --equalize --easyquant --weights-out"
    assert sorted(c[3] for c in calls if c[0].startswith(seven)) == list(range(8))
    assert {(c[1], c[2]) for c in calls if c[0].startswith(seven)} == {("calib", "judge")}
    assert f"{seven}, halves swapped" not in spreads
    assert spreads[seven]["mean_drop_pt"] == 1.4            # 0.4 x the mean of 0..7
    assert spreads[seven]["drop_pt"] == "+1.4 (+0.0..+2.8)"


def test_seed_ranges_read_as_ranges_where_consecutive():
    from calibrator.bench.accuracy import _seed_range
    assert _seed_range([3, 0, 1, 2]) == "0-3"
    assert _seed_range([0, 2, 3]) == "0, 2, 3"


def test_the_output_divergence_is_the_kl_divergence_of_the_softmaxes():
    """KL(softmax(FP32) || softmax(INT8)) per image, averaged: for two classes it has a
    closed form in the logistic function (FP32 scores (0, d) against INT8's (0, 0): the
    distributions (1 - s, s) and (1/2, 1/2), s = 1 / (1 + exp(-d))); adding a constant to
    an image's scores changes nothing; scores in the thousands do not overflow."""
    import math

    import numpy as np

    from calibrator.bench import output_divergence, score_figures
    for d in (0.5, 3.0, -7.0):
        s = 1.0 / (1.0 + math.exp(-d))
        closed = s * math.log(2 * s) + (1 - s) * math.log(2 * (1 - s))
        assert output_divergence([[0.0, d]], [[0.0, 0.0]]) == pytest.approx(closed, rel=1e-12)
    two = output_divergence([[0.0, 0.5], [0.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert two == pytest.approx((output_divergence([[0.0, 0.5]], [[0.0, 0.0]])
                                 + output_divergence([[0.0, 3.0]], [[0.0, 0.0]])) / 2)
    rng = np.random.default_rng(3)
    a = rng.normal(0, 4, (6, 1000)).astype(np.float32)
    b = a + rng.normal(0, 0.5, a.shape).astype(np.float32)
    assert output_divergence(a, b) > 0
    shifted = b.astype(np.float64) + 7.0             # exact: no float32 rounding of b + 7
    assert output_divergence(a, shifted) == pytest.approx(output_divergence(a, b), rel=1e-9)
    assert output_divergence(a, a) == 0.0
    assert math.isfinite(output_divergence(100 * a, 100 * b))
    figures = score_figures(a.argmax(1), a, b)
    assert figures["kl_divergence"] == output_divergence(a, b)
    assert figures["agreement"] == float((a.argmax(1) == b.argmax(1)).mean())
    assert figures["fp32"] == 1.0


def test_the_output_divergence_is_scipys_entropy_of_the_softmaxes():
    import numpy as np
    special = pytest.importorskip("scipy.special")
    stats = pytest.importorskip("scipy.stats")
    from calibrator.bench import output_divergence
    rng = np.random.default_rng(3)
    a = rng.normal(0, 4, (6, 1000)).astype(np.float32)
    b = a + rng.normal(0, 0.5, a.shape).astype(np.float32)
    expected = np.mean([stats.entropy(special.softmax(x.astype(np.float64)),
                                      special.softmax(y.astype(np.float64)))
                        for x, y in zip(a, b)])
    assert output_divergence(a, b) == pytest.approx(expected, rel=1e-9)


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


@pytest.mark.parametrize("successes,trials", [(238, 250), (250, 250), (0, 250), (3, 7),
                                              (481, 500)])
def test_the_agreement_interval_is_where_the_score_test_accepts(successes, trials):
    """Wilson's interval from its definition: at each bound inside (0, 1) the score
    statistic |p_hat - p| / sqrt(p (1 - p) / n) is the normal quantile; just inside it is
    smaller, just outside larger; a bound at 0 or 1 is where p_hat is."""
    from calibrator.bench import Z95, wilson_interval
    low, high = wilson_interval(successes, trials)
    p_hat = successes / trials

    def score(p):
        return abs(p_hat - p) / math.sqrt(p * (1 - p) / trials)

    assert 0.0 <= low <= p_hat <= high <= 1.0
    for bound, inward in ((low, 1e-6), (high, -1e-6)):
        if 0.0 < bound < 1.0:
            assert score(bound) == pytest.approx(Z95, rel=1e-9)
            assert score(bound + inward) < Z95 < score(bound - inward)
        else:
            assert bound == p_hat


def test_the_agreement_interval_is_scipys_wilson_interval():
    stats = pytest.importorskip("scipy.stats")
    from calibrator.bench import wilson_interval
    for successes, trials in ((238, 250), (250, 250), (0, 250), (3, 7), (120, 250)):
        reference = stats.binomtest(successes, trials).proportion_ci(0.95, method="wilson")
        assert wilson_interval(successes, trials) == pytest.approx(
            (reference.low, reference.high), abs=1e-12)


def test_top1_figures_count_the_images_only_one_side_gets_right():
    import numpy as np

    from calibrator.bench import top1_figures
    labels = np.array([0, 1, 2, 3, 4, 5])
    fp32 = np.array([0, 1, 2, 9, 9, 5])        # right on 0, 1, 2, 5
    int8 = np.array([0, 1, 8, 3, 9, 7])        # right on 0, 1, 3; agrees on 0, 1, 4
    figures = top1_figures(labels, fp32, int8)
    assert figures["images"] == 6
    assert figures["fp32_only_right"] == 2 and figures["int8_only_right"] == 1
    assert figures["drop_pt"] == pytest.approx(100 * (2 - 1) / 6)
    assert figures["agreement"] == 0.5
    low, high = figures["agreement_95"]
    assert low < 0.5 < high
