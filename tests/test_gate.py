"""``calibrator gate`` on a tiny synthetic classifier: ImageData over PNGs, three convolutions,
an InnerProduct and Accuracy top-1 / top-2, quantized with ``calibrator -q``. A copy of the
quantized prototxt with one layer's scale_in multiplied by 10 must fail the gate."""

from __future__ import annotations

import argparse
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.cli.main import main
from calibrator.errors import CalibratorError
from tests.netutil import tinted_image_net

NET = """
name: "gate_tiny"
layer {{ name: "data" type: "ImageData" top: "data" top: "label"
  transform_param {{ scale: 0.0078125 mean_value: 128 mean_value: 128 mean_value: 128 }}
  image_data_param {{ source: "{source}" root_folder: "{root}/" batch_size: 8 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param {{ num_output: 8 kernel_size: 1 }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv3" top: "pool"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param {{ num_output: 6 }} }}
layer {{ name: "accuracy-top1" type: "Accuracy" bottom: "fc" bottom: "label"
  top: "accuracy-top1" }}
layer {{ name: "accuracy-top2" type: "Accuracy" bottom: "fc" bottom: "label"
  top: "accuracy-top2" accuracy_param {{ top_k: 2 }} }}
"""

IMAGES, BATCH = 32, 8
ITERS = str(IMAGES // BATCH)


def gate(*argv) -> int:
    """``calibrator gate ...`` through the CLI (its dispatch, before main.py lists it)."""
    from calibrator.cli import main as cli

    if "gate" in cli.SUBCOMMANDS:
        return cli.main(["gate", *map(str, argv)])
    from calibrator.cli import gate_cmd
    parser = argparse.ArgumentParser(prog="calibrator")
    gate_cmd.add_parser(parser.add_subparsers(dest="command"))
    try:
        args = parser.parse_args(["gate", *map(str, argv)])
        return args.run(args)
    except CalibratorError as exc:
        print(f"calibrator: error: {exc}")
        return 2


def _weights(rng):
    def conv(o, c, k):
        return [rng.normal(0, math.sqrt(2.0 / (c * k * k)), (o, c, k, k)).astype(np.float32),
                rng.normal(0, 0.05, o).astype(np.float32)]

    return {"conv1": conv(8, 3, 3), "conv2": conv(8, 8, 3), "conv3": conv(8, 8, 1),
            "fc": [rng.normal(0, 0.5, (6, 8)).astype(np.float32), np.zeros(6, np.float32)]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """FP32 prototxt and weights whose labels are the FP32 net's own predictions (top-1
    accuracy 1.0), and the calibrated INT8 prototxt from ``calibrator -q``."""
    from calibrator.model import load_model

    tmp = tmp_path_factory.mktemp("gate")
    rng = np.random.default_rng(11)
    prototxt, names = tinted_image_net(tmp, rng, IMAGES, 10, NET, "tiny")
    caffemodel = tmp / "tiny.caffemodel"
    weights = _weights(rng)
    write_caffemodel(caffemodel, weights)
    model = load_model(prototxt, caffemodel)
    pooled = np.concatenate([model.net(model.source.batch(i), outputs=["pool"])["pool"]
                             .reshape(BATCH, -1).numpy() for i in range(IMAGES // BATCH)])
    w = rng.normal(0, 1, (6, pooled.shape[1])) / (pooled.std(0) + 1e-6)
    weights["fc"] = [w.astype(np.float32), (-w @ pooled.mean(0)).astype(np.float32)]
    write_caffemodel(caffemodel, weights)
    model = load_model(prototxt, caffemodel)
    labels = np.concatenate([model.net(model.source.batch(i), outputs=["fc"])["fc"]
                             .argmax(1).numpy() for i in range(IMAGES // BATCH)])
    assert len(set(labels.tolist())) >= 4, "the FP32 net must predict varied classes"
    (tmp / "list.txt").write_text("".join(f"{n} {l}\n" for n, l in zip(names, labels)))
    quantized = tmp / "tiny_q.prototxt"
    # DIRECT (max) ranges: KL's threshold search would take most of this module's time
    assert main(["-m", str(prototxt), "-w", str(caffemodel), "-q", "-s", ITERS, "-a", "DIRECT",
                 "--quiet", "--output", str(quantized)]) == 0
    text = quantized.read_text()
    assert "quantization_param" in text
    return tmp, prototxt, caffemodel, quantized


def _broken(tiny, layer="conv2", factor=10.0) -> Path:
    """The quantized prototxt with ``layer``'s scale_in multiplied by ``factor``."""
    tmp, _, _, quantized = tiny
    text = quantized.read_text()
    start = text.index(f'name: "{layer}"')
    match = re.compile(r"scale_in: ([0-9.eE+-]+)").search(text, start)
    value = float(match.group(1)) * factor
    broken = tmp / f"tiny_broken_{layer}.prototxt"
    broken.write_text(text[:match.start(1)] + repr(value) + text[match.end(1):])
    return broken


def _common(tiny):
    _, prototxt, caffemodel, _ = tiny
    return ["-m", prototxt, "-w", caffemodel, "-i", ITERS, "--quiet"]


def test_calibrated_passes_and_broken_fails_with_one_failure_per_failing_metric(
        tiny, tmp_path, capsys):
    _, prototxt, caffemodel, quantized = tiny
    broken = _broken(tiny)
    code = gate(*_common(tiny), quantized, broken, "-l", "0.15",
                "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml")
    out = capsys.readouterr().out
    assert code == 1, out
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["passed"] is False and record["cases"] == 4
    by = {(r["candidate"], r["metric"]): r for r in record["results"]}
    assert set(by) == {(c, m) for c in ("tiny_q", "tiny_broken_conv2")
                       for m in ("accuracy-top1", "accuracy-top2")}
    for metric in ("accuracy-top1", "accuracy-top2"):
        good = by[("tiny_q", metric)]
        assert good["passed"] and good["fp32"] == pytest.approx(1.0)
        assert good["drop"] <= 0.15 and good["kind"] == "mean"
    bad = [r for r in record["results"] if r["candidate"] == "tiny_broken_conv2"]
    failing = [r for r in bad if not r["passed"]]
    assert by[("tiny_broken_conv2", "accuracy-top1")] in failing
    assert all(r["drop"] > 0.15 for r in failing)
    assert "gate FAILED" in out and "tiny_broken_conv2" in out

    root = ET.parse(tmp_path / "r.xml").getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == \
        ("4", str(len(failing)), "0")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"tiny/tiny_q", "tiny/tiny_broken_conv2"}
    good_suite, bad_suite = suites["tiny/tiny_q"], suites["tiny/tiny_broken_conv2"]
    assert (good_suite.get("tests"), good_suite.get("failures")) == ("2", "0")
    assert (bad_suite.get("tests"), bad_suite.get("failures")) == ("2", str(len(failing)))
    assert not good_suite.findall(".//failure")
    failures = bad_suite.findall(".//failure")
    assert len(failures) == len(failing) >= 1
    for case in bad_suite.findall("testcase"):
        assert case.get("classname") == "tiny.tiny_broken_conv2"
        metric = case.get("name")
        assert len(case.findall("failure")) == (0 if by[("tiny_broken_conv2", metric)]
                                                ["passed"] else 1)
    _check_junit_schema(root)


def test_calibrated_alone_passes_exit_0(tiny, capsys):
    assert gate(*_common(tiny), tiny[3], "-l", "0.15") == 0
    assert "gate passed: 2 checks" in capsys.readouterr().out


# -- JUnit schema (junit-4, as Jenkins and GitLab read it) ----------------------------------

_SUITES_ATTRS = {"name", "time", "tests", "failures", "disabled", "errors"}
_SUITE_ATTRS = {"name", "tests", "failures", "errors", "time", "disabled", "skipped",
                "timestamp", "hostname", "id", "package"}
_CASE_ATTRS = {"name", "assertions", "time", "classname", "status"}
_CASE_CHILDREN = ["skipped", "error", "failure", "system-out", "system-err"]


def _check_junit_schema(root):
    """Element names, attribute sets, required attributes, child order and counts."""
    assert set(root.attrib) <= _SUITES_ATTRS
    assert all(child.tag == "testsuite" for child in root)
    total = failures = 0
    for suite in root:
        assert set(suite.attrib) <= _SUITE_ATTRS and {"name", "tests"} <= set(suite.attrib)
        tags = [c.tag for c in suite]
        order = ["properties"] * tags.count("properties") + ["testcase"] * tags.count(
            "testcase") + [t for t in tags if t in ("system-out", "system-err")]
        assert tags == order and tags.count("properties") <= 1
        for prop in suite.findall("properties/property"):
            assert set(prop.attrib) == {"name", "value"}
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == len(suite.findall("testcase/failure"))
        float(suite.get("time"))
        for case in cases:
            assert set(case.attrib) <= _CASE_ATTRS and "name" in case.attrib
            float(case.get("time"))
            ranks = [_CASE_CHILDREN.index(c.tag) for c in case]
            assert ranks == sorted(ranks)
            for failure in case.findall("failure"):
                assert set(failure.attrib) <= {"message", "type"}
        total += len(cases)
        failures += int(suite.get("failures"))
    assert int(root.get("tests")) == total and int(root.get("failures")) == failures
    try:  # the same rules as an XML schema, where lxml is installed (not a dependency)
        from lxml import etree
    except ImportError:
        return
    schema = etree.XMLSchema(etree.fromstring(JUNIT4_XSD.encode()))
    assert schema.validate(etree.fromstring(ET.tostring(root))), schema.error_log


JUNIT4_XSD = """<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
 <xs:complexType name="result" mixed="true">
  <xs:attribute name="type" type="xs:string"/><xs:attribute name="message" type="xs:string"/>
 </xs:complexType>
 <xs:element name="testsuites"><xs:complexType>
  <xs:sequence><xs:element ref="testsuite" minOccurs="0" maxOccurs="unbounded"/></xs:sequence>
  <xs:attribute name="name" type="xs:string"/><xs:attribute name="time" type="xs:decimal"/>
  <xs:attribute name="tests" type="xs:int"/><xs:attribute name="failures" type="xs:int"/>
  <xs:attribute name="disabled" type="xs:int"/><xs:attribute name="errors" type="xs:int"/>
 </xs:complexType></xs:element>
 <xs:element name="testsuite"><xs:complexType><xs:sequence>
   <xs:element name="properties" minOccurs="0"><xs:complexType><xs:sequence>
    <xs:element name="property" minOccurs="0" maxOccurs="unbounded"><xs:complexType>
     <xs:attribute name="name" type="xs:string" use="required"/>
     <xs:attribute name="value" type="xs:string" use="required"/>
    </xs:complexType></xs:element></xs:sequence></xs:complexType></xs:element>
   <xs:element ref="testcase" minOccurs="0" maxOccurs="unbounded"/>
   <xs:element name="system-out" type="xs:string" minOccurs="0"/>
   <xs:element name="system-err" type="xs:string" minOccurs="0"/>
  </xs:sequence>
  <xs:attribute name="name" type="xs:string" use="required"/>
  <xs:attribute name="tests" type="xs:int" use="required"/>
  <xs:attribute name="failures" type="xs:int"/><xs:attribute name="errors" type="xs:int"/>
  <xs:attribute name="time" type="xs:decimal"/><xs:attribute name="disabled" type="xs:int"/>
  <xs:attribute name="skipped" type="xs:int"/><xs:attribute name="timestamp" type="xs:dateTime"/>
  <xs:attribute name="hostname" type="xs:string"/><xs:attribute name="id" type="xs:string"/>
  <xs:attribute name="package" type="xs:string"/>
 </xs:complexType></xs:element>
 <xs:element name="testcase"><xs:complexType><xs:sequence>
   <xs:element name="skipped" type="result" minOccurs="0"/>
   <xs:element name="error" type="result" minOccurs="0" maxOccurs="unbounded"/>
   <xs:element name="failure" type="result" minOccurs="0" maxOccurs="unbounded"/>
   <xs:element name="system-out" type="xs:string" minOccurs="0" maxOccurs="unbounded"/>
   <xs:element name="system-err" type="xs:string" minOccurs="0" maxOccurs="unbounded"/>
  </xs:sequence>
  <xs:attribute name="name" type="xs:string" use="required"/>
  <xs:attribute name="assertions" type="xs:string"/><xs:attribute name="time" type="xs:decimal"/>
  <xs:attribute name="classname" type="xs:string"/><xs:attribute name="status" type="xs:string"/>
 </xs:complexType></xs:element>
</xs:schema>"""


# -- history and plot ----------------------------------------------------------------------

def test_two_runs_append_two_history_lines_and_plot_two_points(tiny, tmp_path):
    history, plot = tmp_path / "h.jsonl", tmp_path / "h.png"
    for _ in range(2):
        assert gate(*_common(tiny), tiny[3], "-l", "0.15", "--history", history,
                    "--plot", plot) == 0
    lines = history.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    strip = lambda r: {k: v for k, v in r.items() if k != "timestamp"}  # noqa: E731
    assert strip(first) == strip(second)  # deterministic apart from the timestamp
    assert {r["metric"] for r in first["results"]} == {"accuracy-top1", "accuracy-top2"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from calibrator.gate.history import plot_history, read_history

    series = plot_history(read_history(history), tmp_path / "again.png")
    assert set(series) == {"tiny/tiny_q: accuracy-top1", "tiny/tiny_q: accuracy-top2"}
    for s in series.values():
        assert s["run"] == [1, 2] and len(s["int8"]) == 2 and s["int8"][0] == s["int8"][1]


def test_history_skips_a_torn_last_line_and_rejects_a_bad_middle_line(tmp_path):
    from calibrator.gate.history import append_history, read_history

    path = tmp_path / "h.jsonl"
    record = {"timestamp": "t", "passed": True, "results": []}
    append_history(path, record)
    with open(path, "a") as f:
        f.write('{"timestamp": "t2", "res')  # interrupted
    assert read_history(path) == [record]
    append_history(path, record)  # starts a fresh line
    with pytest.raises(CalibratorError, match=r"h.jsonl:2: not a JSON line"):
        read_history(path)


# -- baseline, relative thresholds, several metrics -----------------------------------------

def test_baseline_fails_a_regression_beyond_the_margin(tiny, tmp_path):
    broken = _broken(tiny)
    first = tmp_path / "first.json"
    # the broken prototxt passes a loose threshold...
    assert gate(*_common(tiny), broken, "-l", "1", "--json", first) == 0
    # ...and becomes the baseline: the same file again is no regression
    assert gate(*_common(tiny), broken, "-l", "1", "--baseline", first) == 0
    # a baseline that was better by more than the margin fails; within the margin passes
    data = json.loads(first.read_text())
    for r in data["results"]:
        r["int8"] = r["int8"] + 0.2
    better = tmp_path / "better.json"
    better.write_text(json.dumps(data))
    out = tmp_path / "vs_better.json"
    assert gate(*_common(tiny), broken, "-l", "1", "--baseline", better,
                "--baseline-margin", "0.1", "--json", out, "--junit", tmp_path / "b.xml") == 1
    results = json.loads(out.read_text())["results"]
    assert all(not r["passed"] and r["baseline"] is not None for r in results)
    assert all("baseline" in r["failures"][0] for r in results)
    failure = ET.parse(tmp_path / "b.xml").getroot().find(".//failure")
    assert failure.get("type") == "BaselineRegression"
    assert gate(*_common(tiny), broken, "-l", "1", "--baseline", better,
                "--baseline-margin", "0.25") == 0
    # a relative margin: 0.2 / baseline value, so 100% always passes
    assert gate(*_common(tiny), broken, "-l", "1", "--baseline", better,
                "--baseline-margin", "100%") == 0


def test_relative_and_per_metric_thresholds(tiny, tmp_path):
    broken = _broken(tiny)
    out = tmp_path / "r.json"
    assert gate(*_common(tiny), broken, "-n", "accuracy-top1=100%",
                "-n", "accuracy-top2=1", "--json", out) == 0
    results = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    top1 = results["accuracy-top1"]
    assert top1["relative"] and top1["threshold"] == 1.0
    assert top1["loss"] == pytest.approx(top1["drop"] / top1["fp32"])
    assert not results["accuracy-top2"]["relative"]
    drop = top1["drop"]
    assert drop > 0.05
    # a relative threshold just under the relative drop fails, just over passes
    below, above = (f"{(drop / top1['fp32']) * 100 * f:.6f}%" for f in (0.99, 1.01))
    assert gate(*_common(tiny), broken, "-n", f"accuracy-top1={below}") == 1
    assert gate(*_common(tiny), broken, "-n", f"accuracy-top1={above}") == 0
    # --relative makes plain numbers relative
    assert gate(*_common(tiny), broken, "-n", "accuracy-top1", "--relative",
                "-l", f"{drop / top1['fp32'] * 0.99:.6f}") == 1


def test_agreement_metric_is_label_free(tiny, tmp_path):
    out = tmp_path / "a.json"
    broken = _broken(tiny)
    assert gate(*_common(tiny), tiny[3], broken, "--agreement", "fc=0.15", "-n",
                "accuracy-top1=1", "--json", out) == 1
    results = {(r["candidate"], r["metric"]): r for r in json.loads(out.read_text())["results"]}
    # labels are the FP32 predictions, so agreement equals top-1 accuracy here
    for candidate in ("tiny_q", "tiny_broken_conv2"):
        agree, top1 = results[(candidate, "fc")], results[(candidate, "accuracy-top1")]
        assert agree["kind"] == "agreement" and agree["fp32"] == 1.0
        assert agree["int8"] == pytest.approx(top1["int8"])
    assert not results[("tiny_broken_conv2", "fc")]["passed"]


def test_config_file_with_several_models(tiny, tmp_path, monkeypatch):
    tmp, prototxt, caffemodel, quantized = tiny
    broken = _broken(tiny)
    monkeypatch.setenv("GATE_TEST_DIR", str(tmp))
    config = {"iterations": int(ITERS), "threshold": 0.15, "models": [
        {"name": "good", "model": "${GATE_TEST_DIR}/tiny.prototxt",
         "weights": str(caffemodel), "int8": [str(quantized)]},
        {"name": "bad", "model": str(prototxt), "weights": str(caffemodel),
         "int8": [{"name": "broken", "prototxt": str(broken)}],
         "metrics": [{"blob": "accuracy-top1"}, {"blob": "accuracy-top2", "threshold": "100%"}]},
    ]}
    path = tmp_path / "nightly.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "r.json"
    assert gate("--config", path, "--quiet", "--json", out) == 1
    results = json.loads(out.read_text())["results"]
    assert [(r["model"], r["candidate"], r["metric"], r["passed"]) for r in results] == [
        ("good", "tiny_q", "accuracy-top1", True), ("good", "tiny_q", "accuracy-top2", True),
        ("bad", "broken", "accuracy-top1", False), ("bad", "broken", "accuracy-top2", True)]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"models": []}', "lists no model"),
    ('{"models": [{"model": "nope.prototxt"}]}', "FP32 prototxt not found"),
    ('{"modles": []}', "unknown key"),
    ('{"models": [{"model": "M", "weights": "W", "int8": "Q", "metrics": '
     '[{"blob": "accuracy-top1", "threshold": "abc"}]}]}', "not a number"),
    ('{"models": [{"model": "M", "weights": "W", "int8": "Q", "metrics": '
     '["no-such-blob"]}]}', "no such blob"),
    ('{"models": [{"model": "M", "weights": "W", "int8": "M"}]}', "no layer carries"),
    ('{"models": [{"model": "${GATE_UNSET_VARIABLE}/x", "weights": "W", "int8": "Q"}]}',
     "GATE_UNSET_VARIABLE is not set"),
])
def test_bad_config_exits_2_with_one_line(tiny, tmp_path, capsys, content, message):
    _, prototxt, caffemodel, quantized = tiny
    content = (content.replace('"M"', json.dumps(str(prototxt)))
               .replace('"W"', json.dumps(str(caffemodel)))
               .replace('"Q"', json.dumps(str(quantized))))
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert gate("--config", path, "--quiet") == 2
    err = capsys.readouterr()
    lines = [l for l in (err.out + err.err).splitlines() if "error" in l]
    assert len(lines) == 1 and message in lines[0], lines


def test_bad_command_lines_exit_2(tiny, tmp_path, capsys):
    _, prototxt, caffemodel, quantized = tiny
    assert gate("-m", prototxt, "-w", caffemodel) == 2                  # no INT8 prototxt
    assert gate("-m", prototxt, "-w", caffemodel, quantized, "-l", "x") == 2
    assert gate("-m", prototxt, "-w", caffemodel, prototxt) == 2        # not quantized
    assert gate("-m", prototxt, "-w", caffemodel, quantized, "--baseline",
                tmp_path / "missing.json") == 2
    other = tmp_path / "other.prototxt"  # a different network
    other.write_text(quantized.read_text().replace('name: "conv3"', 'name: "conv3x"'))
    capsys.readouterr()
    assert gate("-m", prototxt, "-w", caffemodel, other) == 2
    captured = capsys.readouterr()
    assert "not the INT8 form" in captured.out + captured.err


def test_yaml_config_needs_pyyaml(tiny, tmp_path, capsys):
    path = tmp_path / "nightly.yaml"
    path.write_text("models: []\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        assert gate("--config", path) == 2
        captured = capsys.readouterr()
        assert "PyYAML" in captured.out + captured.err
    else:
        _, prototxt, caffemodel, quantized = tiny
        path.write_text(f"models:\n  - model: {prototxt}\n    weights: {caffemodel}\n"
                        f"    int8: [{quantized}]\n    iterations: {ITERS}\n"
                        f"    threshold: 0.15\n")
        assert gate("--config", path, "--quiet") == 0


# -- a real detector: res10 SSD's mAP on the pseudo-labelled faces -------------------------

@pytest.mark.slow
def test_res10_detection_map_gate(shared, tmp_path):
    """The deploy detector wrapped with the --det-list data and DetectionEvaluate layers,
    FP32 and INT8 alike; the metric is the mAP over all batches."""
    model = shared / "models/res10_ssd"
    faces = shared / "data/faces-pseudo"
    weights = model / "res10_300x300_ssd_iter_140000.caffemodel"
    quantized = tmp_path / "res10_q.prototxt"
    assert main(["-m", str(model / "deploy.prototxt"), "-w", str(weights), "-q", "-s", "1",
                 "--images", str(faces / "images"), "--mean", "104", "177", "123",
                 "--batch-size", "8", "--quiet", "--output", str(quantized)]) == 0
    detection = ["--det-list", faces / "list.txt", "--labelmap", faces / "labelmap.prototxt",
                 "--name-size", faces / "name_size.txt", "--mean", "104", "177", "123",
                 "--size", "300", "300", "--batch-size", "8", "-i", "2", "--quiet"]
    out = tmp_path / "r.json"
    assert gate("-m", model / "deploy.prototxt", "-w", weights, quantized, *detection,
                "-l", "10%", "--json", out) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["metric"] == "detection_eval" and result["kind"] == "map"
    assert 0.5 < result["fp32"] <= 1.0 and abs(result["loss"]) <= 0.10
    # scale_in x 10 on a middle convolution: the mAP collapses and the gate says so
    text = quantized.read_text()
    start = text.index('name: "layer_256_1_conv1"')
    match = re.compile(r"scale_in: ([0-9.eE+-]+)").search(text, start)
    broken = tmp_path / "res10_broken.prototxt"
    broken.write_text(text[:match.start(1)] + repr(float(match.group(1)) * 10)
                      + text[match.end(1):])
    assert gate("-m", model / "deploy.prototxt", "-w", weights, broken, *detection,
                "-l", "10%", "--json", out) == 1
    (result,) = json.loads(out.read_text())["results"]
    assert not result["passed"] and result["loss"] > 0.10
