"""Hostile input, hostile paths, interrupted runs (issue 16): every case a careful user or a
fuzzer found gives one clear stderr line and exit 2 (130/143 when interrupted), writes
nothing and overwrites no input. Each test breaks one thing of the tiny ImageData net of
``tests/test_cli_test_cmd.py`` (ImageData -> Convolution -> ReLU -> InnerProduct -> Softmax,
two Accuracy layers) or of a deploy net, built in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from calibrator.caffe import caffe_pb2
from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.cli.main import main
from tests.netutil import parse_net, random_weights
from tests.test_cli_test_cmd import (deploy_prototxt, make_tiny_net, tiny_weights,
                                     write_png)

REPO = Path(__file__).resolve().parents[1]
EXIT_BAD_INPUT = 2


# --- helpers -----------------------------------------------------------------------------

@pytest.fixture
def net(tmp_path):
    return make_tiny_net(tmp_path / "net", count=5, batch=2)


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def files_under(*folders: Path) -> dict[Path, tuple]:
    """Every file under ``folders`` with its size, modification time and (up to 1 MB) bytes,
    to prove nothing changed."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                info = path.stat()
                found[path] = (info.st_size, info.st_mtime_ns,
                               path.read_bytes() if info.st_size < (1 << 20) else None)
    return found


def one_line_error(code: int, err: str, *fragments: str, exit_code: int = EXIT_BAD_INPUT):
    assert code == exit_code, (code, err)
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err[:2000]!r}"
    assert err.startswith("calibrator: error: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def expect_bad(argv, capsys, *fragments: str, watch=()) -> str:
    """Run ``argv`` in this process; the bad-input contract: exit 2, one stderr line
    holding ``fragments``, no traceback, the files under ``watch`` unchanged (none added,
    none changed, none removed)."""
    before = files_under(*watch)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    one_line_error(code, captured.err, *fragments)
    assert files_under(*watch) == before, "a file was written, changed or removed"
    return captured.err


def calibrate_argv(net, out: Path, *extra) -> list[str]:
    """A quantize-only run of the tiny net (conv and ip INT8) writing into ``out``."""
    return ["-m", net.prototxt, "-w", net.weights_path, "-q", "-1st", "-fc", "-s", "1",
            "--quiet", "--output", out / "q.prototxt", *extra]


def search_argv(net, out: Path, *extra) -> list[str]:
    """An accuracy search on the tiny net (one batch per evaluation)."""
    return ["-m", net.prototxt, "-w", net.weights_path, "-1st", "-fc", "-i", "1", "-s", "1",
            "--probe-images", "2", "--quiet", "--output", out / "q.prototxt", *extra]


def edit_prototxt(net, old: str, new: str) -> Path:
    text = net.prototxt.read_text()
    assert old in text, old
    net.prototxt.write_text(text.replace(old, new, 1))
    return net.prototxt


def with_weights(net, **blobs) -> Path:
    weights = {**net.weights, **blobs}
    return write_caffemodel(net.weights_path, weights)


def deploy_net(folder: Path, n=2, h=6, w=6) -> tuple[Path, Path, Path]:
    """A deploy net (Input 3 x h x w) and a folder of three images."""
    folder.mkdir(parents=True, exist_ok=True)
    prototxt = folder / "deploy.prototxt"
    prototxt.write_text(deploy_prototxt(n, h, w))
    weights = write_caffemodel(folder / "deploy.caffemodel", tiny_weights(4, ip_inputs=4))
    images = folder / "images"
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        write_png(images / name, rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return prototxt, weights, images


# --- exit 3 on bad input: sizes the machine cannot hold ----------------------------------

def test_huge_convolution_pad_names_the_layer_and_the_memory(net, out, capsys):
    edit_prototxt(net, "pad: 1", "pad: 1000000")
    err = expect_bad(net.argv(), capsys, "'conv'", "memory", watch=[net.folder])
    assert "GB" in err or "TB" in err or "PB" in err


def test_huge_image_data_batch_size(net, out, capsys):
    edit_prototxt(net, "batch_size: 2", "batch_size: 2000000000")
    expect_bad(calibrate_argv(net, out), capsys, "'data'", "memory", watch=[net.folder, out])


def test_huge_image_data_new_size(net, out, capsys):
    edit_prototxt(net, "batch_size: 2", "batch_size: 2 new_height: 2000000 new_width: 2000000")
    expect_bad(net.argv(), capsys, "'data'", "memory", watch=[net.folder])


def test_huge_resize_param(net, out, capsys):
    edit_prototxt(net, "transform_param {", "transform_param { resize_param { height: 900000 "
                  "width: 900000 resize_mode: WARP }")
    expect_bad(net.argv(), capsys, "'data'", "memory", watch=[net.folder])


def test_huge_input_dims(tmp_path, capsys):
    prototxt, weights, images = deploy_net(tmp_path / "d")
    prototxt.write_text(deploy_prototxt(2, 6, 6).replace("dim: 6 dim: 6",
                                                         "dim: 3000000 dim: 3000000"))
    expect_bad(["test", "-m", prototxt, "-w", weights, "-i", "1"], capsys, "'input'",
               "memory", watch=[tmp_path])


@pytest.mark.parametrize("extra", [("--batch-size", "2000000000"),
                                   ("--size", "3000000", "3000000")],
                         ids=["batch", "size"])
def test_huge_image_folder_batch_or_size(tmp_path, capsys, extra):
    prototxt, weights, images = deploy_net(tmp_path / "d")
    expect_bad(["test", "-m", prototxt, "-w", weights, "-i", "1", "--images", images, *extra],
               capsys, "memory", watch=[tmp_path])


def test_huge_prior_box(tmp_path, capsys, monkeypatch):
    """PriorBox computes its priors at setup: a map too large for the memory is refused
    there, naming the layer."""
    monkeypatch.setenv("CALIBRATOR_MEMORY_LIMIT", "64M")
    prototxt = tmp_path / "priors.prototxt"
    prototxt.write_text("""
layer { name: "input" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 1 dim: 3000 dim: 3000 } } }
layer { name: "priors" type: "PriorBox" bottom: "data" bottom: "data" top: "priors"
  prior_box_param { min_size: 10 max_size: 20 aspect_ratio: 2 flip: true } }
""")
    weights = write_caffemodel(tmp_path / "w.caffemodel", {"unused": [np.zeros(1, np.float32)]})
    expect_bad(["test", "-m", prototxt, "-w", weights, "-i", "1"], capsys, "'priors'",
               "memory", watch=[tmp_path])


def test_memory_limit_setting_is_validated(net, capsys, monkeypatch):
    monkeypatch.setenv("CALIBRATOR_MEMORY_LIMIT", "lots")
    expect_bad(net.argv(), capsys, "CALIBRATOR_MEMORY_LIMIT", watch=[net.folder])


# --- exit 3 on bad input: the rest ---------------------------------------------------------

def test_softmax_with_loss_with_one_bottom(net, capsys):
    with open(net.prototxt, "a") as f:
        f.write('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" top: "loss" }\n')
    expect_bad(net.argv(), capsys, "'loss'", "bottom", watch=[net.folder])


def test_very_long_root_folder(net, capsys):
    edit_prototxt(net, "batch_size: 2", f'batch_size: 2 root_folder: "{"r" * 5000}/"')
    err = expect_bad(net.argv(), capsys, "'data'", "too long", watch=[net.folder])
    assert len(err) < 1200


def test_infinite_transform_scale(net, out, capsys):
    edit_prototxt(net, "scale: 0.0125", "scale: inf")
    expect_bad(calibrate_argv(net, out), capsys, "'data'", "scale", watch=[net.folder, out])


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_non_finite_weight_is_refused_naming_the_layer(net, out, capsys, value):
    weight = net.weights["conv"][0].copy()
    weight[1, 2, 0, 1] = value
    with_weights(net, conv=[weight, net.weights["conv"][1]])
    expect_bad(calibrate_argv(net, out), capsys, "'conv'", "non-finite",
               watch=[net.folder, out])


def test_huge_but_finite_weights_that_overflow_are_refused(net, out, capsys):
    weight = np.full_like(net.weights["conv"][0], 3e38)
    with_weights(net, conv=[weight, net.weights["conv"][1]])
    expect_bad(calibrate_argv(net, out), capsys, "conv", "finite", watch=[net.folder, out])


@pytest.mark.parametrize("what", ["prototxt", "weights", "list", "mean"])
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "fifo"])
def test_special_files_are_refused_before_reading(net, tmp_path, capsys, what, device):
    if device == "fifo":
        device = str(tmp_path / "fifo")
        os.mkfifo(device)
    argv = net.argv()
    if what == "prototxt":
        argv[argv.index("-m") + 1] = device
    elif what == "weights":
        argv[argv.index("-w") + 1] = device
    elif what == "list":
        edit_prototxt(net, 'source: "list.txt"', f'source: "{device}"')
    else:
        edit_prototxt(net, "mean_value: 10.0 mean_value: 20.0 mean_value: 30.0",
                      f'mean_file: "{device}"')
    expect_bad(argv, capsys, device, "not a regular file", watch=[net.folder])


