"""``calibrator verify``: the quantized net on ONNX Runtime's real INT8 CPU kernels, side by
side with the simulation for each target."""

from __future__ import annotations

import argparse
import json
import sys

from calibrator.cli.common import (add_device_options, add_image_folder_options,
                                   add_model_options, image_folder_options)
from calibrator.cli.parsing import EXIT_CODES
from calibrator.errors import CalibratorError
from calibrator.export.qdq import build_onnx, export_onnx
from calibrator.fileio import atomic_write
from calibrator.model import load_model, quantized_plan, select_device
from calibrator.outputs import OutputPlan, data_inputs
from calibrator.quant import targets
from calibrator.quant.simulate import Int8Simulator
from calibrator.quant.targets import COUNTERMEASURES, target_names
from calibrator.verify.ncnn import format_ncnn_report, verify_ncnn
from calibrator.verify.run import format_report, result_record, score_blob, verify

DEFAULT_TARGETS = "vnni,avx2"
DEFAULT_FIX_TARGET = "avx2"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", help="run the quantized net on ONNX Runtime's INT8 kernels and compare "
                       "with the simulation",
        description="Export a quantized prototxt (layers carrying quantization_param) as an "
                    "ONNX QDQ model with exactly its scales, run it with ONNX Runtime's CPU "
                    "kernels on N TEST batches and print, side by side, the metric of the "
                    "simulation for each target, of ORT, and their top-1 agreement.")
    parser.epilog = EXIT_CODES
    add_model_options(parser, "quantized network with a TEST data layer (or --images)")
    parser.add_argument("-i", "--iterations", type=int, default=10, metavar="N",
                        help="TEST batches (default 10)")
    parser.add_argument("--runtime", choices=("ort", "ncnn"), default="ort",
                        help="the real kernels: ort (ONNX Runtime, the exported QDQ model) or "
                             "ncnn (the ncnn model --ncnn writes, through the ncnn package)")
    parser.add_argument("--ncnn", metavar="OUT_PREFIX",
                        help="with --runtime ncnn: keep the ncnn model as OUT_PREFIX.param/.bin")
    parser.add_argument("--targets", default=DEFAULT_TARGETS, metavar="LIST",
                        help=f"simulation targets, comma-separated ({', '.join(target_names())}; "
                             "default vnni,avx2)")
    parser.add_argument("--export-onnx", metavar="FILE", help="also write the ONNX model")
    parser.add_argument("--ort-command", metavar="PREFIX",
                        help="run ONNX Runtime through this command prefix, e.g. "
                             "'qemu-x86_64 -cpu Haswell' for an AVX2 CPU without VNNI")
    parser.add_argument("--threads", type=int, metavar="N", help="ORT intra-op threads")
    parser.add_argument("--layers", type=int, default=0, metavar="IMAGES",
                        help="per-layer output differences on this many images (0: off)")
    parser.add_argument("--speed", action="store_true",
                        help="time ORT INT8 against the FP32 ONNX model (one batch)")
    parser.add_argument("--residual", choices=("requant", "float"), default="requant",
                        help="convs that absorbed an Eltwise SUM: quantize the conv output "
                             "before the add so ORT runs a QLinearConv (requant), or keep "
                             "the simulation's float add (float: the conv runs in FP32)")
    parser.add_argument("--countermeasure", choices=tuple(COUNTERMEASURES), metavar="FIX",
                        help="apply a saturation counter-measure to the layers that can "
                             f"saturate on --fix-target ({', '.join(COUNTERMEASURES)})")
    parser.add_argument("--fix-target", default=DEFAULT_FIX_TARGET, metavar="TARGET",
                        help="target whose saturating layers --countermeasure changes")
    parser.add_argument("--all-int8", action="store_true",
                        help="targets simulate Intel's fused INT8 kernels (every quantized "
                             "layer INT8, residual added before the one float64 "
                             "requantization) rather than the graph ORT runs (its float32 "
                             "requantization, QLinearAdd, float convs)")
    parser.add_argument("--no-fp32", action="store_true", help="skip the FP32 run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    add_device_options(parser)
    add_image_folder_options(parser)
    parser.set_defaults(run=run)


def _refuse_unused(args: argparse.Namespace) -> None:
    """An option the chosen --runtime never reads: one line, not a silent no-op."""
    if args.runtime == "ncnn":
        ort_only = [option for option, given in (
            ("--targets", args.targets != DEFAULT_TARGETS),
            ("--export-onnx", args.export_onnx), ("--ort-command", args.ort_command),
            ("--threads", args.threads is not None), ("--speed", args.speed),
            ("--residual", args.residual != "requant"),
            ("--countermeasure", args.countermeasure), ("--all-int8", args.all_int8),
            ("--no-fp32", args.no_fp32)) if given]
        if ort_only:
            raise CalibratorError(f"{ort_only[0]} applies to --runtime ort (the ncnn check "
                                  "compares the ncnn model with the ncnn simulation)")
    elif args.ncnn:
        raise CalibratorError("--ncnn applies only with --runtime ncnn")
    if args.fix_target != DEFAULT_FIX_TARGET and not args.countermeasure:
        raise CalibratorError("--fix-target applies only with --countermeasure")


def run(args: argparse.Namespace) -> int:
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    for name in names:
        try:
            targets.get_target(name)
        except ValueError as exc:
            raise CalibratorError(f"--targets: {exc}") from None
    for option, value, least in (("-i/--iterations", args.iterations, 1),
                                 ("--threads", args.threads, 1), ("--layers", args.layers, 0)):
        if value is not None and value < least:
            raise CalibratorError(f"{option} must be at least {least}, got {value}")
    _refuse_unused(args)
    outputs = OutputPlan()
    for label, path in (("--export-onnx", args.export_onnx), ("--json", args.json)):
        if path:
            outputs.file(label, path)
    outputs.check([args.model, args.weights])
    model = load_model(args.model, args.weights, images=image_folder_options(args),
                       device=select_device(args.gpu))
    outputs.check_inputs(data_inputs(model))
    quantized = quantized_plan(model.net)
    if quantized is None:
        raise CalibratorError(f"{args.model}: no layer carries quantization_param (quantize "
                              "it first: calibrator -m ... -w ... -q)")
    fused, plan = quantized
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.runtime == "ncnn":
        return _verify_ncnn(args, model, fused, plan, say)
    if args.countermeasure:
        sim = Int8Simulator(fused, plan)
        affected = targets.saturating_layers(sim, args.fix_target)
        for name in affected:
            targets.apply_countermeasure(plan.layers[name], args.countermeasure)
        say(f"--countermeasure {args.countermeasure}: {len(affected)} of {len(plan.layers)} "
            f"layers can saturate on {args.fix_target}")
    export = None
    if args.export_onnx:
        export = export_onnx(model, fused, plan, args.export_onnx, residual=args.residual)
        say(f"ONNX model written: {args.export_onnx}")
    else:
        export = build_onnx(model.net, fused, plan, residual=args.residual)
    result = verify(model, fused, plan, iterations=args.iterations, target_names=names,
                    ort_command=args.ort_command, layer_images=args.layers, speed=args.speed,
                    residual=args.residual, fp32=not args.no_fp32, threads=args.threads,
                    quiet=args.quiet, say=say, export=export, as_exported=not args.all_int8)
    print(format_report(result))
    if args.json:
        atomic_write(args.json, json.dumps(result_record(result), indent=1).encode())
    return 0


def _verify_ncnn(args, model, fused, plan, say) -> int:
    try:
        import ncnn  # noqa: F401  (optional: the ncnn extra)
    except ImportError:
        raise CalibratorError("verify --runtime ncnn needs the ncnn package: pip install "
                              "ncnn") from None
    blob = score_blob(model.test_param)
    if blob is None:
        raise CalibratorError(f"{args.model}: verify --runtime ncnn compares the scores under "
                              "an Accuracy layer, and the TEST net has none")
    result = verify_ncnn(model, fused, plan, blob, iterations=args.iterations,
                         layer_images=args.layers, prefix=args.ncnn, quiet=args.quiet, say=say)
    print(format_ncnn_report(result))
    if args.json:
        atomic_write(args.json, json.dumps({
            "runtime": "ncnn", "score_blob": result.score_blob, "images": result.images,
            "top1": result.top1, "agreement": result.agreement,
            "score_diff": result.score_diff, "images_per_second": result.images_per_second,
            "layers": [vars(d) for d in result.layers]}, indent=1).encode())
    return 0

