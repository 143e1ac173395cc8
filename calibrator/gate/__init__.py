"""``calibrator gate``: the nightly accuracy gate. FP32 and simulated INT8 on the same
batches, a verdict per model x INT8 prototxt x metric (threshold, optional baseline), and the
CI outputs: results JSON, JUnit XML, a JSON-lines history and its trend plot.

Modules: :mod:`~calibrator.gate.config` (what to check: command line or JSON/YAML file),
:mod:`~calibrator.gate.run` (the passes and verdicts), :mod:`~calibrator.gate.junit`,
:mod:`~calibrator.gate.history` (history lines and the plot)."""

from calibrator.gate.config import GateConfig, MetricSpec, ModelSpec, read_config
from calibrator.gate.run import GateResult, run_gate

__all__ = ["GateConfig", "GateResult", "MetricSpec", "ModelSpec", "read_config", "run_gate"]