def test_special_file_as_gate_model(net, tmp_path, capsys):
    expect_bad(["gate", "-m", "/dev/zero", "-w", net.weights_path, net.prototxt],
               capsys, "/dev/zero", "not a regular file", watch=[net.folder])


def test_special_file_as_gate_config(capsys):
    expect_bad(["gate", "--config", "/dev/zero"], capsys, "/dev/zero", "not a regular file")


def test_absurdly_large_file_is_refused_by_its_size(net, capsys):
    huge = net.folder / "huge.prototxt"
    with open(huge, "wb") as f:  # sparse: costs no disk
        f.truncate(3 << 30)
    expect_bad(["test", "-m", huge, "-w", net.weights_path], capsys, str(huge), "GB",
               watch=[net.folder])


def test_absurdly_large_image_is_refused_by_its_size(net, capsys):
    image = net.folder / "images" / "img3.png"
    with open(image, "r+b") as f:
        f.truncate(2 << 30)
    expect_bad(net.argv(), capsys, "img3.png", "GB")


def test_gate_config_nested_deeply(tmp_path, capsys):
    config = tmp_path / "gate.json"
    config.write_text("[" * 100_000 + "]" * 100_000)
    expect_bad(["gate", "--config", config], capsys, str(config), "nested",
               watch=[tmp_path])


@pytest.mark.parametrize("option", ["--probe-images", "--max-evals"])
def test_zero_counts_are_refused(net, out, capsys, option):
    expect_bad(search_argv(net, out, option, "0"), capsys, option, watch=[net.folder, out])


