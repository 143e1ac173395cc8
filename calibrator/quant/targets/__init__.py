"""Targets: which integer arithmetic the INT8 simulation reproduces.

The simulation (``calibrator.quant.simulate``) quantizes each unit's input and weights and
then *accumulates* their products; only that accumulation differs between CPUs. A target
(:class:`~calibrator.quant.targets.base.Target`) replaces the exact int32 convolution with
what a family of real kernels computes. One class per family, one registry entry per name:
adding a target is one small module and one ``register_target`` call.

``vnni`` (default: what Intel Caffe's writers assume)
    Exact int32 accumulation of u8 x s8 (or s8 x s8) products: ``VPDPBUSD`` (AVX512-VNNI,
    AVX-VNNI) adds four exact products into int32 (its ``S`` form saturates the int32
    accumulator only, which 8-bit convolutions never reach). Same as the simulation without
    a target.
``generic``
    The same exact int32 arithmetic, named for what it stands for: any kernel that widens
    the 8-bit operands to 16/32 bits before multiplying (reference C loops, OpenCV/ncnn
    generic paths, ARM ``SDOT``/``UDOT``, GPUs' ``dp4a``, oneDNN's depthwise kernels).
``avx2``, ``avx512bw``, ``avx2-onednn``, ``avx512bw-onednn``
    x86 without VNNI: u8 x s8 product pairs saturate to int16 (see
    :mod:`calibrator.quant.targets.pairs`).
``int7`` (:mod:`calibrator.quant.targets.narrow`)
    ARM-style 7-bit operands (e.g. kernels that keep products of two 7-bit values in int16,
    or ``--bits 7`` runtimes): weights limited to [-64, 63] (the scales map max|W| to 63) and
    activations to u7 [0, 127] / s7 [-64, 63]; the accumulation itself is exact. A plan built
    with ``--bits 7`` is unchanged by it; an 8-bit plan shows what clamping to 7 bits costs.
``auto``
    The local CPU from /proc/cpuinfo: ``avx512_vnni`` or ``avx_vnni`` -> vnni, else
    ``avx512bw`` -> avx512bw, else ``avx2`` -> avx2, else generic.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from calibrator.quant.targets.base import (COUNTERMEASURES, WEIGHT_FACTORS, SaturationRecord,
                                           Target, apply_countermeasure)
from calibrator.quant.targets.narrow import NarrowOperands
from calibrator.quant.targets.pairs import OneDnnPairs, PairSaturating, pair_layout

_REGISTRY: dict[str, Callable[[], Target]] = {}
DEFAULT_TARGET = "vnni"


def register_target(name: str, factory: Callable[[], Target]) -> None:
    """Make ``get_target(name)`` build ``factory()`` (a fresh Target each time)."""
    if name in _REGISTRY or name == "auto":
        raise ValueError(f"target '{name}' registered twice")
    _REGISTRY[name] = factory


def target_names() -> tuple[str, ...]:
    """Every registered target and ``auto``, for command-line choices."""
    return tuple(_REGISTRY) + ("auto",)


register_target("vnni", lambda: Target(
    "vnni", "exact int32 accumulation (AVX512-VNNI / AVX-VNNI VPDPBUSD; Intel Caffe's "
            "assumption)"))
register_target("generic", lambda: Target(
    "generic", "exact int32 accumulation (operands widened before multiplying: reference "
               "kernels, ARM dot products, GPUs)"))
register_target("avx2", lambda: PairSaturating(
    "avx2", "AVX2 without VNNI, ONNX Runtime MLAS rules: u8 x s8 pairs saturate to int16, "
            "s8 inputs shifted by 128"))
register_target("avx512bw", lambda: PairSaturating(
    "avx512bw", "AVX-512BW without VNNI, MLAS rules (same arithmetic as avx2)"))
register_target("avx2-onednn", lambda: OneDnnPairs(
    "avx2-onednn", "AVX2 without VNNI, oneDNN convolution rules: u8 pairs saturate, s8 "
                   "inputs halve the weights"))
register_target("avx512bw-onednn", lambda: OneDnnPairs(
    "avx512bw-onednn", "AVX-512BW without VNNI, oneDNN convolution rules"))
register_target("int7", lambda: NarrowOperands(
    "int7", "7-bit operands (weights [-64, 63], activations u7/s7), exact accumulation", 7))


def get_target(name: str | Target | None, cpuinfo: str | None = None) -> Target:
    """A fresh Target by name (``auto`` detects the local CPU); None gives the default."""
    if isinstance(name, Target):
        return name
    name = (name or DEFAULT_TARGET).lower()
    if name == "auto":
        name = detect_target(cpuinfo)
    if name not in _REGISTRY:
        raise ValueError(f"unknown target '{name}' (choose from {', '.join(target_names())})")
    return _REGISTRY[name]()


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo (or of the given text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        match = re.match(r"\s*(flags|Features)\s*:\s*(.*)", line)
        if match:
            return set(match.group(2).split())
    return set()


def detect_target(cpuinfo: str | None = None) -> str:
    """The target name for a CPU's flags (the local one unless ``cpuinfo`` is given)."""
    flags = cpu_flags(cpuinfo)
    if {"avx512_vnni", "avx_vnni"} & flags:
        return "vnni"
    if "avx512bw" in flags:
        return "avx512bw"
    if "avx2" in flags:
        return "avx2"
    return "generic"


def countermeasure_helps(fix: str, target: str | Target) -> bool:
    """Whether ``fix`` removes pair saturation on ``target``."""
    return fix in get_target(target).countermeasures


def saturating_layers(simulator, target: str | Target) -> list[str]:
    """Quantized units of an ``Int8Simulator`` whose pairs can saturate on ``target``."""
    target = get_target(target)
    return [name for name, kernel in simulator.kernels.items()
            if target.can_saturate(kernel)]


def can_saturate(kernel, target: str | Target, input_max: float | None = None) -> bool:
    return get_target(target).can_saturate(kernel, input_max)


__all__ = ["Target", "PairSaturating", "OneDnnPairs", "NarrowOperands", "SaturationRecord",
           "COUNTERMEASURES", "WEIGHT_FACTORS", "DEFAULT_TARGET", "register_target",
           "target_names", "get_target", "cpu_flags", "detect_target",
           "countermeasure_helps", "saturating_layers", "can_saturate",
           "apply_countermeasure", "pair_layout"]
