"""The Target contract: how one family of INT8 kernels accumulates u8/s8 x s8 products.

The simulation (:mod:`calibrator.quant.simulate`) quantizes each unit's input and weights
and then *accumulates* their products; only that accumulation differs between CPUs. A
target turns a unit's quantized input into its integer accumulator (float64,
integer-valued, without the bias, which every kernel adds exactly in int32).

A target also names the counter-measures that remove its saturation (``countermeasures``):
the search tries exactly those, and ``--saturation-fix`` accepts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Counter-measures against int16 pair saturation the search may choose per layer.
COUNTERMEASURES = {
    "w7": "7-bit weights: weight scales x 63/127, |q_w| <= 63, so 255*63*2 = 32130 never "
          "saturates (ONNX Runtime's reduce_range)",
    "half": "halved weight scales (Intel's -fu rule without -clx): |q_w| <= 64, "
            "255*64*2 = 32640 never saturates",
    "s8": "signed (s8) activations (scale 127/T): never saturates where s8 inputs halve the "
          "weights (oneDNN convolution, the *-onednn targets); on MLAS (avx2/avx512bw) s8 "
          "inputs are shifted by 128 and saturate more, not less",
}
#: The weight-scale factor of the counter-measures that scale weights.
WEIGHT_FACTORS = {"w7": 63.0 / 127.0, "half": 0.5}


@dataclass
class SaturationRecord:
    """Per layer, over the batches a simulator recorded: accumulator outputs, how many a
    saturated pair changed, and the summed |error| and |accumulator|."""

    outputs: int = 0
    changed: int = 0
    abs_error: float = 0.0
    abs_acc: float = 0.0

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.outputs if self.outputs else 0.0

    @property
    def relative_error(self) -> float:
        return self.abs_error / self.abs_acc if self.abs_acc else 0.0

    def add(self, correction: torch.Tensor, acc: torch.Tensor) -> None:
        self.outputs += correction.numel()
        self.changed += int((correction != 0).sum())
        self.abs_error += float(correction.abs().sum())
        self.abs_acc += float(acc.abs().sum())


class Target:
    """Exact int32 accumulation; subclasses replace :meth:`accumulate` where real kernels
    compute something else.

    ``accumulate(kernel, q_in, record)`` gets the simulator's
    :class:`~calibrator.quant.simulate.UnitKernel` (its unit, LayerQuant and integer
    weights) and the quantized input; ``record`` (a dict layer -> SaturationRecord, or
    None) collects what saturated."""

    name = "exact"
    description = "exact int32 accumulation"
    #: the counter-measures (keys of COUNTERMEASURES) that remove this target's saturation
    countermeasures: tuple[str, ...] = ()

    def __init__(self, name: str | None = None, description: str | None = None):
        if name is not None:
            self.name = name
        if description is not None:
            self.description = description

    @property
    def exact(self) -> bool:
        """True when the target computes what exact int32 accumulation computes."""
        return True

    @property
    def pair_saturation(self) -> bool:
        return bool(self.countermeasures)

    def accumulate(self, kernel, q_in: torch.Tensor, record: dict | None = None
                   ) -> torch.Tensor:
        return kernel.exact_accumulate(q_in)

    def can_saturate(self, kernel, input_max: float | None = None) -> bool:
        """Whether any product pair of this unit can saturate for inputs up to
        ``input_max`` (default: the whole input range)."""
        return False

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))


def apply_countermeasure(lq, fix: str) -> None:
    """Apply ``fix`` to a built ``LayerQuant`` in place (for plans that already exist, e.g.
    read from a prototxt; a search changes the unit's ``UnitChoice`` so the scales are
    rebuilt). ``s8`` rescales the input from 255/T to 127/T."""
    if fix in WEIGHT_FACTORS:
        lq.scale_params = [s * WEIGHT_FACTORS[fix] for s in lq.scale_params]
    elif fix == "s8":
        if lq.input_unsigned and not lq.force_u8_input:
            lq.scale_in = lq.scale_in * (2 ** (lq.bits - 1) - 1) / (2 ** lq.bits - 1)
            lq.input_unsigned = False
    else:
        raise ValueError(f"unknown counter-measure '{fix}'")
    lq.notes.append(f"saturation counter-measure: {fix}")
    lq.saturation_fix = fix
