"""Cheaper fixes tried on the worst layers before any layer is reverted to FP32.

Each candidate is scored with the sensitivity probe (that layer alone quantized, the
network output compared with FP32), so trying a dozen costs no full evaluation; the
search then confirms the kept fixes with one full evaluation. Candidates: another range
estimator, per-channel weights where they were per tensor, and an EasyQuant-style scale
search (Wu et al., 2020): maximise the cosine between the layer's FP32 and simulated INT8
outputs over the probe images, with scales in [0.5 S, 2 S] plus S itself, alternating
weight scales (per output channel: each channel's cosine only depends on its own scale)
and the activation (input) scale.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from calibrator.quant.scales import QuantPlan, UnitChoice, qmax, with_choice
from calibrator.search.sensitivity import Probe, probe_layer, single_layer_plan

ESTIMATORS = ("KL", "MAXP", "DIRECT", "MSE", "PERCENTILE99.99")
EASYQUANT_ALPHAS = tuple(sorted(set(np.round(np.linspace(0.5, 2.0, 31), 6).tolist()) | {1.0}))
EASYQUANT_ROUNDS = 2
IMPROVEMENT = 0.9   # a fix must cut the layer's damage by at least 10 %


@dataclass
class Adjustment:
    layer: str
    action: str          # what was kept, e.g. "estimator MSE", "per-channel", "easyquant"
    before: float
    after: float
    choice: UnitChoice


def _unit_outputs(net, fused, probe: Probe, name: str, layer_quant=None, plan=None,
                  backend=None):
    """The fused output of one unit on the probe images, FP32 or with ``layer_quant``."""
    unit = fused.by_name[name]
    overrides = None
    if layer_quant is not None:
        overrides = backend.layer_simulator(
            fused, single_layer_plan(plan, name, layer_quant)).overrides
    with torch.no_grad():
        out = net(probe.snapshots[name], start=unit.layer.index, stop=unit.last.index + 1,
                  overrides=overrides, outputs=[unit.output.name])
    return out[unit.output.name].double()


def _per_channel_cosine(ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    a = ref.transpose(0, 1).reshape(ref.shape[1], -1)
    b = q.transpose(0, 1).reshape(a.shape)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def easyquant(net, fused, probe: Probe, plan: QuantPlan, name: str,
              backend) -> UnitChoice:
    """Alternate per-channel weight scales and the input scale to maximise the cosine."""
    base = plan.layers[name]
    reference = _unit_outputs(net, fused, probe, name)
    weights = np.array(base.scale_params, dtype=np.float64)
    scale_in = base.scale_in
    for _ in range(EASYQUANT_ROUNDS):
        best = np.full(len(weights), -np.inf)
        chosen = weights.copy()
        for alpha in EASYQUANT_ALPHAS:
            trial = replace(base, scale_in=scale_in, scale_params=(weights * alpha).tolist())
            cos = _per_channel_cosine(reference, _unit_outputs(net, fused, probe, name, trial,
                                                               plan, backend)).cpu().numpy()
            better = cos > best + 1e-12
            best = np.where(better, cos, best)
            chosen = np.where(better, weights * alpha, chosen)
        weights = chosen
        scores = []
        for alpha in EASYQUANT_ALPHAS:
            trial = replace(base, scale_in=scale_in * alpha, scale_params=weights.tolist())
            cos = _per_channel_cosine(reference, _unit_outputs(net, fused, probe, name, trial,
                                                               plan, backend)).mean().item()
            scores.append(cos)
        scale_in = scale_in * EASYQUANT_ALPHAS[int(np.argmax(scores))]
    threshold = qmax(base.input_unsigned, base.bits) / scale_in
    return UnitChoice(input_threshold=threshold, weight_scales=tuple(float(w) for w in weights))


def adjust_layers(net, fused, probe: Probe, plan_fn, choices: dict, worst: list[str],
                  sensitivity: dict[str, float], backend, *, per_channel_default: bool,
                  scale_search: bool) -> tuple[dict, list[Adjustment]]:
    """Try the candidates on each of ``worst`` and keep the best one that helps."""
    kept: list[Adjustment] = []
    for name in worst:
        current = sensitivity[name]
        candidates: list[tuple[str, UnitChoice]] = []
        base = choices.get(name, UnitChoice())
        for estimator in ESTIMATORS:
            candidates.append((f"estimator {estimator}", replace(base, estimator=estimator)))
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
        if scale_search:
            plan = plan_fn(with_choice(choices, name, **(best_choice or base).__dict__))
            tuned = easyquant(net, fused, probe, plan, name, backend)
            tuned = replace(best_choice or base, input_threshold=tuned.input_threshold,
                            weight_scales=tuned.weight_scales)
            plan = plan_fn(with_choice(choices, name, **tuned.__dict__))
            value = probe_layer(net, fused, probe, plan, name, backend)
            if value < best_value:
                prefix = f"{best_action} + " if best_action else ""
                best_action, best_choice, best_value = prefix + "EasyQuant scales", tuned, value
        if best_choice is not None and best_value < IMPROVEMENT * current:
            choices = with_choice(choices, name, **best_choice.__dict__)
            kept.append(Adjustment(name, best_action, current, best_value, best_choice))
    return choices, kept
