"""The search strategies. ``bisect`` (default): rank, adjust, bisect, prune. ``intel``:
Intel's legacy loop (revert the first still-quantized conv in prototxt order after each
full evaluation) kept for comparison.

Full-evaluation budget of ``bisect`` for N quantized layers: FP32 (1) + all-INT8 (1) +
whole-net adjustments (1; 2 where saturation counter-measures are tried alone too) +
adjusted worst layers (1) + the shortest reverted prefix
(``prefix.evaluations_bound(N)``: one when a single layer suffices, under 2 ceil(log2 N)) +
pruning (2).

The search talks only to the backend it is given (:mod:`calibrator.backends`): full
evaluations run ``backend.simulator``, the probes ``backend.layer_simulator``. On a target
whose kernels saturate int16 pair sums (``--target avx2``...), every evaluation and probe
runs that arithmetic, and the "adjusted" step also carries the saturation
counter-measures chosen on the probe (``calibrator.search.countermeasures``); if that
combined trial does not meet ``-l``, the counter-measures are tried alone (one more
evaluation) and the better of the two is kept.

Under torchrun every rank runs this same search on its share of each evaluation's batches;
the probe (batch 0) runs on every rank and its results are rank 0's everywhere.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace

from calibrator import distributed
from calibrator.data.feed import batches
from calibrator.metrics import loss
from calibrator.quant.layerwise import LayerwiseSettings, calibration_subset, layerwise
from calibrator.quant.scales import QuantPlan, with_choice
from calibrator.quant.simulate import FoldedFP32
from calibrator.search.adjust import Adjustment, adjust_layers
from calibrator.search.countermeasures import (choose_countermeasures, forced_choices,
                                               rank_with_saturation)
from calibrator.search.evaluator import EvalResult, Evaluator
from calibrator.search.prefix import shortest_met_prefix
from calibrator.search.sensitivity import make_probe, output_blobs

ADJUST_WORST = 5
PRUNE_EVALS = 2


@dataclass
class Step:
    step: int
    action: str
    metric: float
    loss: float
    evaluations: int
    seconds: float
    fp32_layers: int
    met: bool
    batches: int = 0          # batches read (fewer than -i: stopped once decided)
    partial: bool = False


@dataclass
class SearchResult:
    fp32_metric: float
    best_plan: QuantPlan
    best_metric: float
    met: bool
    trace: list[Step] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    adjustments: list[Adjustment] = field(default_factory=list)  # incl. saturation fixes
    saturating: dict[str, float] = field(default_factory=dict)   # layer -> changed fraction
    reverted: list[str] = field(default_factory=list)
    stopped_by: str | None = None     # "max-evals" / "time-budget" when a bound ended it
    evaluations: int = 0
    layerwise: dict = field(default_factory=dict)   # unit -> LayerReport of the adjustment
    whole_net: bool = False           # the whole-net adjustment was kept


@dataclass
class SearchSettings:
    tolerance: float
    relative: bool = False
    strategy: str = "bisect"
    max_evals: int | None = None
    time_budget: float | None = None
    scale_search: bool = True
    allow_fp32: bool = True
    probe_images: int = 16
    saturation_fix: str = "auto"   # auto: chosen per layer; off; or w7/half/s8 everywhere
    #: the whole-net adjustments tried before any revert: EasyQuant (``scale_search``) and
    #: bias correction (only when the corrected weights are written: ``bias_correction``)
    bias_correction: bool = False
    layerwise: LayerwiseSettings = field(default_factory=LayerwiseSettings)
    early_stop: bool = True        # stop a full evaluation once its verdict is decided


class _Budget(Exception):
    def __init__(self, why):
        self.why = why


class Search:
    def __init__(self, model, calibration, evaluator: Evaluator, settings: SearchSettings,
                 backend, say=lambda message: None):
        self.model = model
        self.calibration = calibration
        self.fused = calibration.fused
        self.evaluator = evaluator
        self.settings = settings
        self.say = say
        self.started = time.time()
        self.trace: list[Step] = []
        self.results: list[tuple[QuantPlan, EvalResult]] = []
        self.fp32: EvalResult | None = None
        self.backend = backend
        self.initial_choices: dict = {}
        fix = settings.saturation_fix
        if fix not in ("auto", "off") and not backend.target.exact:
            self.initial_choices = forced_choices(self.fused, calibration.plan(),
                                                  backend.target, fix)

    # -- bookkeeping -------------------------------------------------------------------------
    def loss(self, metric: float) -> float:
        return loss(self.fp32.metric, metric, self.settings.relative)

    def met(self, result: EvalResult) -> bool:
        return self.loss(result.metric) <= self.settings.tolerance + 1e-12

    def _check_budget(self) -> None:
        s = self.settings
        if s.max_evals is not None and self.evaluator.used >= s.max_evals:
            raise _Budget("max-evals")
        if s.time_budget is not None and distributed.agree(  # rank 0's clock decides
                time.time() - self.started >= s.time_budget):
            raise _Budget("time-budget")

    def _decide(self, both: bool):
        """The verdict once the bounds settle it (None: not yet); ``both``: a certain
        failure stops the evaluation too (when only the verdict matters)."""
        if not self.settings.early_stop:
            return None

        def decide(low: float, high: float):
            if self.loss(low) <= self.settings.tolerance + 1e-12:
                return True
            if both and self.loss(high) > self.settings.tolerance + 1e-12:
                return False
            return None

        return decide

    def evaluate(self, plan: QuantPlan, action: str, verdict_only: bool = True) -> EvalResult:
        """A full evaluation of ``plan``; it stops once met is certain, and, with
        ``verdict_only``, once not met is certain too."""
        if self.results:  # the first INT8 configuration always runs: `best` needs one
            self._check_budget()
        result = self.evaluator.evaluate(plan, self.backend.simulator(self.fused, plan).overrides,
                                         desc=action[:30], decide=self._decide(verdict_only))
        fp32_layers = len(plan.fp32_layers(self.fused))
        step = Step(len(self.trace) + 1, action, result.metric, self.loss(result.metric),
                    self.evaluator.used, round(time.time() - self.started, 1), fp32_layers,
                    self.met(result), result.batches, result.partial)
        self.trace.append(step)
        self.results.append((plan, result))
        stopped = (f", stopped after {result.batches} of {self.evaluator.iterations} batches"
                   if result.partial else "")
        self.say(f"[{step.evaluations:2d}] {action}: {result.metric:.6g} "
                 f"(loss {step.loss:+.4f}{', recalled' if result.cached else ''}{stopped})")
        return result

    def best(self) -> tuple[QuantPlan, float, bool]:
        """The configuration to write: met with the fewest FP32 layers, else the highest
        metric; its evaluation completed if it stopped early (the exact value is reported)."""
        while True:
            met = [(i, p, r) for i, (p, r) in enumerate(self.results) if self.met(r)]
            if met:
                index, plan, result = min(met, key=lambda ipr: (
                    len(ipr[1].fp32_layers(self.fused)), -ipr[2].metric))
            else:
                index, (plan, result) = max(enumerate(self.results),
                                            key=lambda ipr: ipr[1][1].metric)
            if not result.partial:
                return plan, result.metric, bool(met)
            done = self.evaluator.complete(plan, self.backend.simulator(self.fused,
                                                                        plan).overrides, result)
            self.results[index] = (plan, done)
            self.say(f"     completed: {done.metric:.6g} (loss {self.loss(done.metric):+.4f})")

    # -- the strategies ----------------------------------------------------------------------
    def run(self) -> SearchResult:
        measured = (None if self.calibration.fp32 is None
                    else (self.calibration.fp32, self.calibration.fp32_seconds))
        self.fp32 = self.evaluator.evaluate(None, FoldedFP32(self.fused).overrides,
                                            desc="FP32", measured=measured)
        self.say(f"[{self.evaluator.used:2d}] FP32: {self.fp32.metric:.6g}")
        self.trace.append(Step(0, "FP32", self.fp32.metric, 0.0, self.evaluator.used,
                               round(time.time() - self.started, 1),
                               len(self.fused.units), True))
        outcome = SearchResult(self.fp32.metric, None, 0.0, False)
        try:
            if self.settings.strategy == "intel":
                self._intel(outcome)
            else:
                self._bisect(outcome)
        except _Budget as stop:
            outcome.stopped_by = stop.why
        plan, metric, met = self.best()
        outcome.best_plan, outcome.best_metric, outcome.met = plan, metric, met
        outcome.trace = self.trace
        outcome.evaluations = self.evaluator.used
        outcome.reverted = [name for name, choice in plan.choices.items()
                            if choice.fp32 and name not in plan.layers]
        return outcome

    def _intel(self, outcome: SearchResult) -> None:
        choices: dict = dict(self.initial_choices)
        plan = self.calibration.plan(choices)
        order = [u.name for u in self.fused.units if u.name in plan.layers]
        result = self.evaluate(plan, "all INT8")
        while not self.met(result) and order:
            name = order.pop(0)
            choices = with_choice(choices, name, fp32=True)
            plan = self.calibration.plan(choices)
            result = self.evaluate(plan, f"revert {name}")

    def _whole_net(self, choices: dict, outcome: SearchResult) -> dict:
        """Per-channel weights, EasyQuant and bias correction on every unit at once."""
        settings, options = self.settings, self.calibration.options
        adjusted = dict(choices)
        if not options.per_channel:
            for unit in self.fused.units:
                adjusted = with_choice(adjusted, unit.name, per_channel=True)
        if settings.scale_search or settings.bias_correction:
            layerwise_settings = replace(settings.layerwise, easyquant=settings.scale_search,
                                         bias_correction=settings.bias_correction)
            feeds = calibration_subset(self.model, layerwise_settings.images)
            adjusted, reports = layerwise(self.model.net, self.fused, self.calibration.stats,
                                          options, adjusted, feeds, layerwise_settings)
            outcome.layerwise = reports
        return adjusted

    def _bisect(self, outcome: SearchResult) -> None:
        calibration, net, backend = self.calibration, self.model.net, self.backend
        choices: dict = dict(self.initial_choices)
        plan = calibration.plan(choices)
        current = self.evaluate(plan, "all INT8", verdict_only=False)
        if self.met(current):
            return
        # the probe (FP32 activations of a few images at every cut, hundreds of MB) is made
        # when first needed, then kept: a search met by its whole-net step never makes it
        probe = functools.cache(self._probe)
        # 1. whole-net adjustments (and, where the target saturates, the counter-measures
        #    chosen on the probe), confirmed by one full evaluation
        fixes: list[Adjustment] = []
        with_fixes = choices
        if backend.target.pair_saturation and self.settings.saturation_fix == "auto":
            # probe results: rank 0's on every rank (distributed.agree): no divergence
            sensitivity, saturating = distributed.agree(
                rank_with_saturation(net, self.fused, probe(), plan, backend))
            outcome.saturating = dict(saturating)
            if saturating:
                with_fixes, fixes = distributed.agree(choose_countermeasures(
                    net, self.fused, probe(), calibration.plan, choices, backend, sensitivity,
                    saturating))
                self.say(f"{len(saturating)} layer(s) saturate on {backend.target.name}; "
                         f"counter-measures kept on {len(fixes)}")
                for fix in fixes:
                    self.say(f"  {fix.layer}: {fix.action} ({fix.before:.3g} -> "
                             f"{fix.after:.3g})")
        adjusted = self._whole_net(with_fixes, outcome)
        adjusted, outcome.layerwise = distributed.agree((adjusted, outcome.layerwise))
        trials = []
        if adjusted != with_fixes:
            parts = [f"fix {len(fixes)} layer(s)"] if fixes else []
            parts += ["per-channel"] if not calibration.options.per_channel else []
            parts += ["EasyQuant"] if self.settings.scale_search else []
            parts += ["bias correction"] if self.settings.bias_correction else []
            trials.append((adjusted, True, " + ".join(parts)))
        if fixes:
            trials.append((with_fixes, False, f"fix {len(fixes)} layer(s) only"))
        for trial_choices, whole, label in trials:  # the next only while -l is not met
            trial = self.evaluate(calibration.plan(trial_choices), label, verdict_only=False)
            if trial.metric > current.metric:
                choices, current = trial_choices, trial
                outcome.adjustments = list(fixes)
                outcome.whole_net = whole
            if self.met(current):
                break
        if self.met(current):
            return
        # 2. the ranking of the adjusted plan; cheaper fixes on its worst layers
        plan = calibration.plan(choices)
        sensitivity, saturating = distributed.agree(
            rank_with_saturation(net, self.fused, probe(), plan, backend))
        outcome.sensitivity = dict(sensitivity)
        outcome.saturating = outcome.saturating or dict(saturating)
        ranked = self._ranking(sensitivity)
        self.say("most sensitive: " + ", ".join(f"{n} ({sensitivity[n]:.3g})"
                                                for n in ranked[:5]))
        adjusted, kept = distributed.agree(adjust_layers(
            net, self.fused, probe(), calibration.plan, choices, ranked[:ADJUST_WORST],
            sensitivity, backend,
            per_channel_default=calibration.options.per_channel or outcome.whole_net))
        for adjustment in kept:
            self.say(f"adjust {adjustment.layer}: {adjustment.action} "
                     f"({adjustment.before:.3g} -> {adjustment.after:.3g})")
        if kept:
            trial = self.evaluate(calibration.plan(adjusted), f"adjust {len(kept)} layer(s)",
                                  verdict_only=False)
            if trial.metric > current.metric:
                choices, current = adjusted, trial
                outcome.adjustments = outcome.adjustments + kept
                for change in kept:
                    sensitivity[change.layer] = change.after
        ranked = self._ranking(sensitivity)
        if self.met(current):
            return
        if not self.settings.allow_fp32:
            return
        # the shortest prefix of the ranking whose reversion meets -l (galloping, then
        # bisection: search.prefix)
        def met_reverting(size: int) -> bool:
            trial_plan = calibration.plan(self._reverted(choices, ranked[:size]))
            return self.met(self.evaluate(trial_plan, f"revert top {size}"))

        reverted = ranked[:shortest_met_prefix(len(ranked), met_reverting)]
        # pruning: re-quantize the least sensitive reverted layers that are not needed,
        # a binary search for the longest such run within PRUNE_EVALS evaluations
        candidates = sorted(reverted, key=lambda n: (sensitivity[n], n))
        low, high = 0, len(candidates) - 1
        for _ in range(PRUNE_EVALS):
            if low >= high:
                break
            j = (low + high + 1) // 2
            still = [n for n in reverted if n not in candidates[:j]]
            trial_plan = calibration.plan(self._reverted(choices, still))
            if self.met(self.evaluate(trial_plan, f"re-quantize {j} of {len(reverted)}")):
                low = j
            else:
                high = j - 1

    @staticmethod
    def _ranking(sensitivity: dict[str, float]) -> list[str]:
        return sorted(sensitivity, key=lambda n: (-sensitivity[n], n))

    def _reverted(self, choices: dict, names) -> dict:
        out = dict(choices)
        for name in names:
            out = with_choice(out, name, fp32=True)
        return out

    def _probe(self):
        feeds = next(iter(batches(self.model, 1, desc="probe", quiet=True)))[1]
        count = self.settings.probe_images
        feeds = {k: v[:count] if v.dim() and v.shape[0] > count else v for k, v in feeds.items()}
        metric = self.evaluator.metric
        return make_probe(self.model.net, self.fused, feeds,
                          output_blobs(metric, self.model.net),
                          classifier=metric.class_scores)

