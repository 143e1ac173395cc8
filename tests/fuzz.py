"""A seeded mutational fuzzer of the command line: tiny nets whose prototxt, caffemodel,
image list and options are mutated, each case run in this process through
``calibrator.cli.main.main``.

Every case must: exit 0 or 2 (1 too for an accuracy search, whose tolerance may not be
met); print one stderr line on error (``calibrator: error: ...``), never a traceback or a
control character; write nothing when it fails (the workspace is compared file by file);
finish within a time cap (a hang is a failure). The memory of the whole run is bounded: the
runner reports its peak resident memory, and the test checks it.

Run by ``tests/test_fuzz.py`` in a child process (its peak memory, signal handlers and file
descriptors are its own)::

    python -m tests.fuzz --cases 3000 --seed 0 --json result.json [--keep FOLDER]

A failing case is reported with its mutations and argv; ``--keep`` saves its files."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from calibrator.caffe import caffe_pb2
from calibrator.cli.main import main
from tests.netutil import parse_net, random_weights
from tests.test_cli_test_cmd import make_tiny_net, write_png

#: what a fuzzed run may plan to allocate (keeps every case small and fast)
MEMORY_LIMIT = "64M"
CASE_SECONDS = 30

NUMBERS = ["0", "1", "-1", "2", "3", "7", "255", "65536", "2147483647", "2147483648",
           "4294967295", "4294967296", "9223372036854775807", "18446744073709551616",
           "1000000", "100000", "1e9", "1e38", "3.4e38", "1e39", "-1e38", "1e-45", "0.5",
           "-0.5", "nan", "inf", "-inf", "0x7fffffff", "00", "1.5"]
STRINGS = ["", "x", "/dev/zero", "/dev/urandom", "/nonexistent/file", "FIFO", "LONG",
           "../" * 40, "\\033[31mred\\033[0m", "a\\000b", "a\\nb", "net.prototxt",
           "images", "images/", "list.txt", "caffemodel", ".", "data", "conv", "prob",
           "\\377\\376", "images/img0.png", "label"]
TYPES = ["Convolution", "Deconvolution", "Pooling", "InnerProduct", "ReLU", "PReLU",
         "Softmax", "SoftmaxWithLoss", "Accuracy", "Concat", "Eltwise", "BatchNorm", "Scale",
         "Bias", "Split", "Flatten", "Reshape", "Permute", "Slice", "Crop", "Dropout",
         "Silence", "Normalize", "PriorBox", "DetectionOutput", "Input", "DummyData",
         "ImageData", "Data", "AnnotatedData", "ConvolutionDepthwise", "LRN", "Power",
         "Sigmoid", "TanH", "AbsVal", "Exp", "Log", "ELU", "ShuffleChannel", "Tile",
         "ArgMax", "Threshold", "Frobnicate"]
IDENTS = ["MAX", "AVE", "STOCHASTIC", "SUM", "PROD", "WARP", "CENTER_SIZE", "CORNER",
          "TEST", "TRAIN", "true", "false", "LMDB", "LEVELDB", "FULL", "VALID", "NONE"]
FIELDS = ["num_output: 0", "kernel_size: 0", "stride: 0", "pad: 100000", "group: 3",
          "axis: 7", "axis: -9", "top_k: 100000", "bias_term: false", "global_pooling: true",
          "dilation: 1000", "engine: CAFFE", "use_global_stats: false", "eps: -1",
          "num_axes: -2", "negative_slope: nan", "pool: STOCHASTIC",
          "crop_size: 100000", "new_height: 30000 new_width: 30000", "shuffle: true",
          "mirror: true", "is_color: false", "scale: nan", "mean_value: inf",
          "batch_size: 0", "batch_size: 100000000", "root_folder: \"/\""]
OPTIONS = [["-l", "nan"], ["-l", "inf"], ["-l", "-1"], ["-l", "0"], ["-l", "1e9"],
           ["--probe-images", "0"], ["--probe-images", "1"], ["--probe-images", "1000000"],
           ["--max-evals", "0"], ["--max-evals", "2"], ["--time-budget", "nan"],
           ["--time-budget", "0"], ["--time-budget", "1e-9"], ["-a", "PERCENTILE"],
           ["-a", "PERCENTILE50"], ["-a", "MSE"], ["-a", "MAXP"], ["-a", "DIRECT"],
           ["-a", "MA"], ["-a", "bogus"], ["--bits", "7"], ["-c", "multiple"], ["-u"],
           ["-t"], ["-f"], ["-ucac"], ["-1st"], ["-fc"], ["-s", "0"], ["-s", "2"],
           ["-i", "0"], ["-i", "-1"], ["-n", "prob"], ["-n", "conv"], ["-n", "nope"],
           ["-n", "accuracy"], ["--metric", "mean"], ["--metric", "agreement"],
           ["--metric", "map"], ["--relative"], ["--strategy", "intel"], ["--target", "avx2"],
           ["--saturation-fix", "w7"], ["--runtime", "ort"], ["-q"], ["-p"], ["--resume"],
           ["--gpu", "-1"], ["--gpu", "0"], ["-d", "1"], ["--ap-version", "Integral"],
           ["--equalize"], ["--equalize", "--weights-out", "{out}/w.caffemodel"]]


# --- the corpus ------------------------------------------------------------------------------

BN_NET = """name: "bn"
layer {{ name: "data" type: "ImageData" top: "data" top: "label"
  transform_param {{ scale: 0.0125 mean_value: 10 mean_value: 20 mean_value: 30 }}
  image_data_param {{ source: "list.txt" batch_size: 2 }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 }} }}
