"""Bad input to ``calibrator test`` gives one line on stderr that names the file, line or
layer at fault, exit code 2, no traceback, and writes nothing (the --dump folder stays
empty). Each case breaks one thing of a tiny working net (ImageData -> Convolution ->
InnerProduct -> Accuracy, built in tmp_path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calibrator.caffe.caffemodel import write_caffemodel
from tests.test_cli_test_cmd import (deploy_prototxt, make_tiny_net, run_cli, tiny_weights,
                                     write_png)

REPO = Path(__file__).resolve().parents[1]
EXIT_BAD_INPUT = 2


@pytest.fixture
def net(tmp_path):
    return make_tiny_net(tmp_path / "net", count=5, batch=2)


@pytest.fixture
def dump(tmp_path):
    folder = tmp_path / "dump"
    folder.mkdir()
    return folder


def expect_error(argv, capsys, dump: Path, *fragments: str) -> str:
    """Run ``argv`` with ``--dump dump``; assert the bad-input contract; return the message."""
    code, out, err = run_cli([*argv, "--dump", str(dump)], capsys)
    assert code == EXIT_BAD_INPUT, (code, err)
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith("calibrator: error: ") and err.endswith("\n")
    assert err.count("\n") == 1, f"not one line: {err!r}"
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert list(dump.iterdir()) == [], "something was written"
    return err


def test_working_net_runs(net, dump, capsys):
    """The baseline every case below breaks: it runs, prints and dumps."""
    code, out, err = run_cli(net.argv("--dump", str(dump)), capsys)
    assert code == 0 and err == "" and "accuracy = " in out and any(dump.iterdir())


# --- files -------------------------------------------------------------------------------

def test_missing_prototxt(net, dump, capsys):
    missing = net.folder / "absent.prototxt"
    expect_error(["test", "-m", str(missing), "-w", str(net.weights_path)], capsys, dump,
                 str(missing), "not found")


def test_missing_caffemodel(net, dump, capsys):
    missing = net.folder / "absent.caffemodel"
    expect_error(["test", "-m", str(net.prototxt), "-w", str(missing)], capsys, dump,
                 str(missing), "not found")


def test_caffemodel_that_is_not_one(net, dump, capsys):
    garbage = net.folder / "garbage.caffemodel"
    garbage.write_bytes(b"\xff\xfe not a protobuf \x00\x01" * 10)
    expect_error(["test", "-m", str(net.prototxt), "-w", str(garbage)], capsys, dump,
                 str(garbage))


def test_caffemodel_given_as_prototxt(net, dump, capsys):
    expect_error(["test", "-m", str(net.weights_path), "-w", str(net.weights_path)], capsys,
                 dump, str(net.weights_path))


def test_malformed_prototxt_names_the_line(net, dump, capsys):
    lines = net.prototxt.read_text().splitlines()
    conv = next(i for i, line in enumerate(lines) if 'name: "conv"' in line)
    lines.insert(conv + 1, "  convolution_parm { num_output: 4 }")  # misspelt field
    bad = net.folder / "bad.prototxt"
    bad.write_text("\n".join(lines) + "\n")
    expect_error(["test", "-m", str(bad), "-w", str(net.weights_path)], capsys, dump,
                 f"{bad}:{conv + 2}:", "convolution_parm")


def test_unbalanced_braces_name_the_file(net, dump, capsys):
    bad = net.folder / "bad.prototxt"
    bad.write_text(net.prototxt.read_text() + 'layer { name: "open" type: "ReLU"\n')
    expect_error(["test", "-m", str(bad), "-w", str(net.weights_path)], capsys, dump,
                 str(bad))


# --- the net -----------------------------------------------------------------------------

def test_weight_blob_shape_that_does_not_fit(net, dump, capsys):
    weights = dict(net.weights)
    weights["conv"] = [np.zeros((4, 3, 5, 5), np.float32), weights["conv"][1]]
    path = write_caffemodel(net.folder / "wrong.caffemodel", weights)
    expect_error(["test", "-m", str(net.prototxt), "-w", str(path)], capsys, dump,
                 "'conv'", "(4, 3, 3, 3)", "(4, 3, 5, 5)")


def test_inner_product_weights_of_the_wrong_size(net, dump, capsys):
    weights = dict(net.weights)
    weights["ip"] = [np.zeros((5, 63), np.float32), weights["ip"][1]]
    path = write_caffemodel(net.folder / "wrong.caffemodel", weights)
    expect_error(["test", "-m", str(net.prototxt), "-w", str(path)], capsys, dump,
                 "'ip'", "(5, 64)", "(5, 63)")


def test_unknown_layer_type(net, dump, capsys):
    bad = net.folder / "bad.prototxt"
    bad.write_text(net.prototxt.read_text()
                   + 'layer { name: "mystery" type: "Frobnicate" bottom: "prob" top: "m" }\n')
    expect_error(["test", "-m", str(bad), "-w", str(net.weights_path)], capsys, dump,
                 "'mystery'", "Frobnicate")


def test_layer_without_weights_in_the_caffemodel(net, dump, capsys):
    path = write_caffemodel(net.folder / "partial.caffemodel", {"conv": net.weights["conv"]})
    expect_error(["test", "-m", str(net.prototxt), "-w", str(path)], capsys, dump,
                 "'ip'", "no weights")


# --- data --------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [0, 1, 3], ids=["first", "first-batch", "later-batch"])
def test_missing_image_in_the_list(net, dump, capsys, index):
    os.remove(net.folder / "images" / f"img{index}.png")
    expect_error(net.argv(), capsys, dump, f"list.txt:{index + 1}", f"img{index}.png",
                 "not found")


@pytest.mark.parametrize("index", [0, 3], ids=["first", "later-batch"])
def test_unreadable_image_file(net, dump, capsys, index):
    (net.folder / "images" / "garbage.jpg").write_bytes(os.urandom(64))
    lines = (net.folder / "list.txt").read_text().splitlines()
    lines[index] = "images/garbage.jpg 0"
    (net.folder / "list.txt").write_text("\n".join(lines) + "\n")
    expect_error(net.argv(), capsys, dump, f"list.txt:{index + 1}", "garbage.jpg",
                 "cannot read")


def test_empty_image_list(net, dump, capsys):
    (net.folder / "list.txt").write_text("\n  \n")
    expect_error(net.argv(), capsys, dump, str(net.folder / "list.txt"), "empty")


def test_list_line_without_label(net, dump, capsys):
    (net.folder / "list.txt").write_text("images/img0.png 1\nimages/img1.png\n")
    expect_error(net.argv(), capsys, dump, "list.txt:2", "LABEL")


def _deploy(tmp_path):
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(deploy_prototxt(2, 6, 6))
    weights = write_caffemodel(tmp_path / "deploy.caffemodel", tiny_weights(4, ip_inputs=4))
    return prototxt, weights


def test_images_folder_without_images(tmp_path, dump, capsys):
    prototxt, weights = _deploy(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    (folder / "sub.png").mkdir()  # a folder named like an image is not one
    expect_error(["test", "-m", str(prototxt), "-w", str(weights), "--images", str(folder)],
                 capsys, dump, str(folder), "no ")


def test_images_folder_that_does_not_exist(tmp_path, dump, capsys):
    prototxt, weights = _deploy(tmp_path)
    expect_error(["test", "-m", str(prototxt), "-w", str(weights),
                  "--images", str(tmp_path / "absent")], capsys, dump, str(tmp_path / "absent"))


def test_unreadable_image_in_images_folder(tmp_path, dump, capsys):
    prototxt, weights = _deploy(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        write_png(folder / name, np.full((6, 6, 3), 7, np.uint8))
    (folder / "d.jpg").write_bytes(os.urandom(64))  # in the second batch of 2
    expect_error(["test", "-m", str(prototxt), "-w", str(weights), "--images", str(folder),
                  "-i", "2"], capsys, dump, str(folder / "d.jpg"))


# --- options -----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_gpu_without_cuda(net, dump, capsys):
    expect_error(net.argv("--gpu", "0"), capsys, dump, "--gpu 0", "CUDA")


def test_zero_iterations(net, dump, capsys):
    expect_error(net.argv(iterations=0), capsys, dump, "-i")


# --- a real process ----------------------------------------------------------------------

def test_exit_code_and_no_traceback_in_a_real_process(net, dump):
    """``python -m calibrator test`` as a user runs it: exit status 2, one line, no
    traceback (the in-process tests above cannot see what the interpreter would print)."""
    missing = net.folder / "absent.caffemodel"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, "-m", "calibrator", "test", "-m", str(net.prototxt),
         "-w", str(missing), "-i", "1", "--quiet", "--dump", str(dump)],
        cwd=net.folder, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("calibrator: error: ") and proc.stderr.count("\n") == 1
    assert str(missing) in proc.stderr
    assert proc.stdout == ""
    assert list(dump.iterdir()) == []