def test_metric_blob_that_is_an_intermediate_blob(net, out, capsys):
    expect_bad(search_argv(net, out, "-n", "conv"), capsys, "-n conv",
               "a top of ReLU layer 'relu'", "--metric", watch=[net.folder, out])


def test_intermediate_blob_scored_as_asked(net, out, capsys):
    """--metric says how to score an inner blob: the layers after it (ip here) cannot
    change it, and the search probes them as harmless instead of failing on them."""
    code = main([str(a) for a in search_argv(net, out, "-n", "conv", "--metric", "mean")])
    err = capsys.readouterr().err
    assert code in (0, 1), err
    assert "Traceback" not in err and (out / "q.prototxt").exists()


def test_metric_blob_that_is_not_a_metric(net, out, capsys):
    """prob is a Softmax output: its mean is 1/classes whatever the net does."""
    expect_bad(search_argv(net, out, "-n", "prob"), capsys, "-n prob", "Softmax",
               watch=[net.folder, out])


@pytest.mark.parametrize("option", ["--report", "--dump"])
def test_folder_option_naming_a_file(net, out, capsys, option):
    target = out / "taken.txt"
    target.write_text("keep me")
    argv = (net.argv(option, target) if option == "--dump"
            else calibrate_argv(net, out, option, target))
    expect_bad(argv, capsys, str(target), "not a folder", watch=[net.folder, out])


def test_export_onnx_into_a_missing_folder_creates_it(net, out, capsys):
    """A missing output folder is created when the outputs are written (it gave exit 3
    after the prototxt was written)."""
    missing = out / "absent" / "deeper" / "m.onnx"
    code = main([str(a) for a in calibrate_argv(net, out, "--export-onnx", missing)])
    assert code == 0, capsys.readouterr().err
    assert missing.is_file() and (out / "q.prototxt").is_file()


def test_output_folder_that_cannot_be_created_writes_nothing(net, out, capsys):
    (out / "file.txt").write_text("a file, not a folder")
    target = out / "file.txt" / "sub" / "m.onnx"
    expect_bad(calibrate_argv(net, out, "--export-onnx", target), capsys, "file.txt",
               "not a folder", watch=[net.folder, out])


@pytest.mark.parametrize("content", [
    '[]', '{"version": 1, "inputs": [], "evaluations": []}', '"text"',
    '{"version": 1, "inputs": "INPUTS", "evaluations": {"fp32": 3}}',
    '{"version": 1, "inputs": "INPUTS", "evaluations": {"fp32": {"metric": "x"}}}',
], ids=["list", "wrong-types", "string", "evaluation-not-a-mapping", "metric-not-a-number"])
def test_resume_with_a_state_file_of_the_wrong_shape(net, out, capsys, content):
    # a real state file first, to learn its inputs
    code = main([str(a) for a in search_argv(net, out, "--max-evals", "2")])
    capsys.readouterr()
    state = out / "q.prototxt.search.json"
    assert code in (0, 1) and state.exists()
    inputs = json.loads(state.read_text())["inputs"]
    state.write_text(content.replace('"INPUTS"', json.dumps(inputs)))
    expect_bad(search_argv(net, out, "--resume"), capsys, str(state), watch=[net.folder, out])


# --- a crash with no message ---------------------------------------------------------------

def _lmdb_net(folder: Path, count: int = 40) -> tuple[Path, Path, Path]:
    """A Data (LMDB) net of ``count`` raw 3x8x8 Datum values."""
    db = folder / "db"
    env = lmdb.open(str(db), map_size=1 << 26)
    rng = np.random.default_rng(0)
    with env.begin(write=True) as txn:
        for i in range(count):
            datum = caffe_pb2.Datum(channels=3, height=8, width=8, label=i % 5,
                                    data=rng.integers(0, 256, 192, dtype=np.uint8).tobytes())
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    prototxt = folder / "lmdb.prototxt"
    text = make_tiny_net(folder / "unused").prototxt.read_text()
    start, end = text.index("layer {"), text.index('layer { name: "conv"')
    prototxt.write_text(text[:start] + 'layer { name: "data" type: "Data" top: "data" '
                        'top: "label" transform_param { scale: 0.0125 } data_param { '
                        f'source: "{db}" batch_size: 2 backend: LMDB }} }}\n' + text[end:])
    weights = write_caffemodel(folder / "w.caffemodel", tiny_weights(0))
    return prototxt, weights, db


def test_truncated_lmdb_gives_one_line_not_sigbus(tmp_path):
    """A truncated data.mdb must be refused before it is memory-mapped: reading past the
    end of a mapped file kills the process with SIGBUS. Run in a child process, which is
    what a SIGBUS would kill."""
    prototxt, weights, db = _lmdb_net(tmp_path)
    data = db / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 3)
    proc = _run_process(["test", "-m", prototxt, "-w", weights, "-i", "3"], tmp_path)
    one_line_error(proc.returncode, proc.stderr, str(data), "truncated")


