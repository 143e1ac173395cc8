"""Reuse of earlier evaluations' work where a plan differs only in later layers.

A full evaluation runs the whole net over every batch, though the search's later plans often
differ from one already evaluated only near the end of the net (reverting or adjusting its
most sensitive layers, on MobileNetV2 the last bottlenecks). :class:`PrefixReuse` keeps, per
batch, the blobs alive at a few *cuts* (node indices where the forward may stop and resume:
no fused unit spans one) from the evaluations run so far, each stored under a fingerprint
of the plan up to the cut (:func:`prefix_fingerprint`); an evaluation whose plan has the
same fingerprint at a cut resumes there from the stored blobs (the deepest such cut)
instead of running the nodes before it.

The values are exact: the forward stopped at a cut returns each live blob's values (an INT8
unit's stored integers decoded as any reader other than the next INT8 unit gets them,
which ``quant.simulate.round_trip_exact`` proves that unit reads to the same integers), and
what runs after a cut depends only on those blobs and on the plan's entries of the units
after it; the units before a cut depend only on their own entries and on the formats
``quant.simulate.intel_formats`` derives forwards in node order, all within the
fingerprint. ``tests/test_search_reuse.py`` holds a resumed evaluation to the whole one, bit
for bit, for plans that differ before, at and after each cut.

The stored blobs are float32 values, at most ``budget`` bytes for all cuts over all the
evaluation's batches: the cuts are chosen at about half, three quarters and nine tenths of
the net's work (convolution multiply-adds, other nodes their outputs), the deepest first
while they fit. One entry per cut: a new plan's blobs replace an older plan's."""

from __future__ import annotations

from typing import Callable

from calibrator.graph.net import Node
from calibrator.limits import elements
from calibrator.quant.fusion import FusedGraph
from calibrator.search.evaluator import plan_fingerprint

#: default memory for the stored blobs (all cuts, all batches)
BUDGET = 64 * 2 ** 20
#: the share of the net's work before each cut sought (deepest first)
TARGETS = (0.9, 0.75, 0.5)


def _work(node: Node) -> float:
    """Multiply-adds of a convolution or inner product, else its outputs' size."""
    size = sum(elements(shape) for shape in node.top_shapes)
    if node.type in ("Convolution", "InnerProduct") and node.bottom_shapes:
        bottom = node.bottom_shapes[0]
        per_output = elements(bottom[1:]) if node.type == "InnerProduct" else \
            bottom[1] // max(getattr(node.module, "group", 1), 1) * \
            elements(getattr(node.module, "kernel", (1, 1)))
        return float(size) * per_output
    return float(size)


def live_blobs(nodes: list[Node], cut: int, outputs) -> list[str]:
    """The blobs that the nodes from ``cut`` on read before writing them, and the
    ``outputs`` none of them writes: what a forward resumed at ``cut`` needs."""
    needed, written = [], set()
    for node in nodes[cut:]:
        for bottom in node.bottoms:
            if bottom not in written and bottom not in needed:
                needed.append(bottom)
        written.update(node.tops)
    needed += [name for name in outputs if name not in written and name not in needed]
    return needed


def valid_cuts(fused: FusedGraph) -> list[int]:
    """Node indices where a forward may stop and resume: inside no fused unit's span (its
    layer, folded and fused nodes, an absorbed add, and every node between them)."""
    nodes = fused.net.nodes
    inside = set()
    for unit in fused.units:
        indices = [n.index for n in unit.nodes]
        inside.update(range(min(indices) + 1, max(indices) + 1))
    return [c for c in range(1, len(nodes)) if c not in inside]


def prefix_fingerprint(plan, fused: FusedGraph, cut: int) -> str:
    """``search.evaluator.plan_fingerprint`` of the plan's entries of the units before
    ``cut`` (an entry of no unit kept, to be safe)."""
    def before(name: str) -> bool:
        unit = fused.by_name.get(name)
        return unit is None or unit.layer.index < cut

    return plan_fingerprint(plan, before, salt=cut)


class PrefixReuse:
    """The stored blobs at the cuts, and the forward that resumes from them."""

    def __init__(self, fused: FusedGraph, iterations: int, outputs, budget: int = BUDGET):
        self.fused = fused
        self.net = fused.net
        self.outputs = list(outputs)
        nodes = self.net.nodes
        work = [_work(node) for node in nodes]
        total = sum(work) or 1.0
        before, running = [], 0.0
        for w in work:
            before.append(running / total)
            running += w
        live = {c: live_blobs(nodes, c, self.outputs) for c in valid_cuts(fused)}
        stored = {c: self._bytes(names) * iterations for c, names in live.items()}
        cuts, left = [], budget
        for target in TARGETS:
            fitting = [c for c in live if before[c] <= target and c not in cuts
                       and stored[c] <= left]
            if fitting:
                cut = max(fitting, key=lambda c: before[c])
                cuts.append(cut)
                left -= stored[cut]
        self.cuts = sorted(cuts)
        self.live = {c: live[c] for c in self.cuts}
        self.stored_bytes = sum(stored[c] for c in self.cuts)   # at most, all batches
        self.entries: dict[int, tuple[str, dict[int, dict]]] = {}
        self.resumed = 0    # batches resumed at a cut (what the tests count)

    def _bytes(self, names: list[str]) -> int:
        """Bytes of one batch of these blobs (float32)."""
        shapes = self.net.blob_shapes
        return sum(4 * elements(shapes[name]) for name in names if name in shapes)

    def runner(self, plan, overrides) -> Callable[[int, dict, list], dict]:
        """``run(batch index, feeds, outputs)``: the net under ``overrides`` (``plan``'s),
        resumed at the deepest cut stored for this batch under the same prefix, storing the
        blobs at the cuts after it."""
        keys = {c: prefix_fingerprint(plan, self.fused, c) for c in self.cuts}

        def run(index: int, feeds: dict, outputs) -> dict:
            start, blobs = 0, feeds
            for cut in reversed(self.cuts):
                key, stored = self.entries.get(cut, (None, {}))
                if key == keys[cut] and index in stored:
                    start, blobs = cut, dict(stored[index])
                    self.resumed += 1
                    break
            for cut in self.cuts:
                if cut <= start:
                    continue
                blobs = self.net(blobs, start=start, stop=cut, outputs=self.live[cut],
                                 overrides=overrides)
                key, stored = self.entries.get(cut, (None, {}))
                if key != keys[cut]:
                    stored = {}
                    self.entries[cut] = (keys[cut], stored)
                stored[index] = dict(blobs)
                start = cut
            return self.net(blobs, start=start, outputs=outputs, overrides=overrides)

        return run
