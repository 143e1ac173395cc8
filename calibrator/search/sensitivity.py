"""Which quantized layers hurt most: a cheap, label-free ranking on a small subset.

Measure: quantize ONE layer (the rest FP32) and compare the network's output with FP32's.
For a classifier the output is the score blob feeding the Accuracy layer, compared as the
mean KL divergence between the two softmax distributions; otherwise 1 - cosine similarity
of the output blobs, per sample. Why this measure:
* label-free: it needs no ground truth, so a handful of images suffice and it works for
  ``--metric agreement`` and detection heads alike;
* continuous: unlike top-1 flips it separates layers whose single-layer damage is too small
  to flip any of a few images, which is most of them, so the ranking is not mostly ties;
* isolated: one layer at a time measures that layer's own error (interactions are left to
  the full evaluations of the prefix search, which test prefixes of this ranking together).
Cost: one FP32 pass over the subset keeps the activations live at each layer (references,
no copies); each layer's probe then runs only the graph after its cut, starting from them.
The probes run the backend's per-layer simulation: on a target whose kernels saturate
(``--target avx2``) that arithmetic, so saturation counts in the ranking, and a
``saturation`` dict collects what saturated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrator.quant.scales import QuantPlan


@dataclass
class Probe:
    """A subset of inputs with the FP32 activations at each unit's cut and FP32 outputs."""

    snapshots: dict          # unit name -> blobs live just before the unit's layer runs
    reference: dict          # output blob -> FP32 value
    outputs: list
    classifier: bool = True  # compare as class scores (softmax KL), else by cosine


def output_blobs(metric, net) -> list[str]:
    """The blobs the sensitivity compares: the scores under an Accuracy; for detection the
    raw heads (box offsets and class confidences before NMS, so every prior counts, not
    only the few boxes that survive); else the metric blob."""
    heads = getattr(metric, "heads", None)
    if heads:
        return list(heads)
    node = getattr(metric, "node", None)
    if node is not None and node.bottoms:
        return [node.bottoms[0]]
    return [metric.blob]


def make_probe(net, fused, feeds: dict, outputs: list[str], classifier: bool = True) -> Probe:
    cut_nodes = {u.layer.index: u.name for u in fused.units}
    snapshots = {}

    def snapshot_then_run(node, blobs):
        snapshots[cut_nodes[node.index]] = dict(blobs)
        return node.module(*[blobs[b] for b in node.bottoms])

    with torch.no_grad():  # a hook: every node runs, so every unit gets its snapshot
        reference = net(feeds, outputs=outputs, hook=lambda node, tops: None,
                        overrides={i: snapshot_then_run for i in cut_nodes})
    return Probe(snapshots, {k: v.detach() for k, v in reference.items()}, list(outputs),
                 classifier)


def divergence(reference: torch.Tensor, quantized: torch.Tensor,
               classifier: bool = True) -> float:
    """Mean per-sample KL(softmax(ref) || softmax(q)) for (N, C[, ...]) scores; 1 - cosine
    for anything else."""
    ref = reference.double()
    q = quantized.double()
    if 2 <= ref.dim() <= 4 and ref.shape[0] > 0 and ref.shape[1] > 1 and classifier:
        p_log = torch.log_softmax(ref, dim=1)
        q_log = torch.log_softmax(q, dim=1)
        kl = (p_log.exp() * (p_log - q_log)).sum(1)
        return float(kl.mean())
    a = ref.reshape(ref.shape[0], -1) if ref.dim() else ref.reshape(1, -1)
    b = q.reshape(a.shape)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    return float((1 - cos).mean())


def single_layer_plan(plan: QuantPlan, name: str, layer=None) -> QuantPlan:
    return QuantPlan({name: layer or plan.layers[name]}, plan.options, plan.choices)


def probe_layer(net, fused, probe: Probe, plan: QuantPlan, name: str, backend, layer=None,
                saturation: dict | None = None) -> float:
    """Damage of quantizing only ``name`` (with ``layer``'s scales if given), as
    ``backend``'s per-layer simulation computes it."""
    unit = fused.by_name[name]
    simulator = backend.layer_simulator(fused, single_layer_plan(plan, name, layer),
                                        saturation=saturation)
    with torch.no_grad():
        outputs = net(probe.snapshots[name], start=unit.layer.index,
                      overrides=simulator.overrides, outputs=probe.outputs)
    return sum(divergence(probe.reference[b], outputs[b], probe.classifier)
               for b in probe.outputs)


def rank_layers(net, fused, probe: Probe, plan: QuantPlan, backend,
                saturation: dict | None = None) -> dict[str, float]:
    """Sensitivity of every quantized layer, in layer order."""
    return {name: probe_layer(net, fused, probe, plan, name, backend, saturation=saturation)
            for name in [u.name for u in fused.units if u.name in plan.layers]}