def test_lmdb_net_still_runs(tmp_path, capsys):
    prototxt, weights, _ = _lmdb_net(tmp_path)
    code = main(["test", "-m", str(prototxt), "-w", str(weights), "-i", "3", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0 and "accuracy = " in captured.out, captured.err


# --- inputs overwritten --------------------------------------------------------------------

@pytest.mark.parametrize("target", ["list.txt", "images/img2.png"])
def test_output_naming_a_data_file(net, out, capsys, target):
    expect_bad(calibrate_argv(net, out)[:-1] + [net.folder / target], capsys, target,
               "input", watch=[net.folder, out])


def test_output_naming_a_data_file_through_a_symlink(net, out, capsys):
    link = out / "alias.png"
    link.symlink_to(net.folder / "images" / "img1.png")
    expect_bad(calibrate_argv(net, out)[:-1] + [link], capsys, "alias.png", "input",
               watch=[net.folder, out])


@pytest.mark.parametrize("options", [("--json", "q.prototxt"), ("--table", "q.prototxt"),
                                     ("--json", "same"), ("--report", "q.prototxt")])
def test_two_outputs_naming_the_same_file(net, out, capsys, options):
    option, name = options
    argv = calibrate_argv(net, out, option, out / name)
    if name == "same":
        argv += ["--table", out / "same"]
    expect_bad(argv, capsys, str(out / name), watch=[net.folder, out])


def test_dump_folder_holding_an_input_of_a_name_it_writes(net, capsys):
    """--dump DIR writes <blob>_<batch>.npy: an input of such a name there is refused
    (here the image list, named prob_1.npy)."""
    (net.folder / "list.txt").rename(net.folder / "prob_1.npy")
    edit_prototxt(net, 'source: "list.txt"', 'source: "prob_1.npy"')
    expect_bad(net.argv("--dump", net.folder), capsys, "--dump", "input", "prob_1.npy",
               watch=[net.folder])


def test_dump_into_the_image_folder_is_fine(net, capsys):
    """... while one that holds none of its names may hold inputs."""
    code = main([str(a) for a in net.argv("--dump", net.folder / "images")])
    assert code == 0, capsys.readouterr().err
    assert (net.folder / "images" / "prob_0.npy").exists()


def test_report_folder_holding_an_input_of_a_name_it_writes(net, out, capsys):
    (net.folder / "list.txt").rename(net.folder / "report.json")
    edit_prototxt(net, 'source: "list.txt"', 'source: "report.json"')
    expect_bad(search_argv(net, out, "--report", net.folder), capsys, "--report", "input",
               "report.json", watch=[net.folder, out])


# --- silent garbage ------------------------------------------------------------------------

def test_all_zero_conv_is_kept_fp32_with_a_warning(net, out, capsys):
    with_weights(net, conv=[np.zeros_like(net.weights["conv"][0]), net.weights["conv"][1]])
    code = main([str(a) for a in calibrate_argv(net, out, "--table", out / "q.table")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning" in captured.err and "'conv'" in captured.err and "FP32" in captured.err
    table = (out / "q.table").read_text()
    assert "conv" not in table and "ip" in table  # ip still INT8
    written = parse_net((out / "q.prototxt").read_text())
    quantized = {l.name for l in written.layer if len(l.quantization_param.scale_in)}
    assert quantized == {"ip"}


BN_NET = """
name: "bn"
layer {{ name: "data" type: "ImageData" top: "data" top: "label"
  transform_param {{ scale: 0.0125 mean_value: 10 mean_value: 20 mean_value: 30 }}
  image_data_param {{ source: "{source}" batch_size: 2 }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 stride: 2 }} }}
layer {{ name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }}
layer {{ name: "scale" type: "Scale" bottom: "conv" top: "conv"
  scale_param {{ bias_term: true }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param {{ num_output: 5 }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" }}
"""


@pytest.mark.parametrize("case", ["negative-variance", "nan-mean", "negative-factor"])
def test_bad_batch_norm_statistics_are_refused(net, out, capsys, case):
    prototxt = net.folder / "bn.prototxt"
    prototxt.write_text(BN_NET.format(source=net.folder / "list.txt"))
    weights = random_weights(parse_net(prototxt.read_text()), {"data": (2, 3, 8, 8),
                                                               "label": (2,)})
    mean, variance, factor = weights["bn"]
    if case == "negative-variance":
        variance[2] = -0.5
    elif case == "nan-mean":
        mean[0] = np.nan
    else:
        factor[0] = -1.0
    write_caffemodel(net.weights_path, weights)
    argv = calibrate_argv(net, out)
    argv[argv.index("-m") + 1] = prototxt
    expect_bad(argv, capsys, "'bn'", watch=[net.folder, out])


@pytest.mark.parametrize("argv_extra, fragment", [
    (("-l", "nan"), "-l"), (("-l", "inf"), "-l"), (("--time-budget", "nan"), "--time-budget"),
    (("--time-budget", "-3"), "--time-budget"), (("-a", "PERCENTILE"), "PERCENTILE"),
    (("-a", "PERCENTILEnan"), "PERCENTILE"), (("-i", "-2"), "-i"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_numeric_options_are_validated(net, out, capsys, argv_extra, fragment):
    expect_bad(search_argv(net, out, *argv_extra), capsys, fragment, watch=[net.folder, out])


@pytest.mark.parametrize("extra, fragment", [
    (("--batch-size", "0"), "--batch-size"), (("--mean", "nan", "0", "0"), "--mean"),
    (("--norm", "inf"), "--norm"), (("--size", "0", "4"), "--size"),
], ids=["batch-0", "mean-nan", "norm-inf", "size-0"])
def test_image_folder_options_are_validated(tmp_path, capsys, extra, fragment):
    prototxt, weights, images = deploy_net(tmp_path / "d")
    expect_bad(["test", "-m", prototxt, "-w", weights, "-i", "1", "--images", images, *extra],
               capsys, fragment, watch=[tmp_path])


# --- late failure: outputs checked before the work -----------------------------------------

def _no_work(monkeypatch):
    """Make any calibration fail the test: the check must come before it."""
    import calibrator.pipeline as pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("the calibration ran before the outputs were checked")

    monkeypatch.setattr(pipeline, "calibrate", forbidden)


@pytest.mark.parametrize("case", ["read-only", "under-a-file", "is-a-folder"])
@pytest.mark.parametrize("option", ["--output", "--json", "--table", "--export-onnx"])
def test_bad_output_paths_fail_before_the_work(net, out, capsys, monkeypatch, case, option):
    _no_work(monkeypatch)
    if case == "read-only":
        if os.geteuid() == 0:  # root writes through file modes; /sys refuses it too
            target = Path("/sys") / "q.out"
        else:
            locked = out / "locked"
            locked.mkdir()
            locked.chmod(0o555)
            target = locked / "q.out"
    elif case == "under-a-file":
        (out / "plain").write_text("a file")
        target = out / "plain" / "q.out"
    else:
        target = out / "folder"
        target.mkdir()
    argv = calibrate_argv(net, out)
    if option == "--output":
        argv[-1] = target
    else:
        argv += [option, target]
    expect_bad(argv, capsys, str(target.parent if case != "is-a-folder" else target),
               watch=[net.folder, out])


def test_output_files_follow_the_umask(net, out, capsys):
    old = os.umask(0o022)
    try:
        code = main([str(a) for a in calibrate_argv(net, out, "--json", out / "q.json")])
    finally:
        os.umask(old)
    capsys.readouterr()
    assert code == 0
    for name in ("q.prototxt", "q.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# --- interruptions -------------------------------------------------------------------------

def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _run_process(argv, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "calibrator", *map(str, argv)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _interruptible(net, out, *extra):
    argv = [a for a in map(str, search_argv(net, out, *extra)) if a != "--quiet"]
    return subprocess.Popen([sys.executable, "-m", "calibrator", *argv], cwd=net.folder,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["starting", "working"])
def test_interrupt_at_any_moment(net, out, signum, code, moment):
    """While Python imports torch (before anything is printed), or once the calibration has
    started (its first progress line read): the last line says so, 130 or 143, and nothing is
    written, not even half. The working run is long (2000 batches an evaluation) so that the
    signal lands in the work however fast the machine."""
    proc = _interruptible(net, out, "-i", "2000")
    if moment == "starting":
        time.sleep(0.3)
        progress = ""
    else:
        progress = proc.stderr.readline()
        assert progress.startswith("calibrating "), progress
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    stderr = progress + stderr
    assert proc.returncode == code, stderr
    assert stderr.endswith("calibrator: interrupted\n") and "Traceback" not in stderr, stderr
    assert (moment == "starting") == (stderr == "calibrator: interrupted\n"), stderr
    assert list(out.iterdir()) == []


def test_a_signal_after_the_command_has_returned_changes_nothing(net, out):
    """A Ctrl-C that lands while the interpreter shuts down (the outputs already written) is
    not raised inside a library's exit hook: the exit code and the output stay the command's."""
    script = ("import atexit, os, signal, sys\n"
              "from calibrator.cli.entry import entry\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
              "sys.argv = ['calibrator', *sys.argv[1:]]\n"
              "raise SystemExit(entry())\n")
    done = subprocess.run([sys.executable, "-c", script, *map(str, calibrate_argv(net, out))],
                          cwd=net.folder, env=_env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert (out / "q.prototxt").is_file()


@pytest.mark.parametrize("argv, code, thread", [(["--version"], 0, None),
                                                 (["-m", "missing.prototxt", "-q"], 2, None),
                                                 (["--version"], 0, "daemon"),
                                                 (["--version"], 0, "worker")])
def test_the_process_ends_without_the_interpreter_teardown(tmp_path, argv, code, thread):
    """After the command, the exit handlers run and stdout/stderr are flushed (a pipe:
    buffered), then the process ends with the command's code; the interpreter's teardown,
    which would finalise the script's global (and print), is skipped. A daemon thread (a
    progress bar's monitor) does not stop that; a thread the interpreter would wait for
    does: it finishes its work and the process ends the usual way."""
    marker, finished = tmp_path / "handlers-ran", tmp_path / "thread-finished"
    script = ("import atexit, pathlib, sys, threading, time\n"
              "from calibrator.cli.entry import entry\n"
              "class Finalised:\n"
              "    def __del__(self):\n"
              "        print('torn down', file=sys.stderr)\n"
              "kept = Finalised()\n"
              f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'ran')\n"
              "import calibrator.cli.main as cli\n"
              "returned, command = threading.Event(), cli.main\n"
              "def main():\n"
              "    try:\n"
              "        return command()\n"
              "    finally:\n"
              "        returned.set()\n"
              "cli.main = main\n"
              "def work(seconds):\n"
              "    returned.wait()\n"     # (alive when the command returns)
              "    time.sleep(seconds)\n"
              f"    pathlib.Path({str(finished)!r}).write_text('done')\n"
              f"if {thread!r} == 'daemon':\n"   # (holding nothing of the script's)
              "    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
              f"if {thread!r} == 'worker':\n"
              "    threading.Thread(target=work, args=(0.5,)).start()\n"
              "sys.argv = ['calibrator', *sys.argv[1:]]\n"
              "raise SystemExit(entry())\n")
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == code, done.stderr
    assert marker.read_text() == "ran"
    assert ("torn down" in done.stderr) == (thread == "worker"), done.stderr
    assert finished.exists() == (thread == "worker")
    if code == 0:
        assert done.stdout.startswith("calibrator "), done.stdout
    else:
        assert done.stderr.startswith("calibrator: error: ") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("importable", [True, False])
def test_the_entry_imports_with_the_collector_paused_and_freezes_what_it_made(importable):
    """The CLI's import (torch's hundreds of thousands of objects) runs with the garbage
    collector paused; its objects are then frozen out of the collector's walks, and the
    collector runs again for the command, also where the import fails."""
    script = ("import gc, sys\n"
              "from calibrator.cli.entry import _import_main\n"
              f"if not {importable!r}:\n"
              "    sys.modules['calibrator.cli.main'] = None\n"   # (an import that fails)
              "seen = []\n"
              "gc.callbacks.append(lambda phase, info: seen.append(phase))\n"
              "try:\n"
              "    _import_main()\n"
              "except ImportError:\n"
              "    print('failed')\n"
              "print(len(seen), gc.isenabled(), gc.get_freeze_count())\n")
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                          text=True, timeout=300, check=True)
    *failed, figures = done.stdout.split("\n")[:-1]
    collections, enabled, frozen = figures.split()
    assert failed == ([] if importable else ["failed"])
    assert collections == "0" and enabled == "True"
    assert int(frozen) > (100_000 if importable else 0)


def test_interrupted_search_keeps_its_state_and_resumes(net, out, capsys, monkeypatch):
    from calibrator.search.evaluator import Evaluator

    real = Evaluator.evaluate
    calls = []

    def interrupted_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", interrupted_second)
    code = main([str(a) for a in search_argv(net, out)])
    err = capsys.readouterr().err
    assert code == 130 and err.startswith("calibrator: interrupted") and err.count("\n") == 1
    state = out / "q.prototxt.search.json"
    assert len(json.loads(state.read_text())["evaluations"]) == 1
    assert not (out / "q.prototxt").exists()
    monkeypatch.setattr(Evaluator, "evaluate", real)
    code = main([str(a) for a in search_argv(net, out, "--resume")])
    assert code in (0, 1) and (out / "q.prototxt").exists(), capsys.readouterr().err


def test_bad_input_met_during_the_search_leaves_no_state_file(net, out, capsys, monkeypatch):
    """The search saves its state after each evaluation; bad input found later (an image
    only a later step reads) must not leave it behind, as an interruption does."""
    from calibrator.errors import CalibratorError
    from calibrator.search.evaluator import Evaluator

    real = Evaluator.evaluate
    calls = []

    def bad_input_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise CalibratorError("list.txt:9: image not found")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", bad_input_second)
    expect_bad(search_argv(net, out), capsys, "list.txt:9", watch=[net.folder, out])


def test_stale_temporary_files_are_removed(net, out, capsys):
    """A kill between writing a temporary file and renaming it leaves it behind: the next
    run removes ours (a dead writer's), and only ours."""
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = [out / f".q.prototxt.calibrator-{dead}-abc123.tmp",
             out / f".q.prototxt.search.json.calibrator-{dead}-x.tmp"]
    for path in stale:
        path.write_text("half written")
    kept = [out / ".q.prototxt.someoneelse.tmp",
            out / f".q.prototxt.calibrator-{os.getpid()}-live.tmp"]
    for path in kept:
        path.write_text("not ours, or alive")
    code = main([str(a) for a in search_argv(net, out, "--max-evals", "2", "--resume")])
    capsys.readouterr()
    assert code == 1
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


# --- messages ------------------------------------------------------------------------------

def test_control_characters_are_escaped(net, capsys):
    with open(net.prototxt, "a") as f:
        f.write('layer { name: "evil\\033[2J\\000name" type: "Frob\\007" bottom: "prob" '
                'top: "x" }\n')
    err = expect_bad(net.argv(), capsys, "evil")
    assert not any(ord(c) < 32 and c != "\n" for c in err), repr(err)
    assert "\\x1b[2J" in err and "\\x00" in err


def test_huge_values_are_cut_with_an_ellipsis(net, capsys):
    with open(net.prototxt, "a") as f:
        f.write("x" * 5_000_000 + " { }\n")
    err = expect_bad(net.argv(), capsys, str(net.prototxt))
    assert len(err) < 1200 and "…" in err


def test_newline_in_a_blob_name_keeps_one_line(net, out, capsys):
    err = expect_bad(search_argv(net, out, "-n", "acc\nuracy"), capsys, "acc\\nuracy")
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", [["-m", "x", "-w", "y", "--bits", "9"], ["-m", "x"],
                                  ["test", "-m", "x"], ["gate", "--junk"],
                                  ["-m", "x", "-w", "y", "--probe-images", "ten"]],
                         ids=["choice", "missing-w", "test-missing-w", "gate-unknown",
                              "not-an-int"])
def test_argument_errors_are_one_line(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    one_line_error(code, captured.err)
    assert "usage:" not in captured.err


def test_truncated_jpeg_warning_is_kept_off_stderr(net, capfd):
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", image)
    (net.folder / "images" / "cut.jpg").write_bytes(encoded.tobytes()[:-40])
    (net.folder / "list.txt").write_text("images/cut.jpg 0\n")
    code = main(net.argv(iterations=1))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""


def test_pooling_stride_of_int_max(net):
    """torch logs a traceback of its own when fake tensors cannot run the layer: a real
    process shows what reaches the terminal."""
    with open(net.prototxt, "a") as f:
        f.write('layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" '
                "pooling_param { pool: MAX kernel_size: 2 stride: 2147483647 } }\n")
    proc = _run_process(net.argv(iterations=1), net.folder)
    one_line_error(proc.returncode, proc.stderr, "'pool'", "memory")


def test_negative_numbers_are_option_values(tmp_path, capsys):
    prototxt, weights, images = deploy_net(tmp_path / "d")
    code = main(["test", "-m", str(prototxt), "-w", str(weights), "-i", "1", "--quiet",
                 "--images", str(images), "--mean", "-1", "-2.5", "-3e1", "--gpu", "-1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err


def test_negative_loss_reaches_its_check(net, out, capsys):
    """-l -1 is a value for -l (not -1st's prefix); a negative tolerance is then refused."""
    expect_bad(search_argv(net, out, "-l", "-1"), capsys, "-l", ">= 0",
               watch=[net.folder, out])


# --- exit codes ----------------------------------------------------------------------------

def test_exit_codes_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["-m", "x", "-w", "y", "-h"])
    text = capsys.readouterr().out
    for fragment in ("0", "1", "2", "130", "143", "3"):
        assert f"{fragment}:" in text or f"{fragment} " in text
    readme = (REPO / "README.md").read_text()
    assert "130" in readme and "143" in readme and "report" in readme


def test_a_bug_exits_3_asking_for_a_report(net, out, capsys, monkeypatch):
    import calibrator.pipeline as pipeline

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "calibrate", bug)
    code = main([str(a) for a in calibrate_argv(net, out)])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "report" in err and "ZeroDivisionError" in err


# --- the other commands plan their outputs too ---------------------------------------------

def test_gate_output_naming_an_input_fails_before_the_gate(net, capsys, monkeypatch):
    import calibrator.cli.gate_cmd as gate_cmd

    def forbidden(*args, **kwargs):
        raise AssertionError("the gate ran before its outputs were checked")

    monkeypatch.setattr(gate_cmd, "run_gate", forbidden)
    expect_bad(["gate", "-m", net.prototxt, "-w", net.weights_path, net.prototxt,
                "--json", net.prototxt], capsys, "--json", "input", watch=[net.folder])
    expect_bad(["gate", "-m", net.prototxt, "-w", net.weights_path, net.prototxt,
                "--json", net.folder / "r.json", "--junit", net.folder / "r.json"], capsys,
               "--junit", "same file", watch=[net.folder])


def test_make_annoset_never_replaces_a_folder_holding_its_inputs(tmp_path, capsys):
    folder = tmp_path / "voc"
    write_png(folder / "a.png", np.zeros((4, 4, 3), np.uint8))
    (folder / "a.xml").write_text("<annotation><size><width>4</width><height>4</height>"
                                  "</size></annotation>")
    (folder / "list.txt").write_text("a.png a.xml\n")
    (folder / "labelmap.prototxt").write_text('item { name: "none" label: 0 }\n')
    expect_bad(["make-annoset", folder / "list.txt", folder, "--labelmap",
                folder / "labelmap.prototxt", "--force"], capsys, "OUT_DB", "input",
               watch=[folder])


def test_annotated_list_sources_protect_their_images_and_xmls(tmp_path):
    from calibrator.data import build_data_source
    from calibrator.errors import CalibratorError
    from calibrator.outputs import OutputPlan
    from tests.test_detection_data import LABELMAP, annotated_layer, voc_xml

    write_png(tmp_path / "img" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "a.xml").write_text(voc_xml(8, 8, []))
    (tmp_path / "list.txt").write_text("img/a.png xml/a.xml\n")
    (tmp_path / "labelmap.prototxt").write_text(LABELMAP)
    source = build_data_source(annotated_layer("list.txt", 1), tmp_path)
    for victim in ("xml/a.xml", "img/a.png", "labelmap.prototxt", "list.txt"):
        plan = OutputPlan()
        plan.file("--json", tmp_path / victim)
        plan.check()
        with pytest.raises(CalibratorError, match="overwrite an input"):
            plan.check_inputs(source.input_files())


@pytest.mark.parametrize("option,value", [("--easyquant-images", "0"),
                                          ("--easyquant-steps", "0"),
                                          ("--easyquant-positions", "0"),
                                          ("--easyquant-seed", "-1")])
def test_easyquant_settings_out_of_range_are_refused(net, out, capsys, option, value):
    expect_bad(calibrate_argv(net, out, "--easyquant", option, value), capsys, option,
               watch=[net.folder, out])


@pytest.mark.parametrize("extra,option", [(("--mean", "104", "117", "123"), "--mean"),
                                          (("--norm", "0.017"), "--norm"),
                                          (("--size", "8", "8"), "--size"),
                                          (("--batch-size", "4"), "--batch-size")])
def test_preprocessing_without_images_is_refused_not_ignored(net, out, capsys, extra, option):
    """The net reads its own data layer: --mean and the others would change nothing (they
    were ignored without a word)."""
    expect_bad(calibrate_argv(net, out, *extra), capsys, option, "--images",
               watch=[net.folder, out])
    expect_bad(["test", "-m", net.prototxt, "-w", net.weights_path, "-i", "1", *extra],
               capsys, option, watch=[net.folder, out])
    config = out / "gate.json"      # a gate config lists each model's own preprocessing
    config.write_text("{}")
    expect_bad(["gate", "--config", config, *extra], capsys, "--config", option,
               watch=[net.folder, out])


@pytest.mark.parametrize("option", ["--table", "--json", "--report"])
def test_performance_only_refuses_the_outputs_it_would_not_write(net, out, capsys, option):
    argv = ["-m", net.prototxt, "-w", net.weights_path, "-p", "--quiet", option, out / "x"]
    expect_bad(argv, capsys, "-p", option, watch=[net.folder, out])


def test_performance_only_writes_where_output_says(net, out, capsys):
    target = out / "speed.prototxt"
    code = main([str(a) for a in ["-m", net.prototxt, "-w", net.weights_path, "-p", "--quiet",
                                  "--output", target]])
    assert code == 0, capsys.readouterr().err
    assert f"performance-only prototxt written: {target}" in capsys.readouterr().out
    assert target.is_file() and not list(net.folder.glob("*_dummy.prototxt"))


@pytest.mark.parametrize("mode", ["-q", "-p"])
@pytest.mark.parametrize("option", [["--resume"], ["--max-evals", "3"], ["--strategy", "intel"],
                                    ["--metric", "agreement"], ["--time-budget", "5"],
                                    ["--relative"], ["--no-fp32-fallback"],
                                    ["--no-scale-search"], ["--probe-images", "3"]])
def test_search_options_without_a_search_are_refused_not_ignored(net, out, capsys, mode,
                                                                 option):
    argv = ["-m", net.prototxt, "-w", net.weights_path, mode, "-s", "1", "--quiet",
            "--output", out / "q.prototxt", *option]
    expect_bad(argv, capsys, option[0], mode, watch=[net.folder, out])


def test_probe_images_go_with_a_quantize_only_report(net, out, capsys):
    code = main([str(a) for a in calibrate_argv(net, out, "--probe-images", "1",
                                                "--report", out / "report")])
    assert code == 0, capsys.readouterr().err
    assert (out / "report" / "report.json").is_file()


@pytest.mark.parametrize("option", [["--targets", "vnni"], ["--export-onnx", "x.onnx"],
                                    ["--ort-command", "echo"], ["--threads", "2"], ["--speed"],
                                    ["--residual", "float"], ["--countermeasure", "w7"],
                                    ["--all-int8"], ["--no-fp32"]])
def test_verify_refuses_onnx_runtime_options_with_the_ncnn_runtime(net, out, capsys, option):
    argv = ["verify", "-m", net.prototxt, "-w", net.weights_path, "--runtime", "ncnn",
            *option]
    expect_bad(argv, capsys, option[0], "--runtime ort", watch=[net.folder, out])


@pytest.mark.parametrize("option, needs", [(["--ncnn", "kept"], "--runtime ncnn"),
                                           (["--fix-target", "vnni"], "--countermeasure")])
def test_verify_refuses_an_option_its_companion_is_missing_for(net, out, capsys, option,
                                                               needs):
    argv = ["verify", "-m", net.prototxt, "-w", net.weights_path, *option]
    expect_bad(argv, capsys, option[0], needs, watch=[net.folder, out])


@pytest.mark.parametrize("command", ["test", "calibrate", "gate"])
@pytest.mark.parametrize("option", ["--labelmap", "--name-size"])
def test_detection_list_options_without_a_list_are_refused(net, out, capsys, command,
                                                           option):
    given = [option, net.folder / "list.txt"]
    common = ["-m", net.prototxt, "-w", net.weights_path]
    argv = {"test": ["test", *common, "-i", "1", *given],
            "calibrate": calibrate_argv(net, out, *given),
            "gate": ["gate", *common, net.prototxt, "-i", "1", *given]}[command]
    expect_bad(argv, capsys, option, "--det-list", watch=[net.folder, out])


@pytest.mark.parametrize("argv_of, option, fragment", [
    (lambda net, out: calibrate_argv(net, out, "--easyquant-seed", "2"), "--easyquant-seed",
     "--easyquant or --weights-out"),
    (lambda net, out: search_argv(net, out, "--no-scale-search", "--easyquant-steps", "5"),
     "--easyquant-steps", "--no-scale-search"),
    (lambda net, out: search_argv(net, out, "--no-scale-search", "--easyquant"), "--easyquant",
     "contradicts --no-scale-search")])
def test_easyquant_settings_where_nothing_runs_it_are_refused(net, out, capsys, argv_of,
                                                              option, fragment):
    expect_bad(argv_of(net, out), capsys, option, fragment, watch=[net.folder, out])


def test_easyquant_settings_reach_a_quantize_only_easyquant(net, out, capsys):
    code = main([str(a) for a in calibrate_argv(net, out, "--easyquant", "--easyquant-images",
                                                "1", "--json", out / "q.json")])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "q.json").read_text())
    assert record["layerwise"]          # EasyQuant ran, on the one image it was given
