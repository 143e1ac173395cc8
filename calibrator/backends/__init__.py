"""Backends: the object that runs a quantization plan, chosen once from the options.

``make_backend(runtime, target)`` gives a :class:`~calibrator.backends.base.Backend` whose
``simulator(fused, plan)`` runs the plan as that runtime computes it, under the target's
integer arithmetic (:mod:`calibrator.quant.targets`). Runtimes:

``intel`` (:mod:`~calibrator.backends.intel`)
    Intel Caffe's fused MKL-DNN kernels: what the quantized prototxt is for.
``ort`` (:mod:`~calibrator.backends.ort`)
    The ``--export-onnx`` model as ONNX Runtime runs it, integer for integer.
``ncnn`` (:mod:`~calibrator.backends.ncnn`)
    The ``--ncnn`` model as ncnn's x86 INT8 kernels run it.

Adding a runtime is one module with a Backend subclass and one ``register_runtime`` call.
A quantized prototxt records the backend it was made for when that is not the default
(``record_line``/``recorded_backend``), so ``calibrator test`` and ``gate`` run it the same
way.
"""

from __future__ import annotations

import re
from pathlib import Path

from calibrator.backends.base import Backend
from calibrator.backends.intel import IntelBackend
from calibrator.backends.ncnn import NcnnBackend
from calibrator.backends.ort import OrtBackend
from calibrator.errors import CalibratorError
from calibrator.fileio import input_file
from calibrator.quant.targets import DEFAULT_TARGET, Target, get_target, target_names

DEFAULT_RUNTIME = "intel"
_RUNTIMES: dict[str, type[Backend]] = {}
_RECORD = re.compile(r"#\s*calibrator:\s*runtime\s+(\S+)\s+target\s+(\S+)")


def register_runtime(cls: type[Backend]) -> type[Backend]:
    """Class decorator (or call): make ``--runtime cls.name`` build this backend."""
    if not cls.name or cls.name in _RUNTIMES:
        raise ValueError(f"runtime '{cls.name}' registered twice or unnamed")
    _RUNTIMES[cls.name] = cls
    return cls


register_runtime(IntelBackend)
register_runtime(OrtBackend)
register_runtime(NcnnBackend)


def runtime_names() -> tuple[str, ...]:
    return tuple(_RUNTIMES)


def describe_runtimes() -> str:
    return "; ".join(f"{name}: {cls.description}" for name, cls in _RUNTIMES.items())


def make_backend(runtime: str | None = None, target: Target | str | None = None) -> Backend:
    """The backend for ``--runtime`` and ``--target`` (None: the defaults)."""
    runtime = runtime or DEFAULT_RUNTIME
    if runtime not in _RUNTIMES:
        raise CalibratorError(f"--runtime {runtime}: unknown runtime (choose from "
                              f"{', '.join(_RUNTIMES)})")
    try:
        target = get_target(target)
    except ValueError as exc:
        raise CalibratorError(f"--target: {exc}") from None
    return _RUNTIMES[runtime](target)


def record_line(backend: Backend) -> str | None:
    """The comment line a quantized prototxt starts with when it was made for a backend
    other than the default (None for the default: the file stays Intel's plain format)."""
    if backend.name == DEFAULT_RUNTIME and backend.target.name == DEFAULT_TARGET:
        return None
    return f"# calibrator: runtime {backend.name} target {backend.target.name}"


def recorded_backend(prototxt: str | Path) -> tuple[str, str] | None:
    """(runtime, target) a quantized prototxt records in its leading comments, or None."""
    try:  # the first comment lines only, of a regular file (never /dev/zero's one line)
        with open(input_file(prototxt, "prototxt"), "rb") as f:
            head = f.read(1 << 16).decode("utf-8", errors="replace")
    except (OSError, CalibratorError):
        return None
    for line in head.splitlines():
        if not line.startswith("#"):
            break
        match = _RECORD.match(line.strip())
        if match:
            return match.group(1), match.group(2)
    return None


def backend_for(prototxt: str | Path, runtime: str | None = None,
                target: str | None = None) -> Backend:
    """The backend ``--runtime``/``--target`` ask for; what ``prototxt`` records fills in
    those not given; then the defaults."""
    recorded = recorded_backend(prototxt) or (None, None)
    return make_backend(runtime or recorded[0], target or recorded[1])


__all__ = ["Backend", "IntelBackend", "NcnnBackend", "OrtBackend", "DEFAULT_RUNTIME", "register_runtime",
           "runtime_names", "describe_runtimes", "make_backend", "record_line",
           "recorded_backend", "backend_for", "target_names"]
