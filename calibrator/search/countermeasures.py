"""Counter-measures against int16 pair saturation, chosen per layer on the probe images.

Only on targets whose u8 x s8 kernels saturate pair sums (``avx2``, ``avx512bw`` and their
``-onednn`` forms; see ``calibrator.quant.targets``). A layer qualifies when its single-layer
probe under the target actually saturated some output. Its candidates are the fixes that
remove saturation on that target: 7-bit weights (``w7``), halved weight scales (``half``),
and s8 input (``s8``) where the target halves the weights of s8 inputs. Each candidate is
scored like the sensitivity ranking (that layer alone quantized, under the target); the one
with the least damage is kept if it beats the layer as it is. Weight bits are a trade: a
layer that saturates rarely keeps its 8-bit weights because the fix costs more than it saves.
"""

from __future__ import annotations

from dataclasses import replace

from calibrator.quant.scales import UnitChoice, with_choice
from calibrator.quant.simulate import Int8Simulator
from calibrator.quant.targets import COUNTERMEASURES, Target, saturating_layers
from calibrator.search.adjust import Adjustment
from calibrator.search.sensitivity import Probe, probe_layer, rank_layers


def candidate_fixes(target: Target, input_unsigned: bool) -> list[str]:
    """The counter-measures that remove saturation on ``target`` for such a layer."""
    return [fix for fix in target.countermeasures if fix != "s8" or input_unsigned]


def rank_with_saturation(net, fused, probe: Probe, plan, backend
                         ) -> tuple[dict[str, float], dict[str, float]]:
    """The sensitivity ranking under ``backend`` and, from the same probe runs, the layers
    that saturated with the fraction of their accumulator outputs that changed."""
    if not backend.target.pair_saturation:
        return rank_layers(net, fused, probe, plan, backend), {}
    records: dict = {}
    sensitivity = rank_layers(net, fused, probe, plan, backend, saturation=records)
    return sensitivity, {name: entry.changed_fraction for name, entry in records.items()
                         if entry.changed}


def choose_countermeasures(net, fused, probe: Probe, plan_fn, choices: dict, backend,
                           sensitivity: dict[str, float],
                           saturating: dict[str, float]) -> tuple[dict, list[Adjustment]]:
    """Pick a fix for each layer of ``saturating`` (from ``rank_with_saturation``) where one
    helps: (new choices, the fixes kept, worst-saturating layer first)."""
    plan = plan_fn(choices)
    kept: list[Adjustment] = []
    for name in sorted(saturating, key=lambda n: (-saturating[n], n)):
        current = sensitivity.get(name)
        if current is None:
            current = probe_layer(net, fused, probe, plan, name, backend)
        base = choices.get(name, UnitChoice())
        best_fix, best_value = None, current
        for fix in candidate_fixes(backend.target, plan.layers[name].input_unsigned):
            trial = plan_fn(with_choice(choices, name, saturation_fix=fix))
            if name not in trial.layers:
                continue
            value = probe_layer(net, fused, probe, trial, name, backend)
            if value < best_value:
                best_fix, best_value = fix, value
        if best_fix is not None:
            choice = replace(base, saturation_fix=best_fix)
            choices = with_choice(choices, name, saturation_fix=best_fix)
            kept.append(Adjustment(name, f"saturation fix {best_fix}", current, best_value,
                                   choice))
    return choices, kept


def forced_choices(fused, plan, target: Target, fix: str, choices: dict | None = None) -> dict:
    """``fix`` on every layer of ``plan`` that can saturate on ``target`` for some input in
    its range (a static check of the weight pairs: ``--saturation-fix w7|half|s8``)."""
    if fix not in COUNTERMEASURES:
        raise ValueError(f"unknown counter-measure '{fix}'")
    choices = dict(choices or {})
    for name in saturating_layers(Int8Simulator(fused, plan), target):
        if fix == "s8" and not plan.layers[name].input_unsigned:
            continue
        choices = with_choice(choices, name, saturation_fix=fix)
    return choices


__all__ = ["candidate_fixes", "rank_with_saturation", "choose_countermeasures",
           "forced_choices"]
