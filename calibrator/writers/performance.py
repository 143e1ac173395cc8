"""``performance`` (``-p``): ``<model>_dummy.prototxt``, every conv but the first at scale 1.0,
for speed measurements only (Intel's ``-p``)."""

from __future__ import annotations

from pathlib import Path

from calibrator.caffe.prototxt import write_net
from calibrator.quant.params import annotate
from calibrator.quant.scales import LayerQuant, QuantOptions, QuantPlan, eligible_units
from calibrator.writers.base import OutputContext, Writer


def performance_plan(fused) -> QuantPlan:
    options = QuantOptions()
    layers = {}
    for unit in eligible_units(fused, options):
        channels = unit.layer.module.weight_bias()[0].shape[0]
        layers[unit.name] = LayerQuant(unit.name, 1.0, 1.0, [1.0] * channels, True, True, True)
    return QuantPlan(layers, options, {})


class PerformanceWriter(Writer):
    name = "performance"

    def write(self, path: Path, context: OutputContext) -> Path:
        return write_net(path, annotate(context.model.net_param, performance_plan(context.fused)))
