"""The main command's flow: load, evaluate FP32, calibrate, search, write. Each step lives in
its own package; this module only sequences them and reports."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from calibrator.errors import CalibratorError

EXIT_MET, EXIT_NOT_MET = 0, 1


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def default_metric_blob(test_param, detection: bool) -> str:
    """Intel's rule: the top of the Accuracy layer with the smallest top_k (the
    DetectionEvaluate top for detection)."""
    if detection:
        for layer in test_param.layer:
            if layer.type == "DetectionEvaluate":
                return layer.top[0]
        raise CalibratorError("-d 1: the TEST net has no DetectionEvaluate layer")
    from calibrator.search.metric import primary_accuracy_layer

    layer = primary_accuracy_layer(test_param.layer)
    if layer is None:
        raise CalibratorError("the TEST net has no Accuracy layer: name the metric blob with -n")
    return layer.top[0]


def output_paths(args) -> dict[str, Path]:
    from calibrator.writers import quantized_prototxt_path

    paths = {"prototxt": Path(args.output) if args.output
             else quantized_prototxt_path(args.model)}
    if args.table:
        paths["table"] = Path(args.table)
    if args.json:
        paths["json"] = Path(args.json)
    for name, path in paths.items():
        if path.resolve() in (Path(args.model).resolve(), Path(args.weights).resolve()):
            raise CalibratorError(f"{path}: the {name} output would overwrite an input")
    return paths


def write_outputs(args, model, calibration, plan, paths, extra_record=None) -> None:
    from calibrator.writers import write_json, write_quantized_prototxt, write_table
    from calibrator.writers.outputs import plan_record

    write_quantized_prototxt(paths["prototxt"], model.net_param, plan,
                             source_dir=Path(args.model).parent)
    if "table" in paths:
        write_table(paths["table"], plan, calibration.fused)
    if "json" in paths:
        record = plan_record(plan, calibration.fused, calibration.stats)
        record.update(extra_record or {})
        write_json(paths["json"], record)


def write_performance_model(args, model) -> Path:
    """-p: every conv but the first at scale 1.0, for speed measurements only."""
    from calibrator.caffe.prototxt import write_net
    from calibrator.quant.fusion import analyze
    from calibrator.quant.params import annotate
    from calibrator.quant.scales import LayerQuant, QuantPlan, QuantOptions, eligible_units
    from calibrator.writers import quantized_prototxt_path

    options = QuantOptions()
    fused = analyze(model.net)
    layers = {}
    for unit in eligible_units(fused, options):
        channels = unit.layer.module.weight_bias()[0].shape[0]
        layers[unit.name] = LayerQuant(unit.name, 1.0, 1.0, [1.0] * channels, True, True, True)
    path = quantized_prototxt_path(args.model, "_dummy")
    write_net(path, annotate(model.net_param, QuantPlan(layers, options, {})))
    return path


def run_calibration(args, options) -> int:
    from calibrator.cli.common import detection_list_options, image_folder_options
    from calibrator.model import load_model, select_device
    from calibrator.quant.calibrate import calibrate

    started = time.time()
    model = load_model(args.model, args.weights, images=image_folder_options(args),
                       detection_list=detection_list_options(args),
                       device=select_device(args.gpu))
    if args.performance_model:
        path = write_performance_model(args, model)
        print(f"performance-only prototxt written: {path}")
        return EXIT_MET
    paths = output_paths(args)
    metric = None
    if not args.quantize_model and args.metric == "agreement":
        metric = "agreement"
    elif not args.quantize_model:
        metric = args.blob_name or default_metric_blob(model.test_param, bool(args.detection))
        if metric not in model.net.output_names and metric not in model.net.blob_shapes:
            raise CalibratorError(f"-n {metric}: no such blob in the TEST net")
    _say(args, f"calibrating {len(model.test_param.layer)} layers on {args.sampling_iterations}"
               f" batches of {model.batch_size} ({options.estimator})")
    forced = _forced_fix(args)
    calibration = calibrate(model, options, args.sampling_iterations, quiet=args.quiet)
    plan = calibration.plan()
    if args.quantize_model:
        plan = _forced_fix_plan(args, calibration, plan, forced)
        write_outputs(args, model, calibration, plan, paths)
        export_onnx_if_asked(args, model, calibration, plan)
        print(f"quantized prototxt written: {paths['prototxt']} "
              f"({len(plan.layers)} INT8 layers, {time.time() - started:.1f} s)")
        return EXIT_MET
    result, evaluator = _search(args, model, calibration, metric, paths)
    plan = result.best_plan
    loss = fp32_loss(result.fp32_metric, result.best_metric, args.relative)
    actions = _actions(result)
    summary = {"metric": metric, "fp32": result.fp32_metric, "int8": result.best_metric,
               "loss": loss, "tolerance": args.accuracy_loss,
               "relative": bool(args.relative), "met": result.met,
               "strategy": args.strategy, "fp32_layers": result.reverted,
               "target": args.target, "runtime": args.runtime,
               "saturating_layers": result.saturating,
               "full_evaluations": result.evaluations,
               "int8_layers": len(plan.layers)}
    write_outputs(args, model, calibration, plan, paths,
                  {"search": {**summary, "sensitivity": result.sensitivity,
                              "trace": [[s.action, s.metric] for s in result.trace]}})
    export_onnx_if_asked(args, model, calibration, plan)
    if not args.quiet:
        from calibrator.report import layer_table, trace_table

        print(layer_table(calibration.fused, plan, result.sensitivity, actions))
        print()
        print(trace_table(result.trace))
        print()
    if args.report:
        from calibrator.report import write_report

        write_report(args.report, fused=calibration.fused, plan=plan, stats=calibration.stats,
                     result=result, summary={**summary,
                                             "wall_seconds": round(time.time() - started, 1)},
                     actions=actions)
    if result.stopped_by is None:
        evaluator.state.discard()  # finished: nothing to resume
    else:
        _say(args, f"search state kept for --resume: {evaluator.state.path}")
    verdict = "met" if result.met else "NOT met (best configuration written)"
    if result.stopped_by:
        verdict += f"; search stopped by --{result.stopped_by}"
    print(f"{metric}: FP32 {result.fp32_metric:.6g}, INT8 {result.best_metric:.6g}, "
          f"loss {loss:.6g}, tolerance -l {args.accuracy_loss:g} {verdict}")
    print(f"reverted to FP32: {', '.join(result.reverted) if result.reverted else 'none'}; "
          f"{result.evaluations} full evaluations; {time.time() - started:.1f} s")
    print(f"quantized prototxt written: {paths['prototxt']}")
    return EXIT_MET if result.met else EXIT_NOT_MET


def _forced_fix(args):
    """(fix, Target) for --saturation-fix w7/half/s8 on a target that saturates; None for
    auto/off, or (with a warning) for a target that never saturates."""
    fix = getattr(args, "saturation_fix", "auto")
    if fix in ("auto", "off"):
        return None
    from calibrator.quant.targets import get_target

    target = get_target(args.target)
    if target.exact:
        print(f"warning: --saturation-fix {fix} ignored: --target {target.name} never "
              "saturates", file=sys.stderr, flush=True)
        return None
    return fix, target


def _forced_fix_plan(args, calibration, plan, forced):
    """-q with a forced fix: that fix on every layer that can saturate on the target (the
    search applies it the same way)."""
    if forced is None:
        return plan
    from calibrator.search.countermeasures import forced_choices

    fix, target = forced
    choices = forced_choices(calibration.fused, plan, target, fix)
    _say(args, f"--saturation-fix {fix} on {len(choices)} layer(s) that can saturate on "
               f"{target.name}")
    return calibration.plan(choices)


def export_onnx_if_asked(args, model, calibration, plan) -> None:
    if getattr(args, "export_onnx", None):
        from calibrator.verify.onnx_export import export_onnx

        export_onnx(model, calibration.fused, plan, args.export_onnx)
        print(f"ONNX model written: {args.export_onnx}")


def fp32_loss(fp32: float, int8: float, relative: bool) -> float:
    drop = fp32 - int8
    return drop / abs(fp32) if relative and fp32 else drop


def _actions(result) -> dict[str, str]:
    actions = {a.layer: a.action for a in result.adjustments}
    for name in result.reverted:
        actions[name] = (actions[name] + "; " if name in actions else "") + "reverted to FP32"
    return actions


def _search(args, model, calibration, metric_blob, paths):
    from calibrator.search.evaluator import Evaluator, SearchState
    from calibrator.search.loop import Search, SearchSettings
    from calibrator.search.metric import make_metric

    state_path = Path(str(paths["prototxt"]) + ".search.json")
    inputs = {"model": str(Path(args.model).resolve()),
              "weights": str(Path(args.weights).resolve()),
              "iterations": args.iterations, "metric": metric_blob,
              "sampling_iterations": args.sampling_iterations,
              "options": repr(calibration.options), "target": args.target,
              "saturation_fix": args.saturation_fix, "runtime": args.runtime}
    if args.resume and state_path.exists():
        state = SearchState.load(state_path, inputs)
        _say(args, f"resuming: {len(state.evaluations)} evaluations recalled from {state_path}")
    else:
        if args.resume:
            _say(args, f"--resume: no saved search at {state_path}; starting afresh")
        state = SearchState(state_path, inputs)
    if args.metric == "agreement":
        from calibrator.search.agreement import make_agreement_metric

        metric = make_agreement_metric(model.net, args.blob_name or None)
    else:
        metric = make_metric(model.net, metric_blob)
    evaluator = Evaluator(model, metric, args.iterations, state, quiet=args.quiet)
    settings = SearchSettings(tolerance=args.accuracy_loss, relative=args.relative,
                              strategy=args.strategy, max_evals=args.max_evals,
                              time_budget=args.time_budget, scale_search=bool(args.scale_search),
                              allow_fp32=bool(args.use_fp32_fallback),
                              probe_images=args.probe_images, target=args.target,
                              saturation_fix=args.saturation_fix, runtime=args.runtime)
    search = Search(model, calibration, evaluator, settings, say=lambda m: _say(args, m))
    return search.run(), evaluator
