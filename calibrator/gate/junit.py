"""``--junit FILE``: the gate's verdicts as JUnit XML, the format CI servers read.

Layout (valid against the common junit-4 schema that Jenkins, GitLab and others accept;
testcases carry only their ``<failure>`` and each suite its ``<properties>``,
``<system-out>`` and ``<system-err>``, as Ant's stricter JUnit.xsd also wants)::

    <testsuites name="calibrator gate" tests= failures= errors="0" time=>
      <testsuite name="MODEL/INT8" tests= failures= errors="0" skipped="0" time= timestamp=
                 hostname= id= package="calibrator.gate">
        <properties><property name= value=/>...</properties>
        <testcase classname="MODEL.INT8" name="METRIC" time=>
          <failure message= type="AccuracyDrop">details</failure>   (only when it failed)
        </testcase>
        <system-out>per metric: FP32 ..., INT8 ..., drop ...</system-out>
        <system-err/>
      </testsuite>
    </testsuites>

One testsuite per model x INT8 prototxt, one testcase per metric, one ``<failure>`` per
failing testcase (its text lists every reason: threshold and/or baseline). Times are
seconds: a suite's time is its INT8 pass plus an equal share of its model's FP32 pass,
split evenly between its testcases.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from calibrator.fileio import atomic_write
from calibrator.gate.run import GateResult

PACKAGE = "calibrator.gate"


def _seconds(value: float) -> str:
    return f"{max(value, 0.0):.3f}"


def _failure_type(case) -> str:
    threshold = any("threshold" in f for f in case.failures)
    baseline = any("baseline" in f for f in case.failures)
    if threshold and baseline:
        return "AccuracyDropAndRegression"
    return "BaselineRegression" if baseline else "AccuracyDrop"


def build_junit(result: GateResult) -> ET.Element:
    hostname = socket.gethostname() or "localhost"
    timestamp = result.timestamp[:19]  # xs:dateTime without the zone, as junit-4 wants
    root = ET.Element("testsuites", name="calibrator gate")
    total_tests = total_failures = 0
    total_time = 0.0
    suite_id = 0
    for model in result.models:
        fp32_share = model.fp32_seconds / max(len(model.candidates), 1)
        for candidate in model.candidates:
            cases = candidate.cases
            suite_time = fp32_share + candidate.seconds
            suite = ET.SubElement(root, "testsuite", name=f"{model.name}/{candidate.name}",
                                  tests=str(len(cases)), failures=str(candidate.failures),
                                  errors="0", skipped="0", time=_seconds(suite_time),
                                  timestamp=timestamp, hostname=hostname, id=str(suite_id),
                                  package=PACKAGE)
            suite_id += 1
            properties = ET.SubElement(suite, "properties")
            for name, value in (("fp32_prototxt", model.model), ("weights", model.weights),
                                ("int8_prototxt", candidate.prototxt),
                                ("int8_layers", candidate.int8_layers),
                                ("iterations", model.iterations),
                                ("batch_size", model.batch_size)):
                ET.SubElement(properties, "property", name=name, value=str(value))
            for case in cases:
                element = ET.SubElement(suite, "testcase", classname=f"{model.name}."
                                        f"{candidate.name}", name=case.metric,
                                        time=_seconds(suite_time / max(len(cases), 1)))
                if not case.passed:
                    failure = ET.SubElement(element, "failure", message=case.failures[0],
                                            type=_failure_type(case))
                    failure.text = "\n".join(case.failures)
            ET.SubElement(suite, "system-out").text = "\n".join(_summary(c) for c in cases)
            ET.SubElement(suite, "system-err")
            total_tests += len(cases)
            total_failures += candidate.failures
            total_time += suite_time
    root.set("tests", str(total_tests))
    root.set("failures", str(total_failures))
    root.set("errors", "0")
    root.set("time", _seconds(total_time))
    return root


def _summary(case) -> str:
    threshold = f"{case.threshold * 100:g}% relative" if case.relative else f"{case.threshold:g}"
    text = (f"{case.metric} ({case.kind}): FP32 {case.fp32:.6g}, INT8 {case.int8:.6g}, "
            f"drop {case.drop:.6g}, threshold {threshold}")
    if case.baseline is not None:
        text += f", baseline INT8 {case.baseline:.6g}"
    return text + (", passed" if case.passed else ", FAILED")


def write_junit(path: str | Path, result: GateResult) -> Path:
    root = build_junit(result)
    ET.indent(root)
    data = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return atomic_write(path, data + b"\n")
