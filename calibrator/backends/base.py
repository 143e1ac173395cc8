"""The Backend contract: the object that runs a quantization plan.

A backend is chosen once from the options (``--runtime`` names it, ``--target`` gives the
integer arithmetic of its kernels) and handed to every stage that runs INT8: calibration,
the search's full evaluations and per-layer probes, ``calibrator test``, ``gate`` and
``verify``. It answers one question — *what does this runtime compute for this plan?* — as a
simulator whose ``overrides`` run a :class:`~calibrator.graph.net.CaffeNet` the runtime's
way (see :class:`~calibrator.quant.simulate.Int8Simulator`)."""

from __future__ import annotations

from calibrator.quant.simulate import Int8Simulator
from calibrator.quant.targets import Target, get_target


class Backend:
    """One runtime under one target. Subclasses implement :meth:`simulator`."""

    name = ""
    description = ""

    def __init__(self, target: Target | str | None = None):
        self.target: Target = get_target(target)

    def simulator(self, fused, plan, *, saturation: dict | None = None) -> Int8Simulator:
        """What a full evaluation of ``plan`` runs."""
        raise NotImplementedError

    def layer_simulator(self, fused, plan, *, saturation: dict | None = None
                        ) -> Int8Simulator:
        """What the per-layer probes run (one or a few units quantized): Intel's fused
        kernels under the target's arithmetic, whatever the runtime."""
        return Int8Simulator(fused, plan, target=self.target,
                             saturation=saturation)

    def record(self) -> dict:
        """What a quantized file records it was made for (see ``recorded_backend``)."""
        return {"runtime": self.name, "target": self.target.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target.name!r})"
