"""Layer-wise scale search (EasyQuant) and bias correction, with the quantized network
upstream of each layer.

EasyQuant (Wu et al., "EasyQuant: Post-training Quantization via Scale Optimization",
2020): every quantized unit in network order, its input taken from the already quantized
network before it (not the FP32 input), alternately the per-channel weight scales and the
activation (input) scale are searched over [alpha S, beta S] (the paper: alpha = 0.5,
beta = 2, 100 steps) to maximise the cosine similarity of the unit's INT8 output with its
FP32 output, on a calibration subset (the paper: 50 images). Each output channel's cosine
depends only on its own weight scale, so the weight step picks every channel's best factor
at once; the activation step scores the whole output. Both steps evaluate every candidate
in a few batched matrix products (the candidates stacked, in chunks bounded in memory) on
a fixed random sample of the unit's output positions.

Bias correction (Nagel et al. 2019; NNCF's "fast bias correction"): per output channel, the
mean error of the unit's INT8 output (before its ReLU and residual add) against FP32 over
the calibration images, measured with the quantized upstream, is subtracted from the bias.

During the pass the quantized units write unrounded (FP32) outputs, so each unit's input is
rounded once, at the input scale being searched; afterwards a unit whose output feeds only
one quantized consumer takes that consumer's input threshold as its output threshold (one
rounding in the final plan too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from calibrator.data.feed import batches
from calibrator.quant.folding import folded_weights
from calibrator.quant.fusion import FusedGraph, FusedUnit
from calibrator.quant.scales import QuantOptions, UnitChoice, build_plan, qmax
from calibrator.quant.simulate import FoldedFP32, quantize
from calibrator.quant.targets import WEIGHT_FACTORS

#: elements per temporary tensor of the candidate evaluation (float32: 64 MiB)
CHUNK_ELEMENTS = 1 << 24
#: cosines closer than this are a tie (candidates with the same integers give the same
#: cosine up to the summation order): the first candidate keeps it
TIE = 1e-12


@dataclass(frozen=True)
class LayerwiseSettings:
    easyquant: bool = True
    bias_correction: bool = True
    images: int = 50              # the calibration subset
    steps: int = 100              # candidates per scale over [low, high] x S
    low: float = 0.5
    high: float = 2.0
    rounds: int = 2               # weight step then activation step, this many times
    positions: int = 1024         # sampled output positions per unit for the cosine
    seed: int = 0


@dataclass
class LayerReport:
    """What the pass did to one unit (for the per-layer table and the report)."""

    name: str
    cosine_before: float
    cosine_after: float
    bias_shift: float = 0.0       # max |shift| / max |bias| over the channels (0: none)


def factors(settings: LayerwiseSettings) -> torch.Tensor:
    """The candidate multipliers of a scale: ``steps`` values over [low, high] and 1.0."""
    grid = np.linspace(settings.low, settings.high, settings.steps)
    return torch.tensor(np.unique(np.append(grid, 1.0)), dtype=torch.float32)


# -- patches at sampled output positions ------------------------------------------------------

def _sample_positions(unit: FusedUnit, shape, count: int, seed: int):
    """(n, row, col) of ``count`` output positions drawn without replacement (all when
    fewer), in a fixed order."""
    n, _, h, w = shape if len(shape) == 4 else (shape[0], 1, 1, 1)
    total = n * h * w
    generator = torch.Generator().manual_seed(seed + len(unit.name))
    chosen = (torch.randperm(total, generator=generator)[:count] if total > count
              else torch.arange(total))
    chosen = chosen.sort().values
    return chosen // (h * w), (chosen // w) % h, chosen % w


def _patches(unit: FusedUnit, x: torch.Tensor, where) -> torch.Tensor:
    """(P, G, Cg * kh * kw) input patches of the unit's convolution at the sampled output
    positions (fc: the flattened inputs of the sampled samples, G = 1)."""
    module = unit.layer.module
    n_idx, r_idx, c_idx = where
    if unit.kind == "fc":
        return x.flatten(module.axis)[n_idx].reshape(len(n_idx), 1, -1)
    kh, kw = module.kernel
    ph, pw = module.pad
    sh, sw = module.stride
    dh, dw = module.dilation
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    rows = r_idx[:, None] * sh + torch.arange(kh)[None, :] * dh          # (P, kh)
    cols = c_idx[:, None] * sw + torch.arange(kw)[None, :] * dw          # (P, kw)
    patches = padded[n_idx[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]     # (P, C, kh, kw)
    groups = module.group
    return patches.reshape(len(n_idx), groups, -1)


def _at(tensor: torch.Tensor, where) -> torch.Tensor:
    """(P, O) values of an (N, O, H, W) or (N, O) tensor at the sampled positions."""
    n_idx, r_idx, c_idx = where
    if tensor.dim() == 2:
        return tensor[n_idx]
    return tensor[n_idx, :, r_idx, c_idx]


# -- one unit ----------------------------------------------------------------------------------

class _Unit:
    """One unit's FP32 weights and its INT8 output at the sampled positions for candidate
    scales (Intel's arithmetic, the output left unrounded)."""

    def __init__(self, unit: FusedUnit, lq, patches: torch.Tensor, reference: torch.Tensor,
                 residual: torch.Tensor | None):
        weight, bias = folded_weights(unit)
        self.unit, self.lq = unit, lq
        groups = patches.shape[1]
        out = weight.shape[0]
        self.weight = weight.reshape(groups, out // groups, -1).float()     # (G, Og, K)
        self.bias = bias.float()
        self.patches = patches.float()                                      # (P, G, K)
        self.reference = reference.float()                                  # (P, O)
        self.residual = None if residual is None else residual.float()
        self.limit = 2 ** (lq.bits - 1) - 1
        self.qmax_in = qmax(lq.input_unsigned, lq.bits)

    def _q_in(self, s_in: torch.Tensor) -> torch.Tensor:
        low = 0.0 if self.lq.input_unsigned else -(self.qmax_in + 1)
        return torch.round(self.patches[None] * s_in[:, None, None, None]).clamp_(
            low, self.qmax_in)                                               # (K, P, G, C)

    def _q_w(self, s_w: torch.Tensor) -> torch.Tensor:
        groups, og, _ = self.weight.shape
        w = self.weight[None] * s_w.reshape(-1, groups, og, 1)
        return torch.round(w).clamp_(-self.limit - 1, self.limit)           # (K, G, Og, C)

    def outputs(self, s_in: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
        """(K, P, O) unit outputs for K candidates: input scales (K,) or one (1,), weight
        scales (K, O) or one (1, O); the single ones are shared, not repeated."""
        device = self.patches.device  # candidates live on the CPU, the data on the model's
        s_in, s_w = s_in.to(device), s_w.to(device)
        q_in, q_w = self._q_in(s_in), self._q_w(s_w)
        if len(s_in) == 1:
            acc = torch.einsum("pgc,kgoc->kpgo", q_in[0], q_w)
        elif len(s_w) == 1:
            acc = torch.einsum("kpgc,goc->kpgo", q_in, q_w[0])
        else:
            acc = torch.einsum("kpgc,kgoc->kpgo", q_in, q_w)
        acc = acc.reshape(acc.shape[0], acc.shape[1], -1)
        scale = s_in[:, None] * s_w                                           # (K, O)
        q_b = torch.round(self.bias[None] * scale)
        y = (acc + q_b[:, None, :]) / scale[:, None, :]
        return self._finish(y)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.residual is not None:
            y = y + self.residual
        slope = self.unit.relu_slope
        if slope is not None:
            y = torch.where(y > 0, y, y * slope) if slope else y.clamp(min=0)
        return y

    def chunk(self, per_candidate: int) -> int:
        return max(1, CHUNK_ELEMENTS // max(per_candidate, 1))


def _cosine(a: torch.Tensor, b: torch.Tensor, dim) -> torch.Tensor:
    a, b = a.double(), b.double()
    num = (a * b).sum(dim)
    den = torch.sqrt((a * a).sum(dim) * (b * b).sum(dim)).clamp(min=1e-300)
    return num / den


def search_weight_scales(layer: _Unit, s_in: float, s_w: torch.Tensor,
                         grid: torch.Tensor) -> torch.Tensor:
    """Every channel's best weight scale in s_w x grid (its own cosine; ties: the first)."""
    best = torch.full(s_w.shape, -math.inf, dtype=torch.float64)
    chosen = s_w.clone()
    step = layer.chunk(layer.patches.numel() + layer.reference.numel())
    for start in range(0, len(grid), step):
        part = grid[start:start + step]
        candidates = s_w[None] * part[:, None]                                # (k, O)
        y = layer.outputs(torch.tensor([s_in], dtype=torch.float32), candidates)
        cos = _cosine(y, layer.reference[None], 1).cpu()                      # (k, O)
        for k in range(len(part)):
            better = cos[k] > best + TIE
            best = torch.where(better, cos[k], best)
            chosen = torch.where(better, candidates[k], chosen)
    return chosen


def search_input_scale(layer: _Unit, s_in: float, s_w: torch.Tensor,
                       grid: torch.Tensor) -> float:
    """The best input scale in s_in x grid by the cosine of the whole output."""
    best, chosen = -math.inf, s_in
    step = layer.chunk(layer.patches.numel() + layer.reference.numel())
    for start in range(0, len(grid), step):
        part = grid[start:start + step]
        candidates = s_in * part
        y = layer.outputs(candidates, s_w[None])
        cos = _cosine(y.reshape(len(part), -1), layer.reference.reshape(1, -1), 1).cpu()
        for k in range(len(part)):
            if float(cos[k]) > best + TIE:
                best, chosen = float(cos[k]), float(candidates[k])
    return chosen


def easyquant_unit(layer: _Unit, settings: LayerwiseSettings) -> tuple[float, torch.Tensor]:
    """(input scale, weight scales) after ``settings.rounds`` alternations."""
    grid = factors(settings)
    s_in = float(layer.lq.scale_in)
    s_w = torch.tensor(layer.lq.scale_params, dtype=torch.float32)
    for _ in range(settings.rounds):
        s_w = search_weight_scales(layer, s_in, s_w, grid)
        s_in = search_input_scale(layer, s_in, s_w, grid)
    return s_in, s_w


def cosine_of(layer: _Unit, s_in: float, s_w: torch.Tensor) -> float:
    y = layer.outputs(torch.tensor([s_in], dtype=torch.float32), s_w[None])
    return float(_cosine(y.reshape(1, -1), layer.reference.reshape(1, -1), 1)[0])


def calibration_subset(model, images: int) -> dict:
    """The first ``images`` samples of the calibration batches, as one batch of feeds."""
    parts: dict[str, list] = {}
    count = 0
    batch_size = max(model.batch_size, 1)
    for _, feeds in batches(model, -(-images // batch_size), desc="subset", quiet=True):
        for name, value in feeds.items():
            parts.setdefault(name, []).append(value)
        count += next(iter(feeds.values())).shape[0]
        if count >= images:
            break
    out = {}
    for name, values in parts.items():
        if all(v.shape[1:] == values[0].shape[1:] and v.dim() > 0 for v in values):
            out[name] = torch.cat(values)[:images]
        else:  # not one sample per row (SSD's ground-truth rows): the first batch's
            out[name] = values[0]
    return out


# -- the pass ----------------------------------------------------------------------------------

def _quantized_unit(unit: FusedUnit, lq, x: torch.Tensor) -> torch.Tensor:
    """The unit's output with its input and weights quantized, before the ReLU and residual
    (its accumulator dequantized, unrounded): what bias correction compares."""
    weight, bias = folded_weights(unit, lq.bias_shift)
    scales = torch.tensor(np.asarray(lq.scale_params, np.float32), device=weight.device)
    limit = 2 ** (lq.bits - 1) - 1
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q_w = torch.round(weight.float() * scales.reshape(shape)).clamp_(-limit - 1, limit)
    q_in = quantize(x.float(), lq.scale_in, lq.input_unsigned, lq.bits)
    acc = unit.layer.module.run_with(q_in, q_w, None)
    scale = np.float32(lq.scale_in) * scales
    q_b = torch.round(bias.float() * scale)
    per = (1, -1) + (1,) * (acc.dim() - 2)
    return (acc + q_b.reshape(per)) / scale.reshape(per)


def _fp32_unit(unit: FusedUnit, x: torch.Tensor) -> torch.Tensor:
    weight, bias = folded_weights(unit)
    return unit.layer.module.run_with(x.float(), weight.float(), bias.float())


def _finish(unit: FusedUnit, y: torch.Tensor, residual) -> torch.Tensor:
    if residual is not None:
        y = y + residual
    slope = unit.relu_slope
    if slope is not None:
        y = torch.where(y > 0, y, y * slope) if slope else y.clamp(min=0)
    return y


def _residual_name(unit: FusedUnit, fused: FusedGraph) -> str | None:
    if unit.residual is None:
        return None
    for i, name in enumerate(unit.eltwise.bottoms):
        if fused.input_of(unit.eltwise, i) == unit.residual:
            return name
    return None


def layerwise(net, fused: FusedGraph, stats: dict, options: QuantOptions, choices: dict,
              feeds: dict, settings: LayerwiseSettings, say=lambda message: None
              ) -> tuple[dict, dict[str, LayerReport]]:
    """EasyQuant and/or bias correction of every quantized unit on ``feeds`` (the calibration
    subset); the new choices (explicit thresholds, weight scales, bias shifts) and a report
    per unit."""
    choices = dict(choices)
    plan = build_plan(fused, stats, options, choices)
    units = [u for u in fused.units if u.name in plan.layers and u.name not in plan.excluded]
    folded = FoldedFP32(fused).overrides
    reports: dict[str, LayerReport] = {}
    reads_from = {}
    for node in net.nodes:
        for bottom in node.bottoms:
            reads_from.setdefault(bottom, []).append(node.index)
    fp_blobs, q_blobs, position = dict(feeds), dict(feeds), 0

    def advance(blobs, stop):
        out = net(blobs, start=position, stop=stop, overrides=folded, keep_all=True)
        return {name: value for name, value in out.items()
                if any(index >= stop for index in reads_from.get(name, ()))}

    with torch.no_grad():
        for index, unit in enumerate(units):
            span = sorted(n.index for n in unit.nodes)
            if span != list(range(unit.layer.index, unit.last.index + 1)):
                continue  # other layers run inside the unit: left as calibrated
            fp_blobs = advance(fp_blobs, unit.layer.index)
            q_blobs = advance(q_blobs, unit.layer.index)
            lq = build_plan(fused, stats, options, choices).layers[unit.name]
            bottom = unit.layer.bottoms[0]
            x_fp, x_q = fp_blobs[bottom], q_blobs[bottom]
            residual_name = _residual_name(unit, fused)
            r_fp = fp_blobs.get(residual_name) if residual_name else None
            r_q = q_blobs.get(residual_name) if residual_name else None
            conv_fp = _fp32_unit(unit, x_fp)
            y_fp = _finish(unit, conv_fp, r_fp)
            change = {}
            report = LayerReport(unit.name, float("nan"), float("nan"))
            if settings.easyquant:
                where = _sample_positions(unit, tuple(y_fp.shape), settings.positions,
                                          settings.seed)
                layer = _Unit(unit, lq, _patches(unit, x_q, where), _at(y_fp, where),
                              None if r_q is None else _at(r_q, where))
                s_w0 = torch.tensor(lq.scale_params, dtype=torch.float32)
                report.cosine_before = cosine_of(layer, lq.scale_in, s_w0)
                # a saturation counter-measure bounds the weights: never scale them up
                factor = WEIGHT_FACTORS.get(lq.saturation_fix, 1.0)
                unit_settings = (replace(settings, high=min(settings.high, 1.0))
                                 if lq.saturation_fix in WEIGHT_FACTORS else settings)
                s_in, s_w = easyquant_unit(layer, unit_settings)
                report.cosine_after = cosine_of(layer, s_in, s_w)
                change.update(input_threshold=qmax(lq.input_unsigned, lq.bits) / s_in,
                              weight_scales=tuple(float(v) / factor for v in s_w))
                lq = replace(lq, scale_in=float(np.float32(s_in)),
                             scale_params=[float(np.float32(v)) for v in s_w])
            if settings.bias_correction:
                conv_q = _quantized_unit(unit, lq, x_q)
                dims = [d for d in range(conv_q.dim()) if d != 1]
                error = (conv_q.double() - conv_fp.double()).mean(dims)
                before = np.zeros(len(error)) if lq.bias_shift is None else np.asarray(
                    lq.bias_shift, np.float64)
                shift = tuple(float(v) for v in before - error.cpu().numpy())
                change["bias_shift"] = shift
                _, bias = folded_weights(unit)
                report.bias_shift = float(error.abs().max() / max(float(bias.abs().max()),
                                                                  1e-12))
            if change:
                choices[unit.name] = replace(choices.get(unit.name, UnitChoice()), **change)
            reports[unit.name] = report
            # through the unit: FP32 in the FP32 net, quantized (unrounded output) in the other
            lq = build_plan(fused, stats, options, choices).layers[unit.name]
            conv_q = _quantized_unit(unit, lq, x_q)
            y_q = _finish(unit, conv_q, r_q)
            stop = unit.last.index + 1
            fp_blobs = {k: v for k, v in fp_blobs.items()
                        if any(i >= stop for i in reads_from.get(k, ()))}
            q_blobs = {k: v for k, v in q_blobs.items()
                       if any(i >= stop for i in reads_from.get(k, ()))}
            fp_blobs[unit.output.name], q_blobs[unit.output.name] = y_fp, y_q
            position = stop
            say(f"  {unit.name} ({index + 1}/{len(units)}): cosine "
                f"{report.cosine_before:.5f} -> {report.cosine_after:.5f}")
    return _single_rounding(fused, stats, options, choices), reports


def _single_rounding(fused: FusedGraph, stats: dict, options: QuantOptions,
                     choices: dict) -> dict:
    """A unit whose INT8 output feeds a single quantized unit writes it at that unit's
    (searched) input threshold, so the value is rounded once."""
    plan = build_plan(fused, stats, options, choices)
    for unit in fused.units:
        choice = choices.get(unit.name)
        if choice is None or choice.input_threshold is None or unit.name not in plan.layers:
            continue
        producers, others = fused.upstream_units(unit.input)
        if len(producers) != 1 or others:
            continue
        producer = producers[0]
        lq = plan.layers.get(producer.name)
        if lq is None or not lq.output_int8:
            continue
        consumers, other_nodes = fused.downstream(producer.output)
        if other_nodes or {c.name for c in consumers} != {unit.name}:
            continue
        if lq.output_unsigned != plan.layers[unit.name].input_unsigned:
            continue
        choices[producer.name] = replace(choices.get(producer.name, UnitChoice()),
                                         output_threshold=choice.input_threshold)
    return choices
