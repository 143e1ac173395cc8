"""The seeded mutational fuzzer (``tests/fuzz.py``) as part of the suite: mutated
prototxts, caffemodels, image lists and options of tiny nets, every case through
``calibrator.cli.main.main`` in one child process.

``make test`` runs 3,000 cases (about two minutes on 2 cores); a nightly run takes more with
``CALIBRATOR_FUZZ_CASES=30000`` (and another ``CALIBRATOR_FUZZ_SEED``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import fuzz

REPO = Path(__file__).resolve().parents[1]
CASES = int(os.environ.get("CALIBRATOR_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("CALIBRATOR_FUZZ_SEED", "0"))
#: the child's peak resident memory (torch itself takes about 400 MB); every case may plan
#: at most fuzz.MEMORY_LIMIT
PEAK_RSS_LIMIT = 1536 << 20


def _describe(failure: dict) -> str:
    return (f"case {failure['index']} ({failure['base']}, {failure['mode']}): "
            f"{'; '.join(failure['problems'])}\n  mutations: {failure['mutations']}\n"
            f"  argv: {' '.join(failure['argv'])}\n  stderr: {failure['err'][-1500:]}")


def test_fuzzed_inputs_exit_0_or_2_with_one_line_and_bounded_memory(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    result_path = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--cases", str(CASES), "--seed", str(SEED),
         "--root", str(root), "--json", str(result_path), "--keep", str(tmp_path / "failed")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600 + CASES * 0.5)
    assert result_path.exists(), proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    print(f"fuzz: {result['cases']} cases (seed {SEED}) in {result['seconds']} s, exit codes "
          f"{result['exit_codes']}, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MB")
    failures = result["failures"]
    assert not failures, (f"{len(failures)} of {result['cases']} cases broke the contract:\n"
                          + "\n".join(_describe(f) for f in failures[:10]))
    assert result["cases"] == CASES
    codes = result["exit_codes"]
    # the mutations reach both outcomes, not only parse errors
    assert codes.get("0", 0) >= CASES // 50 and codes.get("2", 0) >= CASES // 2, codes
    assert result["peak_rss_bytes"] < PEAK_RSS_LIMIT, (result["peak_rss_bytes"],
                                                        result["peak_growth"])
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_the_checker_catches_each_broken_promise():
    """The fuzzer would pass vacuously if its checks did not bite: each kind of breach is
    reported."""
    def problems(code, err, written=(), mode="test"):
        outcome = fuzz.Outcome(0, "tiny", mode, [], [], code=code, err=err)
        fuzz.check(outcome, {0, 2} | ({1} if mode == "search" else set()), list(written))
        return outcome.problems

    assert problems(2, "calibrator: error: bad\n") == []
    assert problems(0, "calibrator: warning: x\n") == []
    assert problems(3, "calibrator: internal error: KeyError\n")
    assert problems(1, "") and problems(1, "", mode="search") == []
    assert problems(2, "calibrator: error: a\ncalibrator: error: b\n")
    assert problems(2, "Traceback (most recent call last):\n")
    assert problems(2, "calibrator: error: \x1b[2J\n")
    assert problems(2, "calibrator: error: " + "x" * 2000 + "\n")
    assert problems(2, "calibrator: error: bad\n", written=["/out/q.prototxt"])
    assert problems(0, "Premature end of JPEG file\n")
    assert problems(None, "(no result after 30 s)\n")
