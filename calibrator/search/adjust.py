"""Cheaper fixes tried on the worst layers before any layer is reverted to FP32 (after the
whole-net adjustments of :mod:`calibrator.quant.layerwise`).

Each candidate is scored with the sensitivity probe (that layer alone quantized, the
network output compared with FP32), so trying several costs no full evaluation; the search
then confirms the kept fixes with one full evaluation. Candidates: another range estimator,
and per-channel weights where they were per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from calibrator.quant.scales import UnitChoice, with_choice
from calibrator.search.sensitivity import Probe, probe_layer

ESTIMATORS = ("KL", "MAXP", "DIRECT", "MSE", "PERCENTILE99.99")
IMPROVEMENT = 0.9   # a fix must cut the layer's damage by at least 10 %


@dataclass
class Adjustment:
    layer: str
    action: str          # what was kept, e.g. "estimator MSE", "per-channel", "easyquant"
    before: float
    after: float
    choice: UnitChoice


def adjust_layers(net, fused, probe: Probe, plan_fn, choices: dict, worst: list[str],
                  sensitivity: dict[str, float], backend, *,
                  per_channel_default: bool) -> tuple[dict, list[Adjustment]]:
    """Try the candidates on each of ``worst`` and keep the best one that helps."""
    kept: list[Adjustment] = []
    for name in worst:
        current = sensitivity[name]
        candidates: list[tuple[str, UnitChoice]] = []
        base = choices.get(name, UnitChoice())
        # another estimator replaces the scales a layer-wise search chose for this layer
        plain = replace(base, input_threshold=None, output_threshold=None, weight_scales=None)
        for estimator in ESTIMATORS:
            candidates.append((f"estimator {estimator}", replace(plain, estimator=estimator)))
        if not per_channel_default:
            candidates.append(("per-channel weights", replace(base, per_channel=True)))
        best_action, best_choice, best_value = None, None, current
        for action, choice in candidates:
            plan = plan_fn(with_choice(choices, name, **choice.__dict__))
            if name not in plan.layers:
                continue
            value = probe_layer(net, fused, probe, plan, name, backend)
            if value < best_value:
                best_action, best_choice, best_value = action, choice, value
        if best_choice is not None and best_value < IMPROVEMENT * current:
            choices = with_choice(choices, name, **best_choice.__dict__)
            kept.append(Adjustment(name, best_action, current, best_value, best_choice))
    return choices, kept
