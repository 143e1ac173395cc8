"""The main command's flow: load, calibrate, search, write. Each step lives in its own
package; this module only sequences them and reports.

    config (RunConfig) -> model -> backend -> calibration -> [search] -> writers

``run(config)`` is the library entry point; it returns the exit code (0: -l met, 1: not met,
the best configuration written).

Under torchrun (:mod:`calibrator.distributed`) every rank runs this same sequence on its share
of the batches; rank 0 alone writes the outputs, the search state and the report."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from calibrator import distributed
from calibrator.backends import make_backend
from calibrator.caffe.types import not_in_intel_caffe
from calibrator.config import RunConfig
from calibrator.errors import CalibratorError, shorten
from calibrator.metrics import default_metric_blob, loss, make_metric, measure
from calibrator.model import load_model, quantized_plan, select_device, with_weights
from calibrator.outputs import OutputPlan, data_inputs, option_inputs
from calibrator.quant.calibrate import calibrate
from calibrator.quant.equalize import equalize
from calibrator.quant.force_u8 import check_force_u8, force_u8
from calibrator.quant.fusion import analyze
from calibrator.quant.layerwise import calibration_subset, layerwise
from calibrator.quant.scales import eligible_units, kept_fp32
from calibrator.report import (REPORT_FILES, layer_table, trace_table, unit_cosines,
                               write_report)
from calibrator.search import Evaluator, PrefixReuse, Search, SearchResult, SearchState
from calibrator.search.adjust import ESTIMATORS as ADJUST_ESTIMATORS
from calibrator.search.countermeasures import forced_choices
from calibrator.writers import (OutputContext, force_u8_paths, get_writer,
                                quantized_prototxt_path, writers)

EXIT_MET, EXIT_NOT_MET = 0, 1
log = logging.getLogger(__name__)


class Pipeline:
    """One run of ``config``; ``say`` prints progress notes (stderr unless quiet)."""

    def __init__(self, config: RunConfig, say=None):
        self.config = config
        self.started = time.time()
        self.equalization = None    # --equalize: what it did (calibrator.quant.equalize)
        self.say = say or ((lambda m: None) if config.quiet or not distributed.is_main() else
                           (lambda m: print(m, file=sys.stderr, flush=True)))

    # -- steps -------------------------------------------------------------------------------
    def output_paths(self) -> dict[str, Path]:
        """Every output file by writer name, the prototxt's default filled in, each checked
        before any work (calibrator.outputs): writable, not a folder, not an input given on
        the command line, no two the same. ``check_data_files`` later checks them against
        the files the loaded net reads."""
        config = self.config
        plan = OutputPlan()
        if config.performance_only:
            others = [get_writer(name).option or name for name in config.outputs
                      if name != "prototxt"] + (["--report"] if config.report else [])
            if others:
                raise CalibratorError(f"-p writes only the speed-measurement prototxt: drop "
                                      f"{', '.join(others)} (or drop -p)")
            paths = {"performance": config.outputs.get("prototxt")
                     or quantized_prototxt_path(config.model, "_dummy")}
            plan.file("-p", paths["performance"])
        else:
            paths = {"prototxt": config.outputs.get("prototxt")
                     or quantized_prototxt_path(config.model)}
            for writer in writers():
                if writer.name in config.outputs and writer.name != "prototxt":
                    paths[writer.name] = config.outputs[writer.name]
            if "force_u8" in paths and not config.quant.force_u8:
                raise CalibratorError("--force-u8-output needs -fu/--first_conv_force_u8")
            fu_caffemodel = None
            if config.quant.force_u8:
                paths["force_u8"], fu_caffemodel = force_u8_paths(
                    paths["prototxt"], config.weights, paths.get("force_u8"))
            for name, path in paths.items():
                writer = get_writer(name)
                plan.file("--output" if name == "prototxt" else writer.option or name, path)
            if fu_caffemodel is not None:
                plan.file("the -fu caffemodel", fu_caffemodel)
            if not config.quantize_only:
                plan.file("the search state", search_state_path(paths["prototxt"]))
            if config.report is not None:
                plan.folder("--report", config.report, REPORT_FILES.__contains__)
        plan.check(inputs=[config.model, config.weights,
                           *option_inputs(config.detection_list)])
        self.plan = plan
        return paths

    def check_data_files(self, model) -> None:
        """The outputs against every file the loaded net reads (image lists, images, mean
        files, LMDBs, label maps): before any batch is read."""
        self.plan.check_inputs(data_inputs(model))

    def write(self, paths: dict[str, Path], context: OutputContext) -> None:
        if not distributed.is_main():  # rank 0 alone writes
            return
        if context.record is not None:  # what every run's record says, -q or search
            if "weights" in paths:
                context.record["weights_out"] = str(paths["weights"])
            if self.equalization is not None:
                context.record["equalization"] = self.equalization.record()
        if "force_u8" in paths:  # the net was checked before calibrating; what the plan
            try:                   # decides (the first conv reverted to FP32) skips -fu only
                context.force_u8 = force_u8(context.model, context.fused, context.plan,
                                            context.plan.options.cascade_lake)
            except CalibratorError as exc:
                log.warning("%s; the -fu files are not written", exc)
                del paths["force_u8"]
        self.intel_warnings(paths["prototxt"], context)
        excluded = context.plan.excluded
        if excluded and context.backend is not None and context.backend.name == "intel":
            log.warning("%d layer(s) stay FP32 in the prototxt, because of Intel Caffe's "
                        "runtime (fused sums, BatchNorm on INT8): %s", len(excluded),
                        "; ".join(f"{name} ({why})" for name, why in excluded.items()))
        for name, path in paths.items():
            get_writer(name).write(path, context)
            if name == "weights":
                print(f"corrected weights written: {path} (use it with -w for test, gate and "
                      "verify)")
            elif name == "force_u8":
                fu = context.force_u8
                print(f"-fu: first conv '{fu.conv}' fed u8 by '{fu.data_layer}' (scale "
                      f"{fu.scale:.9g}, mean_value {' '.join(f'{m:.9g}' for m in fu.mean)}, "
                      f"pad {fu.pad}; weight scales {'halved' if fu.halved else 'kept (-clx)'})"
                      f": {path} with {force_u8_paths(path, self.config.weights, path)[1]}")
            elif name not in ("prototxt", "table", "json"):
                print(f"{name} output written: {path}")

    @staticmethod
    def intel_warnings(prototxt: Path, context: OutputContext) -> None:
        """One line each: layer types Intel Caffe does not have (the prototxt will not run
        there), and what Intel's fusion computes differently from the net."""
        missing = not_in_intel_caffe(context.model.test_param)
        if missing:
            listed = "; ".join(
                f"{kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                f"{f', {len(names)} layers' if len(names) > 3 else ''})"
                for kind, names in missing.items())
            log.warning("%s will not run in Intel Caffe 1.1.6, which has no %s; --table "
                        "(ncnn), --ncnn and --export-onnx (ONNX Runtime) write files for "
                        "runtimes that do", shorten(prototxt), listed)
        for note in context.fused.intel_notes:
            log.warning("Intel Caffe's fusion: %s", note)

    def metric(self, model):
        """The metric the search keeps within -l: by default the Accuracy (or, -d 1,
        DetectionEvaluate) top; ``-n`` must name one of those, unless --metric says how to
        score another blob (``mean``, ``agreement``)."""
        config = self.config
        blob = config.blob
        if not blob and config.metric in ("blob", "accuracy", "map"):
            blob = default_metric_blob(model.test_param, config.detection)
        metric = make_metric(model.net, blob, config.metric, ap_version=config.ap_version)
        if config.metric == "blob" and metric.kind == "mean":
            writers = model.net.writers(blob)
            producer = writers[-1] if writers else None
            what = (f"a top of {producer.type} layer '{shorten(producer.name)}'"
                    if producer is not None else "an input of the net")
            raise CalibratorError(
                f"-n {shorten(blob)}: {what}, not a metric: name the top of an Accuracy or "
                "DetectionEvaluate layer, or say how to score it with --metric agreement "
                "(top-1 agreement with FP32 on a scores blob) or --metric mean")
        return metric

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> int:
        config = self.config
        config.validate()
        paths = self.output_paths()
        device = select_device(config.gpu)
        model = load_model(config.model, config.weights, images=config.images,
                           detection_list=config.detection_list, device=device)
        self.check_data_files(model)
        backend = make_backend(config.runtime, config.target)
        if config.equalize:
            model = self.equalize(model)
        if config.performance_only:
            path = paths["performance"]
            if distributed.is_main():
                get_writer("performance").write(path, OutputContext(model, analyze(model.net),
                                                                    None))
            print(f"performance-only prototxt written: {path}")
            return EXIT_MET
        metric = None if config.quantize_only else self.metric(model)
        options = config.quant
        if options.force_u8:  # refuse before the long part
            check_force_u8(model, analyze(model.net, quantize_fc=options.quantize_fc))
        self.say(f"calibrating {len(model.test_param.layer)} layers on "
                 f"{config.sampling_iterations} batches of {model.batch_size} "
                 f"({options.estimator})")
        forced = self.forced_fix(backend)
        calibration = calibrate(model, options, config.sampling_iterations, quiet=config.quiet,
                                estimators=() if config.quantize_only else ADJUST_ESTIMATORS,
                                metric=metric, iterations=config.iterations,
                                single=config.sampling_single)
        self.warn_kept_fp32(calibration.fused)
        if config.quantize_only:
            choices = {}
            if forced is not None:
                choices = forced_choices(calibration.fused, calibration.plan(), backend.target,
                                         forced)
                self.say(f"--saturation-fix {forced} on {len(choices)} layer(s) that can "
                         f"saturate on {backend.target.name}")
            record, reports = {}, {}
            if config.easyquant or "weights" in paths:
                choices, reports = self.layerwise(model, calibration, choices,
                                                  easyquant=config.easyquant,
                                                  bias_correction="weights" in paths)
                record["layerwise"] = {name: vars(r) for name, r in reports.items()}
            plan = calibration.plan(choices)
            self.write(paths, OutputContext(model, calibration.fused, plan, calibration.stats,
                                            backend, record))
            print(f"quantized prototxt written: {paths['prototxt']} "
                  f"({len(plan.layers)} INT8 layers, {time.time() - self.started:.1f} s)")
            result = SearchResult(math.nan, plan, math.nan, False, layerwise=reports)
            self.report(model, calibration, plan, backend, result,
                        {"mode": "-q: quantized without measuring the metric",
                         "int8_layers": len(plan.layers), "runtime": backend.name,
                         "target": backend.target.name}, {})
            return EXIT_MET
        return self.search(model, backend, calibration, metric, paths)

    def report(self, model, calibration, plan, backend, result, summary: dict,
               actions: dict) -> None:
        """--report DIR: the layer table, the trace (a search's), the plots and the
        per-unit cosine of ``plan`` with FP32 on the probe images."""
        config = self.config
        if config.report is None or not distributed.is_main():
            return
        feeds = calibration_subset(model, config.search.probe_images)
        cosines = unit_cosines(model.net, calibration.fused,
                               backend.simulator(calibration.fused, plan).overrides, feeds)
        write_report(config.report, fused=calibration.fused, plan=plan,
                     stats=calibration.stats, result=result,
                     summary={**summary, "wall_seconds": round(time.time() - self.started, 1)},
                     actions=actions, cosines=cosines)
        print(f"report written: {config.report / 'report.md'} (plots beside it)")

    def equalize(self, model):
        """--equalize: the model on equalized weights (the ones --weights-out writes)."""
        config = self.config
        self.say(f"channel equalization: channel ranges on {config.sampling_iterations} "
                 f"batches of {model.batch_size}")
        self.equalization = equalize(model, config.sampling_iterations,
                                     config.quant.per_channel, quiet=config.quiet)
        groups = self.equalization.groups
        self.say(f"channel equalization: {len(groups)} tensor group(s), "
                 f"{sum(g.channels for g in groups)} channels rescaled")
        return with_weights(model, self.equalization.weights)

    def layerwise(self, model, calibration, choices: dict, *, easyquant: bool,
                  bias_correction: bool):
        settings = replace(self.config.search.layerwise, easyquant=easyquant,
                           bias_correction=bias_correction)
        what = " and ".join(part for part, on in (("EasyQuant", easyquant),
                                                   ("bias correction", bias_correction)) if on)
        self.say(f"{what} on {settings.images} calibration images")
        feeds = calibration_subset(model, settings.images)
        return layerwise(model.net, calibration.fused, calibration.stats, calibration.options,
                         choices, feeds, settings)

    def evaluate_force_u8(self, prototxt: Path, backend, metric, result) -> float:
        """The -fu model's metric, which Intel's tool never measured: the written prototxt
        and caffemodel loaded back and simulated on the same batches."""
        config = self.config
        weights = force_u8_paths(prototxt, config.weights, prototxt)[1]
        model = load_model(prototxt, weights, images=config.images,
                           detection_list=config.detection_list,
                           device=select_device(config.gpu))
        fused, plan = quantized_plan(model.net)
        overrides = backend.simulator(fused, plan).overrides
        outcomes = measure(model, [metric], config.iterations, overrides=overrides,
                           desc="evaluate -fu", quiet=config.quiet)
        value = metric.combine(outcomes[0])
        print(f"{metric.blob if metric.kind != 'agreement' else 'agreement'} of the -fu "
              f"model: {value:.6g} (the INT8 plan: {result.best_metric:.6g}, FP32 "
              f"{result.fp32_metric:.6g})")
        return value

    def warn_kept_fp32(self, fused) -> None:
        """Say which layers stay FP32 because their weights cannot be quantized."""
        kept = kept_fp32(fused)
        for unit in eligible_units(fused, self.config.quant, include_kept=True):
            if unit.name in kept:
                layer = unit.layer
                log.warning("layer '%s' (%s): %s; kept FP32", layer.name, layer.type,
                            kept[unit.name])

    def forced_fix(self, backend) -> str | None:
        """--saturation-fix w7/half/s8 on a target that saturates; None for auto/off, or
        (with a warning) for a target that never saturates."""
        fix = self.config.search.saturation_fix
        if fix in ("auto", "off"):
            return None
        if backend.target.exact:
            log.warning("--saturation-fix %s ignored: --target %s never saturates", fix,
                        backend.target.name)
            return None
        return fix

    def search(self, model, backend, calibration, metric, paths) -> int:
        config, settings = self.config, self.config.search
        metric_name = "agreement" if metric.kind == "agreement" else metric.blob
        state = self.search_state(paths["prototxt"], metric_name, calibration, backend)
        evaluator = Evaluator(model, metric, config.iterations, state, quiet=config.quiet,
                              reuse=PrefixReuse(calibration.fused, config.iterations,
                                                metric.outputs()))
        resumed = state.path.exists()
        try:
            result = Search(model, calibration, evaluator, settings, backend,
                            say=self.say).run()
        except CalibratorError:
            # bad input met half-way (an image the later steps read): nothing is left
            # behind; an interruption (not a CalibratorError) keeps the state for --resume
            if not resumed:
                state.discard()
            raise
        plan = result.best_plan
        value_loss = loss(result.fp32_metric, result.best_metric, settings.relative)
        actions = _actions(result)
        summary = {"metric": metric_name,
                   "fp32": result.fp32_metric, "int8": result.best_metric,
                   "loss": value_loss, "tolerance": settings.tolerance,
                   "relative": bool(settings.relative), "met": result.met,
                   "strategy": settings.strategy, "fp32_layers": result.reverted,
                   "target": backend.target.name, "runtime": backend.name,
                   "saturating_layers": result.saturating,
                   "full_evaluations": result.evaluations,
                   "int8_layers": len(plan.layers)}
        record = {"search": {**summary, "sensitivity": result.sensitivity,
                             "trace": [[s.action, s.metric] for s in result.trace],
                             "stopped_early": {s.action: s.batches for s in result.trace
                                               if s.partial}}}
        if result.layerwise:
            record["layerwise"] = {name: vars(r) for name, r in result.layerwise.items()}
        self.write(paths, OutputContext(model, calibration.fused, plan, calibration.stats,
                                        backend, record))
        if "force_u8" in paths:
            self.evaluate_force_u8(paths["force_u8"], backend, metric, result)
        if not config.quiet:
            print(layer_table(calibration.fused, plan, result.sensitivity, actions,
                              result.layerwise))
            print()
            print(trace_table(result.trace))
            print()
        self.report(model, calibration, plan, backend, result, summary, actions)
        if result.stopped_by is None:
            state.discard()  # finished: nothing to resume
        else:
            self.say(f"search state kept for --resume: {state.path}")
        verdict = "met" if result.met else "NOT met (best configuration written)"
        if result.stopped_by:
            verdict += f"; search stopped by --{result.stopped_by}"
        print(f"{summary['metric']}: FP32 {result.fp32_metric:.6g}, INT8 "
              f"{result.best_metric:.6g}, loss {value_loss:.6g}, tolerance -l "
              f"{settings.tolerance:g} {verdict}")
        print(f"reverted to FP32: {', '.join(result.reverted) if result.reverted else 'none'};"
              f" {result.evaluations} full evaluations; {time.time() - self.started:.1f} s")
        print(f"quantized prototxt written: {paths['prototxt']}")
        return EXIT_MET if result.met else EXIT_NOT_MET

    def search_state(self, prototxt: Path, metric_blob: str, calibration, backend
                     ) -> SearchState:
        config = self.config
        state_path = search_state_path(prototxt)
        inputs = {"model": str(config.model.resolve()),
                  "weights": str(config.weights.resolve()),
                  "iterations": config.iterations, "metric": metric_blob,
                  "sampling_iterations": config.sampling_iterations,
                  "sampling_single": config.sampling_single,
                  "options": repr(calibration.options), "target": backend.target.name,
                  "saturation_fix": config.search.saturation_fix, "runtime": backend.name}
        if not config.resume:
            return SearchState(state_path, inputs)
        # rank 0 reads the state beside the outputs; every rank resumes from it
        evaluations = distributed.on_main(
            lambda: SearchState.load(state_path, inputs).evaluations if state_path.exists()
            else None)
        if evaluations is None:
            self.say(f"--resume: no saved search at {state_path}; starting afresh")
            return SearchState(state_path, inputs)
        self.say(f"resuming: {len(evaluations)} evaluations recalled from {state_path}")
        return SearchState(state_path, inputs, evaluations)


def search_state_path(prototxt) -> Path:
    """Where the search keeps what --resume needs: beside the output prototxt."""
    return Path(str(prototxt) + ".search.json")


def _actions(result) -> dict[str, str]:
    actions = {a.layer: a.action for a in result.adjustments}
    for name in result.reverted:
        actions[name] = (actions[name] + "; " if name in actions else "") + "reverted to FP32"
    return actions


def run(config: RunConfig, say=None) -> int:
    """Calibrate (and search) as ``config`` says; the exit code."""
    return Pipeline(config, say).run()
