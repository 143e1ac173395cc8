"""Data-parallel runs (calibrator.distributed): ``torchrun --nproc-per-node 2`` on the CPU
(gloo) gives the bytes one process gives, for the accuracy search on the tiny net of
test_search.py (and with --equalize --weights-out, its caffemodel too) and for a detection
(mAP) search on the shared res10; one rank's bad input
ends every rank with the same line and exit code; the primitives (sharding, gathering in
batch order, exact reductions, rank 0's decisions, shared failures, no hangs) checked rank
by rank with tests/distributed_worker.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calibrator import distributed
from calibrator.cli.main import main
from calibrator.errors import CalibratorError
from tests.test_search import tiny  # noqa: F401  (the module fixture)

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("q.prototxt", "q.json", "q.table")


def one_process(argv) -> int:
    """The command in this process with one CPU thread, as each torchrun rank here runs
    (OMP_NUM_THREADS=1): oneDNN's float32 convolutions may sum in another order with
    another thread count, so byte-identical outputs need the same threads per process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.update(extra)
    return env


def torchrun(args, logs: Path, nproc: int = 2, timeout: int = 600
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m calibrator ARGS``, each rank's output
    under ``logs``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "--log-dir", str(logs),
               "--redirects", "3", "-m", "calibrator", *map(str, args)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


def rank_logs(logs: Path, stream: str) -> list[str]:
    """Each rank's stdout or stderr under torchrun's --log-dir (one run), in rank order."""
    files = sorted(logs.rglob(f"{stream}.log"), key=lambda p: int(p.parent.name))
    return [f.read_text() for f in files]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv, world: int = 2, timeout: int = 300, **env) -> list[subprocess.CompletedProcess]:
    """Start ``python ARGV`` ``world`` times with torchrun's variables set by hand (so that
    each rank's exit code and stderr can be read: torchrun itself stops the others when one
    rank exits with a failure code)."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       WORLD_SIZE=str(world), RANK=str(r), LOCAL_RANK=str(r),
                                       LOCAL_WORLD_SIZE=str(world), **env))
             for r in range(world)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


# -- one process: everything is a no-op ------------------------------------------------------

def test_single_process_is_rank_0_of_1_and_passes_are_whole():
    assert not distributed.active() and distributed.world() == 1 and distributed.is_main()
    assert distributed.shard(5) == [0, 1, 2, 3, 4]
    assert distributed.gather_batches(lambda: {2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"]
    assert distributed.agree(1.5) == 1.5 and distributed.on_main(lambda: "x") == "x"
    assert distributed.finish(1) == 1
    with pytest.raises(CalibratorError, match="bad"):  # raised as is, no exchange
        distributed.gather_batches(lambda: (_ for _ in ()).throw(CalibratorError("bad")))


def test_sharded_statistics_equal_one_pass_bit_for_bit(monkeypatch):
    """collect_sharded (what each rank runs) against collect (one process, one pass): the
    batches arrive out of order, |max| grows (the growing histogram doubles its range, more
    than once), one batch is all zeros; every figure and every fine histogram count (before
    the re-binning to 2048 bins) equal."""
    import numpy as np

    from calibrator.quant.histogram import GrowingHistogram
    from calibrator.quant.statistics import collect, collect_sharded
    from tests.quant_helpers import TinyNet, conv_text, input_text, relu_text

    fine = []
    rebin = GrowingHistogram.rebin

    def recording(self, absmax, *args):
        fine.append((self.range, None if self.counts is None else self.counts.numpy().copy()))
        return rebin(self, absmax, *args)

    monkeypatch.setattr(GrowingHistogram, "rebin", recording)

    text = (input_text((2, 3, 8, 8)) + conv_text("conv1", "data", "c1", 8, 3)
            + relu_text("relu1", "c1") + conv_text("conv2", "c1", "c2", 8, 3))
    rng = np.random.default_rng(4)
    scales = [0.1, 1.0, 0.0, 7.0, 0.5, 30.0]
    feeds = [{"data": (rng.normal(0, 1, (2, 3, 8, 8)) * scale).astype(np.float32)}
             for scale in scales]
    net = TinyNet(text, seed=2, batches=feeds)
    net.calibrate()
    order = [0, 2, 4, 1, 3, 5]  # rank 0's batches, then rank 1's
    passes = []

    def make_batches(desc):
        passes.append(desc)
        return ((i, net.batches[i]) for i in order)

    fine.clear()  # net.calibrate() collected once already
    sharded = collect_sharded(net.net, net.fused, make_batches)
    fine_sharded, fine[:] = list(fine), []
    one = collect(net.net, net.fused, iter(net.batches))
    assert len(fine) == len(fine_sharded) == len(one)
    for (range_a, counts_a), (range_b, counts_b) in zip(fine, fine_sharded):
        assert range_a == range_b and np.array_equal(counts_a, counts_b)
    assert passes == ["statistics 1/2", "statistics 2/2"]
    assert list(sharded) == list(one)
    doubled = 0
    for key, a in one.items():
        b = sharded[key]
        assert (b.minimum, b.maximum, b.absmax, b.count, b.zeros, b.batch_absmax) == (
            a.minimum, a.maximum, a.absmax, a.count, a.zeros, a.batch_absmax)
        assert b.hist.dtype == a.hist.dtype and np.array_equal(b.hist, a.hist)
        doubled += a.absmax > 4 * next(v for v in a.batch_absmax if v > 0)
    assert doubled == len(one)  # every tensor's range doubled at least twice


def test_torchrun_environment_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(CalibratorError, match="RANK=2 of WORLD_SIZE=2"):
        distributed.launched()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(CalibratorError, match="RANK='x' is not an integer"):
        distributed.launched()


def test_verify_and_make_annoset_refuse_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["verify", "-m", str(tmp_path / "q.prototxt"), "-w", str(tmp_path / "w")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "calibrator: error: calibrator verify runs in one process: run it without torchrun")
    assert main(["make-annoset", "list.txt", str(tmp_path / "db"), "--labelmap", "l"]) == 2
    assert not (tmp_path / "db").exists()


def test_gpu_id_plus_local_rank_picks_each_ranks_device(monkeypatch):
    """--gpu ID under torchrun: rank with LOCAL_RANK l takes cuda:(ID + l)."""
    from calibrator.model import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(distributed, "_GROUP", distributed._Group(3, 4, 1))
    assert select_device(0) == torch.device("cuda:1")
    assert select_device(2) == torch.device("cuda:3")
    assert select_device(-1) == torch.device("cpu")
    with pytest.raises(CalibratorError, match=r"--gpu 3: local rank 1 needs CUDA device 4 "
                                              r"\(ID \+ LOCAL_RANK\), this node has 4"):
        select_device(3)


# -- the primitives, rank by rank -------------------------------------------------------------

def _worker(tmp_path, scenario, **env) -> tuple[list[dict], list[subprocess.CompletedProcess]]:
    runs = launch(["-m", "tests.distributed_worker", tmp_path, scenario], **env)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text())
               if (tmp_path / f"rank{r}.json").exists() else None for r in range(2)]
    return records, runs


def test_two_ranks_shard_gather_in_batch_order_and_reduce_exactly(tmp_path):
    records, runs = _worker(tmp_path, "collectives")
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    zero, one = records
    assert (zero["world"], zero["is_main"], one["is_main"]) == (2, True, False)
    assert zero["ran"] == [0, 2, 4] and one["ran"] == [1, 3]  # whole batches, i % 2 == rank
    expected = [f"batch {i} on rank {i % 2}" for i in range(5)]
    assert zero["gathered"] == one["gathered"] == expected
    assert zero["sum"] == one["sum"] == [3, 3 * 2 ** 40]  # int64, exact beyond 2^32
    assert zero["max"] == one["max"] == [0.5, 0.0]
    assert zero["agree"] == one["agree"] == "decided by rank 0"
    assert zero["on_main"] == one["on_main"] == "read by rank 0"
    assert zero["code"] == one["code"] == 10  # rank 0's exit code everywhere


@pytest.mark.parametrize("scenario, line", [
    ("fail_before_any_collective", "calibrator: error: rank 1: cannot read its batches"),
    ("fail_at_the_end", "calibrator: internal error (a bug in calibrator, not in your "
                        "input: please report it with the traceback --debug prints): "
                        "OSError: disk full"),
    ("both_fail", "calibrator: error: bad image in rank 0's shard"),
])
def test_a_failure_on_one_rank_ends_every_rank_with_its_line(tmp_path, scenario, line):
    records, runs = _worker(tmp_path, scenario)
    code = 3 if "internal" in line else 2
    assert [r["error"] for r in records] == [[code, line], [code, line]]
    assert not any("passed the gather" in r or "finished" in r for r in records)
    assert [r.returncode for r in runs] == [code, code]


def test_a_vanished_rank_does_not_hang_the_others(tmp_path):
    records, runs = _worker(tmp_path, "die", timeout=120)
    assert runs[1].returncode == 7 and records[1] is None
    code, line = records[0]["error"]
    assert code == 3 and line.startswith("calibrator: error: rank 0: lost contact with the "
                                         "other ranks")


def test_a_stalled_rank_trips_the_timeout(tmp_path):
    records, runs = _worker(tmp_path, "stall", timeout=120, CALIBRATOR_DIST_TIMEOUT="2",
                            STALL_SECONDS="5")
    code, line = records[0]["error"]
    assert code == 3 and "lost contact" in line
    assert records[0]["close_seconds"] < 2  # gave up, did not wait for rank 1 at the end


# -- the command line under torchrun ----------------------------------------------------------

def _search_args(tiny, out):
    tmp, prototxt, caffemodel = tiny
    return ["-m", prototxt, "-w", caffemodel, "-i", "4", "-s", "4", "-l", "0.05",
            "--output", out / "q.prototxt", "--json", out / "q.json", "--table",
            out / "q.table", "--probe-images", "16", "--quiet"]


@pytest.mark.parametrize("strategy", ["bisect", "intel"])
def test_torchrun_search_writes_the_bytes_of_one_process(tiny, tmp_path, strategy):
    """Statistics, FP32 and INT8 evaluations sharded over two ranks (batches 0, 2 and 1, 3);
    the search (probe, adjustments, bisection, pruning) decides as one process does. The
    intel strategy's all-INT8 evaluation stops early (its verdict is known after batch 0):
    the ranks read a round of two batches and stop where one process stops."""
    extra = ["--strategy", strategy]
    (tmp_path / "one").mkdir()
    assert one_process(_search_args(tiny, tmp_path / "one") + extra) == 0
    (tmp_path / "two").mkdir()
    args = [a for a in _search_args(tiny, tmp_path / "two") if a != "--quiet"] + extra
    run = torchrun(args, tmp_path / "logs")
    assert run.returncode == 0, run.stderr[-3000:]
    for name in OUTPUTS:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    search = json.loads((tmp_path / "two/q.json").read_text())["search"]
    assert search["fp32_layers"] == ["conv2"]
    if strategy == "bisect":
        assert search["sensitivity"]  # the probe ran
    else:
        assert "all INT8: " in rank_logs(tmp_path / "logs", "stderr")[0]
        assert "stopped after 1 of 4 batches" in rank_logs(tmp_path / "logs", "stderr")[0]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(OUTPUTS)
    stdout = rank_logs(tmp_path / "logs", "stdout")
    assert len(stdout) == 2 and stdout[1] == ""  # rank 1 prints nothing
    assert rank_logs(tmp_path / "logs", "stderr")[1] == ""
    assert stdout[0].count("quantized prototxt written") == 1


def test_torchrun_caffe_test_prints_what_one_process_prints(tiny, tmp_path, capsys):
    """`calibrator test` (accuracy over 4 batches, 2 per rank): rank 0 prints one process's
    lines, rank 1 nothing."""
    _, prototxt, caffemodel = tiny
    args = ["test", "-m", prototxt, "-w", caffemodel, "-i", "4", "--quiet"]
    capsys.readouterr()
    assert one_process(args) == 0
    expected = capsys.readouterr().out
    assert expected.startswith("accuracy = ")
    run = torchrun(args, tmp_path / "logs")
    assert run.returncode == 0, run.stderr[-3000:]
    assert rank_logs(tmp_path / "logs", "stdout") == [expected, ""]


@pytest.mark.parametrize("mode", [["-q", "--easyquant"], ["-l", "0.05"]],
                         ids=["quantize-only", "search"])
def test_torchrun_equalized_corrected_weights_are_the_bytes_of_one_process(tiny, tmp_path,
                                                                           mode):
    """--equalize --weights-out on two ranks: the equalization's ranges, the statistics, the
    EasyQuant and bias-correction pass (and for the search its evaluations) give the
    prototxt, the table, the caffemodel and the JSON one process gives (the JSON's
    weights_out names each run's own file)."""
    tmp, prototxt, caffemodel = tiny
    records = {}
    for name in ("one", "two"):
        out = tmp_path / name
        out.mkdir()
        args = ["-m", prototxt, "-w", caffemodel, "-i", "4", "-s", "4", "-c", "multiple",
                "--equalize", "--weights-out", out / "w.caffemodel", "--output",
                out / "q.prototxt", "--json", out / "q.json", "--table", out / "q.table",
                *mode]
        if name == "one":
            assert one_process(args + ["--quiet"]) == 0
        else:
            run = torchrun(args, tmp_path / "logs")
            assert run.returncode == 0, run.stderr[-3000:]
        records[name] = json.loads((out / "q.json").read_text())
        assert records[name].pop("weights_out") == str(out / "w.caffemodel")
    assert records["one"] == records["two"]
    assert records["one"]["equalization"]["groups"]
    if "-l" in mode:
        assert records["one"]["search"]["met"]
    for name in ("q.prototxt", "q.table", "w.caffemodel"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert rank_logs(tmp_path / "logs", "stdout")[1] == ""        # rank 1 writes nothing


@pytest.mark.slow
def test_torchrun_resume_reads_rank_0s_state(tiny, tmp_path):
    """An interrupted two-rank search (--max-evals 2) resumed by two ranks gives the bytes
    of one uninterrupted process; the state file is rank 0's, then removed."""
    out = tmp_path / "part"
    out.mkdir()
    run = torchrun(_search_args(tiny, out) + ["--max-evals", "2"], tmp_path / "first")
    assert run.returncode == 1, run.stderr[-3000:]  # not met (yet): the best is written
    state = json.loads((out / "q.prototxt.search.json").read_text())
    assert len(state["evaluations"]) == 2
    resumed = [a for a in _search_args(tiny, out) if a != "--quiet"] + ["--resume"]
    run = torchrun(resumed, tmp_path / "second")
    assert run.returncode == 0, run.stderr[-3000:]
    stderr = rank_logs(tmp_path / "second", "stderr")
    assert "resuming: 2 evaluations recalled" in stderr[0] and stderr[1] == ""
    (tmp_path / "one").mkdir()
    assert one_process(_search_args(tiny, tmp_path / "one")) == 0
    for name in OUTPUTS:
        assert (tmp_path / "one" / name).read_bytes() == (out / name).read_bytes()
    assert not (out / "q.prototxt.search.json").exists()


def test_one_ranks_bad_image_ends_every_rank_with_the_same_line(tiny, tmp_path, capsys):
    """A corrupt image in batch 1: only rank 1 reads it (rank 0 reads batches 0 and 2). Both
    ranks end with the line one process prints, exit code 2, and nothing is written."""
    source, prototxt, caffemodel = tiny
    data = tmp_path / "data"
    shutil.copytree(source / "img", data / "img")
    (data / "img" / "bad.png").write_bytes(b"not a png")
    lines = (source / "list.txt").read_text().splitlines()
    lines[20] = "bad.png 0"  # batch 1 (16 images a batch)
    (data / "list.txt").write_text("\n".join(lines) + "\n")
    text = prototxt.read_text().replace(str(source / "list.txt"), str(data / "list.txt"))
    broken = data / "tiny.prototxt"
    broken.write_text(text.replace(str(source / "img"), str(data / "img")))
    argv = ["-m", broken, "-w", caffemodel, "-i", "4", "-s", "4", "--quiet",
            "--output", tmp_path / "out" / "q.prototxt"]
    assert main([str(a) for a in argv]) == 2
    line = capsys.readouterr().err.strip()
    assert "bad.png" in line and line.startswith("calibrator: error: ")
    runs = launch(["-m", "calibrator", *argv])
    assert [r.returncode for r in runs] == [2, 2]
    assert [r.stderr.strip() for r in runs] == [line, line]
    assert [r.stdout for r in runs] == ["", ""]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_detection_map_search_writes_the_bytes_of_one_process(shared, tmp_path):
    """res10 SSD on 8 of the pseudo-labelled faces (2 batches of 4, one per rank): mAP from
    the true/false positives of both ranks' batches gathered in batch order; 7-bit INT8
    clipped at each tensor's median loses mAP, so the search probes, adjusts layers and
    evaluates again before it meets -l."""
    faces = shared / "data/faces-pseudo"
    model = shared / "models/res10_ssd"

    def args(out):
        out.mkdir()
        return ["-m", model / "deploy.prototxt",
                "-w", model / "res10_300x300_ssd_iter_140000.caffemodel",
                "--det-list", faces / "list.txt", "--labelmap", faces / "labelmap.prototxt",
                "--name-size", faces / "name_size.txt", "--mean", "104", "177", "123",
                "--size", "300", "300", "--batch-size", "4", "-i", "2", "-s", "2", "-d", "1",
                "-l", "0.001", "--bits", "7", "-a", "PERCENTILE50", "--max-evals", "5",
                "--quiet",
                "--no-scale-search",  # EasyQuant takes minutes here
                "--output", out / "q.prototxt", "--json", out / "q.json",
                "--table", out / "q.table"]

    one = one_process(args(tmp_path / "one"))
    run = torchrun(args(tmp_path / "two"), tmp_path / "logs")
    assert run.returncode == one, run.stderr[-3000:]
    for name in OUTPUTS:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    search = json.loads((tmp_path / "two/q.json").read_text())["search"]
    assert search["metric"] == "detection_eval" and 0.5 < search["fp32"] <= 1
    assert search["sensitivity"] and search["full_evaluations"] >= 4


def test_bench_gpu_without_cuda_fails_cleanly(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from calibrator.bench.__main__ import main as bench

    assert bench(["--gpu", "0", "--shared", str(tmp_path), "--out",
                  str(tmp_path / "b.json"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "calibrator.bench: error: --gpu 0: no CUDA device is available (run without --gpu)")
    assert not (tmp_path / "b.json").exists()
