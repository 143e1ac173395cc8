"""``calibrator gate``: the nightly accuracy gate (FP32 vs simulated INT8 on the same
batches, thresholds per metric, optional baseline; JSON, JUnit XML, history and plot)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from calibrator import distributed
from calibrator.cli.common import (add_ap_version_option, add_backend_options,
                                   add_detection_list_options, add_device_options,
                                   add_image_folder_options, detection_list_options,
                                   given_detection_list_options, given_feed_options,
                                   image_folder_options)
from calibrator.cli.parsing import EXIT_CODES
from calibrator.errors import CalibratorError
from calibrator.fileio import atomic_write, input_file
from calibrator.gate.config import (DEFAULT_ITERATIONS, Candidate, GateConfig, ModelSpec,
                                    candidate_name, parse_metric_arg, parse_threshold,
                                    read_config)
from calibrator.gate.history import append_history, plot_history, read_history
from calibrator.gate.junit import write_junit
from calibrator.gate.run import run_gate
from calibrator.model import select_device
from calibrator.outputs import OutputPlan, data_inputs, option_inputs

EXIT_PASS, EXIT_FAIL = 0, 1

DESCRIPTION = """\
Evaluate an FP32 model and one or more INT8 prototxts (quantization_param, as written by
`calibrator -q` or Intel's calibrator) on the same -i TEST batches, and fail when a metric
drops by more than its threshold. Exit code 0: every check passed; 1: a check failed;
2: bad input (one line on stderr).

Metrics: -n BLOB[=LOSS[%]] (repeat for several; default: every Accuracy and
DetectionEvaluate top, with -l). An Accuracy top or any other blob is averaged over the
batches as `caffe test` does; a DetectionEvaluate top gives the mAP over all batches
(--ap-version, default 11point); --agreement SCORES compares INT8 top-1 with FP32 top-1 per
sample (label-free).
LOSS is absolute (0.01 = one point) or relative to FP32 with a % suffix or --relative.

Each INT8 prototxt runs as the runtime and target it was made for (`calibrator` records them
in the file when they are not intel/vnni), unless --runtime/--target say otherwise.

Deploy nets: --images DIR feeds the Input from a folder; --det-list LIST --labelmap
PROTOTXT [--name-size FILE] scores a deploy detector (DetectionOutput) on 'IMAGE XML'
lines (its mAP, top detection_eval), preprocessing from --mean/--norm/--size.

Several models: --config FILE, a JSON file (YAML too when PyYAML is installed; it is not
a dependency: pip install pyyaml) listing models, their INT8 prototxts, metrics and
thresholds; see calibrator/gate/config.py or models/gate/nightly.json."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "gate", help="accuracy gate: fail when INT8 drops more than a threshold vs FP32",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.epilog = EXIT_CODES
    what = parser.add_argument_group("what to check (command line form)")
    what.add_argument("int8", nargs="*", metavar="INT8_PROTOTXT",
                      help="quantized prototxt(s) of the -m network")
    what.add_argument("-m", "--model", metavar="PROTOTXT",
                      help="FP32 network with a TEST data layer (or --images)")
    what.add_argument("-w", "--weights", metavar="CAFFEMODEL",
                      help="FP32 weights (the INT8 prototxts run on them)")
    what.add_argument("--name", metavar="NAME",
                      help="model name in the results (default: the -m file's stem)")
    what.add_argument("-n", "--metric", action="append", default=[], metavar="BLOB[=LOSS]",
                      help="metric blob, optionally with its own threshold "
                           "(e.g. -n accuracy-top1=0.02 -n accuracy-top5=0.5%%)")
    what.add_argument("--agreement", action="append", default=[], metavar="SCORES[=LOSS]",
                      help="label-free metric: top-1 agreement of INT8 with FP32 on the "
                           "scores blob SCORES (e.g. fc7)")
    what.add_argument("-l", "--max-drop", default="0.01", metavar="LOSS",
                      help="default threshold: tolerated drop FP32 - INT8 (absolute; "
                           "1%% = relative); default 0.01")
    what.add_argument("--relative", action="store_true",
                      help="thresholds without %% are relative drops (drop / FP32)")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON (or YAML, with PyYAML) file listing several models")
    parser.add_argument("-i", "--iterations", type=int, metavar="N",
                        help="TEST batches per pass (default 10, or the config's)")
    base = parser.add_argument_group("baseline")
    base.add_argument("--baseline", metavar="PREVIOUS.json",
                      help="an earlier run's --json: also fail when INT8 got worse than "
                           "there by more than --baseline-margin")
    base.add_argument("--baseline-margin", default="0", metavar="M",
                      help="tolerated INT8 regression vs the baseline (absolute, or "
                           "relative with %%); default 0")
    out = parser.add_argument_group("outputs")
    out.add_argument("--json", metavar="FILE", help="write every result as JSON")
    out.add_argument("--junit", metavar="FILE",
                     help="write JUnit XML (a testcase per model x INT8 x metric)")
    out.add_argument("--history", metavar="FILE.jsonl",
                     help="append this run as one JSON line")
    out.add_argument("--plot", metavar="FILE.png",
                     help="draw the --history runs (or this run alone) as a trend PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    add_backend_options(parser, ", or what each INT8 prototxt records")
    add_ap_version_option(parser)
    add_device_options(parser)
    add_image_folder_options(parser)
    add_detection_list_options(parser)
    parser.set_defaults(run=run)


def build_config(args):
    """The GateConfig the arguments describe (command line form or --config)."""
    if args.iterations is not None and args.iterations < 1:
        raise CalibratorError(f"-i/--iterations must be at least 1, got {args.iterations}")
    if args.config:
        extra = [flag for flag, value in (("-m", args.model), ("-w", args.weights),
                                          ("INT8_PROTOTXT", args.int8), ("-n", args.metric),
                                          ("--agreement", args.agreement),
                                          ("--images", args.images), ("--name", args.name),
                                          ("--det-list", args.det_list))
                 if value] + given_feed_options(args) + given_detection_list_options(args)
        if extra:
            raise CalibratorError(f"--config lists the models: drop {', '.join(extra)} (or "
                                  "drop --config)")
        return read_config(args.config, iterations=args.iterations)
    missing = [flag for flag, value in (("-m", args.model), ("-w", args.weights),
                                        ("an INT8 prototxt", args.int8)) if not value]
    if missing:
        raise CalibratorError(f"gate needs {', '.join(missing)} (or --config FILE)")
    threshold, relative = parse_threshold(args.max_drop, "-l/--max-drop", args.relative)
    metrics = [parse_metric_arg(text, threshold, relative) for text in args.metric]
    metrics += [parse_metric_arg(text, threshold, relative, kind="agreement")
                for text in args.agreement]
    blobs = [m.blob for m in metrics]
    if len(set(blobs)) != len(blobs):
        raise CalibratorError("a metric blob is named twice (-n / --agreement)")
    model = Path(args.model)
    for path, what in [(model, "prototxt"), (Path(args.weights), "caffemodel")] + \
            [(Path(p), "prototxt") for p in args.int8]:
        input_file(path, what)
    candidates = [Candidate(candidate_name(Path(p)), Path(p)) for p in args.int8]
    names = [c.name for c in candidates]
    for i, c in enumerate(candidates):  # same file name in two folders: keep them apart
        if names.count(c.name) > 1:
            c.name = f"{c.name}#{i + 1}"
    spec = ModelSpec(args.name or candidate_name(model), model, Path(args.weights),
                     candidates, args.iterations or DEFAULT_ITERATIONS, metrics, threshold,
                     relative)
    spec.detection = detection_list_options(args)  # a deploy detector on a list
    if spec.detection is not None:
        for path, what in ((args.det_list, "list file"), (args.labelmap, "label map"),
                           (args.name_size, "name/size file")):
            if path:
                input_file(path, what)
    spec.images = image_folder_options(args)
    return GateConfig([spec])


def print_results(result) -> None:
    rows = []
    for case in result.cases:
        threshold = f"{case.threshold * 100:g}%" if case.relative else f"{case.threshold:g}"
        loss = f"{case.loss * 100:.3g}%" if case.relative else f"{case.loss:.4g}"
        rows.append([f"{case.model}/{case.candidate}", case.metric, f"{case.fp32:.6g}",
                     f"{case.int8:.6g}", loss, threshold,
                     "" if case.baseline is None else f"{case.baseline:.6g}",
                     "pass" if case.passed else "FAIL"])
    print(tabulate(rows, headers=["model/INT8", "metric", "FP32", "INT8", "drop",
                                  "threshold", "baseline", "verdict"]))


def output_plan(args, config) -> OutputPlan:
    """--json, --junit, --history and --plot checked before the gate runs (the history is
    read and appended: it may be an input of its own)."""
    outputs = OutputPlan()
    for label, path in (("--json", args.json), ("--junit", args.junit),
                        ("--history", args.history), ("--plot", args.plot)):
        if path:
            outputs.file(label, path)
    inputs = [args.config, args.baseline]
    for spec in config.models:
        inputs += [spec.model, spec.weights, *(c.prototxt for c in spec.candidates),
                   *option_inputs(spec.detection)]
    return outputs.check(inputs)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    outputs = output_plan(args, config)
    margin = parse_threshold(args.baseline_margin, "--baseline-margin")
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr,
                                                                 flush=True))
    result = run_gate(config, device=select_device(args.gpu), baseline=args.baseline,
                      baseline_margin=margin, quiet=args.quiet, runtime=args.runtime,
                      target=args.target, ap_version=args.ap_version, say=say,
                      on_load=lambda model: outputs.check_inputs(data_inputs(model)))
    print_results(result)
    if not distributed.is_main():  # under torchrun rank 0 alone writes
        return EXIT_FAIL if any(not c.passed for c in result.cases) else EXIT_PASS
    if args.json:
        atomic_write(args.json, json.dumps(result.to_json(), indent=1) + "\n")
    if args.junit:
        write_junit(args.junit, result)
    if args.history:
        append_history(args.history, result.history_record())
    if args.plot:
        runs = read_history(args.history) if args.history else [result.history_record()]
        plot_history(runs, args.plot)
    cases = result.cases
    failed = [c for c in cases if not c.passed]
    if failed:
        print(f"gate FAILED: {len(failed)} of {len(cases)} checks")
        for case in failed:
            for reason in case.failures:
                print(f"  {case.model}/{case.candidate}: {reason}")
        return EXIT_FAIL
    print(f"gate passed: {len(cases)} checks")
    return EXIT_PASS
