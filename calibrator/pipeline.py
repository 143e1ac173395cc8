"""The main command's flow: load, calibrate, search, write. Each step lives in its own
package; this module only sequences them and reports.

    config (RunConfig) -> model -> backend -> calibration -> [search] -> writers

``run(config)`` is the library entry point; it returns the exit code (0: -l met, 1: not met,
the best configuration written).

Under torchrun (:mod:`calibrator.distributed`) every rank runs this same sequence on its share
of the batches; rank 0 alone writes the outputs, the search state and the report."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from calibrator import distributed
from calibrator.backends import make_backend
from calibrator.config import RunConfig
from calibrator.errors import CalibratorError
from calibrator.metrics import default_metric_blob, loss, make_metric
from calibrator.model import load_model, select_device
from calibrator.quant.calibrate import calibrate
from calibrator.quant.layerwise import calibration_subset, layerwise
from calibrator.quant.fusion import analyze
from calibrator.report import layer_table, trace_table, unit_cosines, write_report
from calibrator.search import Evaluator, Search, SearchState
from calibrator.search.adjust import ESTIMATORS as ADJUST_ESTIMATORS
from calibrator.search.countermeasures import forced_choices
from calibrator.writers import OutputContext, get_writer, quantized_prototxt_path, writers

EXIT_MET, EXIT_NOT_MET = 0, 1


class Pipeline:
    """One run of ``config``; ``say`` prints progress notes (stderr unless quiet)."""

    def __init__(self, config: RunConfig, say=None):
        self.config = config
        self.started = time.time()
        self.say = say or ((lambda m: None) if config.quiet or not distributed.is_main() else
                           (lambda m: print(m, file=sys.stderr, flush=True)))

    # -- steps -------------------------------------------------------------------------------
    def output_paths(self) -> dict[str, Path]:
        """Every output file, the prototxt's default filled in, checked against the inputs."""
        config = self.config
        paths = {"prototxt": config.outputs.get("prototxt")
                 or quantized_prototxt_path(config.model)}
        for writer in writers():
            if writer.name in config.outputs and writer.name != "prototxt":
                paths[writer.name] = config.outputs[writer.name]
        inputs = (config.model.resolve(), config.weights.resolve())
        for name, path in paths.items():
            if Path(path).resolve() in inputs:
                raise CalibratorError(f"{path}: the {name} output would overwrite an input")
        return paths

    def write(self, paths: dict[str, Path], context: OutputContext) -> None:
        if not distributed.is_main():  # rank 0 alone writes
            return
        excluded = context.plan.excluded
        if excluded and context.backend is not None and context.backend.name == "intel":
            print(f"warning: {len(excluded)} layer(s) stay FP32 in the prototxt, because of "
                  f"Intel Caffe's fused-sum rules: "
                  + "; ".join(f"{name} ({why})" for name, why in excluded.items()),
                  file=sys.stderr, flush=True)
        for name, path in paths.items():
            get_writer(name).write(path, context)
            if name == "weights":
                print(f"corrected weights written: {path} (use it with -w for test, gate and "
                      "verify)")
            elif name not in ("prototxt", "table", "json"):
                print(f"{name} output written: {path}")

    def metric(self, model):
        config = self.config
        blob = config.blob
        if not blob and config.metric in ("blob", "accuracy", "map"):
            blob = default_metric_blob(model.test_param, config.detection)
        return make_metric(model.net, blob, config.metric, ap_version=config.ap_version)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> int:
        config = self.config
        model = load_model(config.model, config.weights, images=config.images,
                           detection_list=config.detection_list,
                           device=select_device(config.gpu))
        backend = make_backend(config.runtime, config.target)
        if config.performance_only:
            path = quantized_prototxt_path(config.model, "_dummy")
            if distributed.is_main():
                get_writer("performance").write(path, OutputContext(model, analyze(model.net),
                                                                    None))
            print(f"performance-only prototxt written: {path}")
            return EXIT_MET
        paths = self.output_paths()
        metric = None if config.quantize_only else self.metric(model)
        options = config.quant
        self.say(f"calibrating {len(model.test_param.layer)} layers on "
                 f"{config.sampling_iterations} batches of {model.batch_size} "
                 f"({options.estimator})")
        forced = self.forced_fix(backend)
        calibration = calibrate(model, options, config.sampling_iterations, quiet=config.quiet,
                                estimators=() if config.quantize_only else ADJUST_ESTIMATORS,
                                metric=metric, iterations=config.iterations)
        if config.quantize_only:
            choices = {}
            if forced is not None:
                choices = forced_choices(calibration.fused, calibration.plan(), backend.target,
                                         forced)
                self.say(f"--saturation-fix {forced} on {len(choices)} layer(s) that can "
                         f"saturate on {backend.target.name}")
            record = {}
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
            return EXIT_MET
        return self.search(model, backend, calibration, metric, paths)

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

    def forced_fix(self, backend) -> str | None:
        """--saturation-fix w7/half/s8 on a target that saturates; None for auto/off, or
        (with a warning) for a target that never saturates."""
        fix = self.config.search.saturation_fix
        if fix in ("auto", "off"):
            return None
        if backend.target.exact:
            print(f"warning: --saturation-fix {fix} ignored: --target {backend.target.name} "
                  "never saturates", file=sys.stderr, flush=True)
            return None
        return fix

    def search(self, model, backend, calibration, metric, paths) -> int:
        config, settings = self.config, self.config.search
        metric_name = "agreement" if metric.kind == "agreement" else metric.blob
        state = self.search_state(paths["prototxt"], metric_name, calibration, backend)
        evaluator = Evaluator(model, metric, config.iterations, state, quiet=config.quiet)
        result = Search(model, calibration, evaluator, settings, backend, say=self.say).run()
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
        if "weights" in paths:
            record["weights_out"] = str(paths["weights"])
        self.write(paths, OutputContext(model, calibration.fused, plan, calibration.stats,
                                        backend, record))
        if not config.quiet:
            print(layer_table(calibration.fused, plan, result.sensitivity, actions,
                              result.layerwise))
            print()
            print(trace_table(result.trace))
            print()
        if config.report is not None and distributed.is_main():
            feeds = calibration_subset(model, config.search.probe_images)
            cosines = unit_cosines(model.net, calibration.fused,
                                   backend.simulator(calibration.fused, plan).overrides, feeds)
            write_report(config.report, fused=calibration.fused, plan=plan,
                         stats=calibration.stats, result=result,
                         summary={**summary,
                                  "wall_seconds": round(time.time() - self.started, 1)},
                         actions=actions, cosines=cosines)
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
        state_path = Path(str(prototxt) + ".search.json")
        inputs = {"model": str(config.model.resolve()),
                  "weights": str(config.weights.resolve()),
                  "iterations": config.iterations, "metric": metric_blob,
                  "sampling_iterations": config.sampling_iterations,
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


def _actions(result) -> dict[str, str]:
    actions = {a.layer: a.action for a in result.adjustments}
    for name in result.reverted:
        actions[name] = (actions[name] + "; " if name in actions else "") + "reverted to FP32"
    return actions


def run(config: RunConfig, say=None) -> int:
    """Calibrate (and search) as ``config`` says; the exit code."""
    return Pipeline(config, say).run()