layer {{ name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }}
layer {{ name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param {{ bias_term: true }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv" top: "conv2"
  convolution_param {{ num_output: 4 kernel_size: 3 stride: 2 group: 2 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv2" top: "pool"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param {{ num_output: 5 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" }}
"""

SSD_NET = """name: "ssd"
layer { name: "input" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm" type: "Normalize" bottom: "conv1" top: "norm"
  norm_param { across_spatial: false channel_shared: false } }
layer { name: "loc" type: "Convolution" bottom: "norm" top: "loc"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "norm" top: "conf"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape"
  reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax"
  softmax_param { axis: 2 } }
layer { name: "conf_prob" type: "Flatten" bottom: "conf_softmax" top: "conf_prob" }
layer { name: "priors" type: "PriorBox" bottom: "norm" bottom: "data" top: "priors"
  prior_box_param { min_size: 4 max_size: 8 clip: true variance: 0.1 variance: 0.1
                    variance: 0.2 variance: 0.2 } }
layer { name: "det" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_prob"
  bottom: "priors" top: "det"
  detection_output_param { num_classes: 3 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 20 } code_type: CENTER_SIZE keep_top_k: 10
    confidence_threshold: 0.01 } }
"""


@dataclass
class Base:
    """One net of the corpus: its files (relative names in the case folder) and how it runs."""

    name: str
    prototxt: str
    weights: caffe_pb2.NetParameter
    list_text: str | None
    argv: list[str]            # after -m/-w; {images} is the image folder
    modes: tuple[str, ...]     # test, quantize, search


def _net_param(weights: dict) -> caffe_pb2.NetParameter:
    from calibrator.caffe.caffemodel import weights_to_net

    return weights_to_net(weights)


def build_corpus(root: Path) -> tuple[list[Base], Path]:
    """The base nets and the shared (read-only) data folder with its images."""
    data = root / "data"
    tiny = make_tiny_net(data / "tiny", count=5, batch=2)
    images = data / "images"
    for i, image in enumerate(tiny.images):
        write_png(images / f"img{i}.png", image)
    os.mkfifo(data / "fifo")
    list_text = "".join(f"{images / f'img{i}.png'} {label}\n"
                        for i, label in enumerate(tiny.labels))
    tiny_text = tiny.prototxt.read_text().replace('source: "list.txt"', 'source: "list.txt"')
    bn_param = parse_net(BN_NET.format())
    bn_weights = random_weights(bn_param, {"data": (2, 3, 8, 8), "label": (2,)}, seed=1)
    ssd_param = parse_net(SSD_NET)
    ssd_weights = random_weights(ssd_param, seed=2)
    bases = [
        Base("tiny", tiny_text, _net_param(tiny.weights), list_text, ["-i", "2"],
             ("test", "test", "quantize", "search")),
        Base("bn", BN_NET.format(), _net_param(bn_weights), list_text, ["-i", "1"],
             ("test", "quantize", "search")),
        Base("ssd", SSD_NET, _net_param(ssd_weights), None,
             ["-i", "1", "--images", "{images}", "--mean", "104", "117", "123"],
             ("test", "quantize")),
    ]
    return bases, data


# --- mutations -------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.\"])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_WORD = re.compile(r"(?<=: )[A-Za-z_]+\b")


def _pick(rng, matches):
    return rng.choice(matches) if matches else None


def mutate_prototxt(rng: random.Random, text: str, data: Path) -> tuple[str, str]:
    kind = rng.choice(["number", "number", "number", "string", "word", "type", "field",
                       "field", "delete", "duplicate", "bytes", "truncate", "bottom"])
    lines = text.split("\n")
    if kind == "number":
        m = _pick(rng, list(_NUMBER.finditer(text)))
        if m:
            value = rng.choice(NUMBERS)
            return text[:m.start()] + value + text[m.end():], f"number {m.group()}->{value}"
    if kind == "string":
        m = _pick(rng, list(_STRING.finditer(text)))
        if m:
            value = rng.choice(STRINGS)
            value = {"FIFO": str(data / "fifo"), "LONG": "r" * rng.choice([300, 5000]),
                     "caffemodel": "net.caffemodel"}.get(value, value)
            return (text[:m.start()] + f'"{value}"' + text[m.end():],
                    f"string {m.group()[:30]}->{value[:30]!r}")
    if kind == "word":
        m = _pick(rng, list(_WORD.finditer(text)))
        if m:
            value = rng.choice(IDENTS)
            return text[:m.start()] + value + text[m.end():], f"word {m.group()}->{value}"
    if kind == "type":
        m = _pick(rng, list(re.finditer(r'type: "(\w+)"', text)))
        if m:
            value = rng.choice(TYPES)
            return (text[:m.start()] + f'type: "{value}"' + text[m.end():],
                    f"type {m.group(1)}->{value}")
    if kind == "field":
        m = _pick(rng, list(re.finditer(r"_param \{", text)))
        if m:
            value = rng.choice(FIELDS)
            return (text[:m.end()] + f" {value} " + text[m.end():], f"field +{value}")
    if kind == "bottom":
        m = _pick(rng, list(re.finditer(r'(bottom|top): "(\w+)"', text)))
        if m:
            value = rng.choice(["data", "label", "conv", "ip", "prob", "nope", "loc_flat",
                                "priors", "norm", "conv2", "pool"])
            return (text[:m.start()] + f'{m.group(1)}: "{value}"' + text[m.end():],
                    f"{m.group(1)} {m.group(2)}->{value}")
    if kind == "delete" and len(lines) > 2:
        i = rng.randrange(len(lines))
        return "\n".join(lines[:i] + lines[i + 1:]), f"delete line {i + 1}"
    if kind == "duplicate" and lines:
        i = rng.randrange(len(lines))
        return "\n".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]), f"duplicate line {i + 1}"
    if kind == "truncate" and text:
        i = rng.randrange(len(text))
        return text[:i], f"truncate at {i}"
    raw = bytearray(text.encode("utf-8", "surrogateescape"))
    for _ in range(rng.randint(1, 4)):
        if not raw:
            break
        i = rng.randrange(len(raw))
        raw[i] = rng.choice([0, 1, 27, 10, 34, 123, 125, 255, rng.randrange(256)])
    return raw.decode("utf-8", "surrogateescape"), "bytes"


def mutate_weights(rng: random.Random, net: caffe_pb2.NetParameter) -> tuple[bytes, str]:
    net = caffe_pb2.NetParameter.FromString(net.SerializeToString())
    layers = [l for l in net.layer if len(l.blobs)]
    kind = rng.choice(["value", "value", "zeros", "shape", "drop_blob", "extra_blob",
                       "rename", "duplicate", "bytes", "truncate", "double", "empty"])
    layer = rng.choice(layers)
    blob = rng.choice(list(layer.blobs))
    note = f"{kind} {layer.name}"
    if kind == "value" and len(blob.data):
        for _ in range(rng.randint(1, 3)):
            blob.data[rng.randrange(len(blob.data))] = rng.choice(
                [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-45, 0.0, 1e20])
    elif kind == "zeros":
        for b in layer.blobs:
            b.data[:] = [0.0] * len(b.data)
    elif kind == "shape":
        dims = list(blob.shape.dim)
        i = rng.randrange(len(dims)) if dims else 0
        choice = rng.choice(["grow", "drop", "add", "huge", "negative", "zero"])
        if choice == "grow" and dims:
            dims[i] *= 2
        elif choice == "drop" and dims:
            dims.pop(i)
        elif choice == "add":
            dims.insert(i, rng.choice([1, 2]))
        elif choice == "huge" and dims:
            dims[i] = 1 << 40
        elif choice == "negative" and dims:
            dims[i] = -dims[i]
        elif dims:
            dims[i] = 0
        del blob.shape.dim[:]
        blob.shape.dim.extend(dims)
        note += f" {choice}"
    elif kind == "drop_blob":
        del layer.blobs[rng.randrange(len(layer.blobs))]
    elif kind == "extra_blob":
        layer.blobs.add().CopyFrom(blob)
    elif kind == "rename":
        layer.name = rng.choice(["", "x", layer.name + "\n", "conv", "ip", "bn"])
    elif kind == "duplicate":
        net.layer.add().CopyFrom(layer)
    elif kind == "double" and len(blob.data):
        values = list(blob.data)
        del blob.data[:]
        blob.double_data.extend(v * 1e300 if rng.random() < 0.3 else v for v in values)
    elif kind == "empty":
        del net.layer[:]
    data = bytearray(net.SerializeToString())
    if kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    return bytes(data), note


def mutate_list(rng: random.Random, text: str, data: Path) -> tuple[bytes, str]:
    lines = text.splitlines()
    kind = rng.choice(["label", "path", "drop_label", "empty", "blank", "garbage",
                       "crlf", "truncated_image", "nonutf8", "many"])
    i = rng.randrange(len(lines)) if lines else 0
    try:
        path, label = lines[i].rsplit(" ", 1)
    except (IndexError, ValueError):  # an earlier mutation left no 'path label' line
        return text.encode("utf-8", "surrogateescape") + b"x 1\n", "list append"
    if kind == "truncated_image" and not os.path.isfile(path):
        kind = "many"
    if kind == "label":
        lines[i] = f"{path} {rng.choice(['-1', 'x', '1.5', '99999999999999999999', ''])}"
    elif kind == "path":
        value = rng.choice(["/dev/zero", "/dev/urandom", str(data / "fifo"), "/nonexistent",
                            "r" * 5000, str(data), "net.prototxt", "net.caffemodel",
                            "\x1b[2Jevil", "a\x00b"])
        lines[i] = f"{value} {label}"
    elif kind == "drop_label":
        lines[i] = path
    elif kind == "empty":
        return b"", "list empty"
    elif kind == "blank":
        lines = ["", "   ", "\t"]
    elif kind == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))), "list garbage"
    elif kind == "crlf":
        return "".join(l + "\r\n" for l in lines).encode("utf-8", "surrogateescape"), "list crlf"
    elif kind == "truncated_image":
        source = Path(path).read_bytes()
        cut = data.parent / "case" / f"cut{rng.randrange(4)}.png"
        cut.write_bytes(source[:rng.randrange(len(source))])
        lines[i] = f"{cut} {label}"
    elif kind == "nonutf8":
        raw = "\n".join(lines).encode("utf-8", "surrogateescape")
        return raw + b"\xff\xfe 3\n", "list non-utf8"
    elif kind == "many":
        lines = lines * rng.choice([10, 100])
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"), f"list {kind}"


# --- running a case --------------------------------------------------------------------------

class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                found[path] = (info.st_size, info.st_mtime_ns)
    return found


@dataclass
class Outcome:
    index: int
    base: str
    mode: str
    mutations: list[str]
    argv: list[str]
    code: int | None = None
    err: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check(outcome: Outcome, allowed: set[int], written: list[str]) -> None:
    code, err = outcome.code, outcome.err
    if code not in allowed:
        outcome.problems.append(f"exit code {code}")
    if "Traceback" in err:
        outcome.problems.append("traceback on stderr")
    if any(ord(c) < 32 and c != "\n" for c in err) or "\x7f" in err:
        outcome.problems.append("control character on stderr")
    lines = err.splitlines()
    if any(len(line) > 1100 for line in lines):
        outcome.problems.append("stderr line longer than 1100 characters")
    if code == 2:
        if len(lines) != 1 or not err.startswith("calibrator: error: "):
            outcome.problems.append(f"not one error line: {err[:300]!r}")
        if written:
            outcome.problems.append(f"files written on error: {written[:5]}")
    elif code in (0, 1):
        stray = [l for l in lines if not l.startswith(("calibrator: warning", "warning:"))]
        if stray:
            outcome.problems.append(f"stderr not warnings: {stray[:3]}")


def run_case(argv: list[str]) -> tuple[int | None, str, str]:
    out, err = io.StringIO(), io.StringIO()
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except CaseTimeout:
        code = None
        err.write(f"(no result after {CASE_SECONDS} s)\n")
    except SystemExit as exc:  # --help and the like
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception:  # only with --debug, which re-raises bugs
        code = 3
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
    return code, out.getvalue(), err.getvalue()


def make_case(rng: random.Random, index: int, base: Base, data: Path, case: Path,
              out: Path) -> Outcome:
    mode = rng.choice(base.modes)
    text, weights = base.prototxt, base.weights.SerializeToString()
    list_bytes = base.list_text.encode() if base.list_text is not None else None
    mutations = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        target = rng.random()
        if target < 0.55:
            text, note = mutate_prototxt(rng, text, data)
        elif target < 0.8:
            weights, note = mutate_weights(rng, _usable(weights) or base.weights)
        elif list_bytes is not None:
            list_bytes, note = mutate_list(rng, list_bytes.decode("utf-8", "surrogateescape")
                                           or base.list_text, data)
        else:
            text, note = mutate_prototxt(rng, text, data)
        mutations.append(note)
    prototxt = case / "net.prototxt"
    prototxt.write_text(text, encoding="utf-8", errors="surrogateescape")
    (case / "net.caffemodel").write_bytes(weights)
    if list_bytes is not None:
        (case / "list.txt").write_bytes(list_bytes)
    extra = [a.replace("{images}", str(data / "images")) for a in base.argv]
    if mode == "test":
        argv = ["test", "-m", str(prototxt), "-w", str(case / "net.caffemodel"), "--quiet",
                *extra, "--dump", str(out / "dump")]
    else:
        argv = ["-m", str(prototxt), "-w", str(case / "net.caffemodel"), "--quiet", "-s", "1",
                "--output", str(out / "q.prototxt"), *extra]
        argv += ["-q"] if mode == "quantize" else ["--probe-images", "2", "-l", "0.05"]
        if rng.random() < 0.8:  # KL's threshold search costs 0.2 s a tensor: mostly cheaper
            argv += ["-a", "DIRECT"]
        if rng.random() < 0.3:
            argv += ["--json", str(out / "q.json"), "--table", str(out / "q.table")]
    if rng.random() < 0.25:
        option = [a.replace("{out}", str(out)) for a in rng.choice(OPTIONS)]
        argv += option
        mutations.append("option " + " ".join(option))
    return Outcome(index, base.name, mode, mutations, argv)


def _usable(data: bytes) -> caffe_pb2.NetParameter | None:
    """``data`` parsed, if it still holds a layer with blobs to mutate further."""
    try:
        net = caffe_pb2.NetParameter.FromString(data)
    except Exception:
        return None
    return net if any(len(layer.blobs) for layer in net.layer) else None


def fuzz(cases: int, seed: int, root: Path, keep: Path | None = None,
         seconds: float | None = None) -> dict:
    os.environ["CALIBRATOR_MEMORY_LIMIT"] = MEMORY_LIMIT
    rng = random.Random(seed)
    bases, data = build_corpus(root)
    case, out = root / "case", root / "out"
    signal.signal(signal.SIGALRM, _alarm)
    started = time.time()
    failures, codes, ran, growth = [], {}, 0, []
    for index in range(cases):
        if seconds is not None and time.time() - started > seconds:
            break
        for folder in (case, out):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        base = bases[index % len(bases)]
        outcome = make_case(rng, index, base, data, case, out)
        before = snapshot(root)
        t0 = time.time()
        rss_before = peak_rss()
        outcome.code, _, outcome.err = run_case(outcome.argv)
        outcome.seconds = time.time() - t0
        grew = peak_rss() - rss_before
        if grew > 50 << 20:  # the peak rose by more than 50 MB in this case: say which
            growth.append({"index": index, "mb": grew >> 20, "mutations": outcome.mutations,
                           "argv": outcome.argv, "code": outcome.code})
        after = snapshot(root)
        written = sorted(p for p in after if after[p] != before.get(p))
        allowed = {0, 2} | ({1} if outcome.mode == "search" else set())
        check(outcome, allowed, written)
        codes[str(outcome.code)] = codes.get(str(outcome.code), 0) + 1
        ran += 1
        if outcome.problems:
            if outcome.code == 3 and "--debug" not in outcome.argv:
                _, _, debug_err = run_case(outcome.argv + ["--debug"])
                outcome.err += debug_err[-3000:]
            failures.append(outcome.__dict__)
            if keep is not None:
                shutil.copytree(case, keep / f"case{index}", dirs_exist_ok=True)
    elapsed = time.time() - started
    peak = peak_rss()
    return {"cases": ran, "seed": seed, "seconds": round(elapsed, 1), "exit_codes": codes,
            "failures": failures, "peak_rss_bytes": peak,
            "peak_growth": sorted(growth, key=lambda g: -g["mb"])[:10]}


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (ru_maxrss would include the
    parent's peak: Linux keeps it across execve)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop starting cases after this long")
    parser.add_argument("--root", type=Path, required=True, help="an empty work folder")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--keep", type=Path, help="save the files of failing cases here")
    args = parser.parse_args(argv)
    result = fuzz(args.cases, args.seed, args.root, args.keep, args.seconds)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"{result['cases']} cases in {result['seconds']} s, exit codes "
          f"{result['exit_codes']}, {len(result['failures'])} failures, peak RSS "
          f"{result['peak_rss_bytes'] / 2**20:.0f} MB")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(cli())
