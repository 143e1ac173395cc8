"""The fused view of a TEST net, as Intel Caffe (MKL-DNN) fuses it before running INT8.

* BatchNorm (+ Scale) right after a Convolution is folded into its weights and bias;
* a ReLU after the (folded) Convolution is fused, its negative slope kept;
* a Convolution absorbs a 2-input Eltwise by Intel's ``Net::CompilationRuleConvSumFusion``
  (``src/caffe/net.cpp``): the Eltwise is the layer right after the conv (after the folded
  BatchNorm/Scale/ReLU), the conv's output has no other reader, and no Eltwise input is one of
  the first n-1 tops of a Split with n > 2 tops (Caffe's InsertSplits gives a blob read by n
  layers a Split whose tops follow the readers' order: the Eltwise must be the blob's last
  reader when it has more than two). The other input is the residual. Like Intel, any
  operation and any coefficients are absorbed: the kernel computes
  ``coeff(1) * conv + coeff(0) * residual`` (``mkldnn_convolution_layer.cpp`` :340-347,
  :385-392; a PROD or MAX becomes a sum, coefficients follow the residual, not the Eltwise's
  bottom order), noted in ``FusedGraph.intel_notes``. A conv whose ReLU was fused before the
  Eltwise keeps it *after* the sum (Intel's ReLU post-op follows the sum post-op). A ReLU
  right after the Eltwise is absorbed too, as a plain ReLU (Intel only sets ``relu: true``),
  until the first absorbed Eltwise not followed by a ReLU: from then on Intel absorbs none
  (``has_relu_flag`` is never reset).

A fusion only happens when every intermediate tensor has that single consumer. Calibration
statistics and scales describe the fused tensors: a unit's output is what its last node writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from calibrator.graph.net import CaffeNet, Node

CONV_TYPES = ("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution")
#: Layers that run on INT8 values between quantized layers (Intel's int8_layers).
INT8_PASS_THROUGH = ("ReLU", "Split", "Concat", "Pooling", "Eltwise")


@dataclass
class BlobRef:
    """One version of a blob: the node that wrote it (-1: fed from outside) and its name."""

    producer: int
    name: str

    @property
    def key(self) -> str:
        return f"{self.producer}:{self.name}"


@dataclass
class FusedUnit:
    """A Convolution or InnerProduct with everything fused into it."""

    name: str                      # the layer that carries quantization_param
    kind: str                      # "conv" or "fc"
    layer: Node
    input: BlobRef
    folded: list[Node] = field(default_factory=list)   # BatchNorm / Scale
    relu: Node | None = None        # ReLU fused after the conv (or after the absorbed add)
    eltwise: Node | None = None     # absorbed Eltwise (any operation: Intel sums)
    residual: BlobRef | None = None
    output: BlobRef | None = None   # the fused tensor
    pre_relu: Node | None = None    # a ReLU between the conv and its absorbed Eltwise

    @property
    def relu_slope(self) -> float | None:
        """Slope of the ReLU Intel's kernel applies last: a fused ReLU layer, or Intel's
        ``convolution_param.relu`` flag of an already compiled net; None without one.
        With an absorbed Eltwise the ReLU follows the sum: the pre-sum ReLU's slope (copied
        by ``CompilationRuleConvReluFusion``), else 0 for a ReLU after the sum (the sum
        fusion only sets ``relu: true``)."""
        if self.eltwise is not None and (self.pre_relu or self.relu) is not None:
            if self.pre_relu is not None:
                return float(self.pre_relu.param.relu_param.negative_slope)
            return 0.0
        if self.relu is not None:
            return float(self.relu.param.relu_param.negative_slope)
        return getattr(self.layer.module, "fused_relu_slope", None)

    @property
    def differs_from_net(self) -> bool:
        """True when Intel's fused kernel computes something else than the net's layers: an
        absorbed PROD/MAX, coefficients, a ReLU moved after the sum, a leaky ReLU after
        the sum made plain. FP32 reference passes run such a unit layer by layer."""
        if self.eltwise is None:
            return False
        param = self.eltwise.param.eltwise_param
        leaky_after = (self.relu is not None
                       and self.relu.param.relu_param.negative_slope != 0)
        return (param.operation != type(param).SUM or any(c != 1.0 for c in param.coeff)
                or self.pre_relu is not None or leaky_after)

    @property
    def sum_coefficients(self) -> tuple[float, float]:
        """(residual, conv) coefficients of the absorbed Eltwise as Intel's kernel uses
        them: ``coeff(0)`` for the residual and ``coeff(1)`` for the conv when exactly two
        are given, else 1 and 1 (``mkldnn_convolution_layer.cpp`` :340-347)."""
        coeff = list(self.eltwise.param.eltwise_param.coeff) if self.eltwise else []
        return (float(coeff[0]), float(coeff[1])) if len(coeff) == 2 else (1.0, 1.0)

    @property
    def output_unsigned(self) -> bool:
        """Intel: output u8 iff a ReLU with slope 0 is fused."""
        return self.relu_slope == 0.0

    @property
    def nodes(self) -> list[Node]:
        extra = [n for n in (self.pre_relu, self.eltwise, self.relu) if n is not None]
        return [self.layer] + self.folded + extra

    @property
    def last(self) -> Node:
        return max(self.nodes, key=lambda n: n.index)


class FusedGraph:
    """Units in layer order plus the blob-version bookkeeping the later stages need."""

    def __init__(self, net: CaffeNet, units: list[FusedUnit], version_of: dict):
        self.net = net
        self.units = units
        self.by_name = {u.name: u for u in units}
        self._version_of = version_of  # (node index, bottom name) -> BlobRef read there
        self.unit_of_node = {n.index: u for u in units for n in u.nodes}
        self.unit_by_output = {u.output.key: u for u in units}
        #: where Intel's fusion computes something else than the net says (one line each)
        self.intel_notes: list[str] = []
        #: (unit, per-channel, bits, factor) -> (weights' version, weight scales), the
        #: plans' cache (quant.scales)
        self.weight_scales: dict = {}
        #: unit -> (weights' version, folded (weight, bias)): the FP32 units' cache
        #: (quant.folding.folded_once)
        self.folded: dict = {}
        #: units that stay FP32 whatever the options, and why (quant.scales.kept_fp32)
        self.kept_fp32: dict[str, str] | None = None

    def input_of(self, node: Node, bottom: int = 0) -> BlobRef:
        return self._version_of[(node.index, node.bottoms[bottom])]

    def consumers(self, ref: BlobRef) -> list[Node]:
        """Nodes reading this blob version (outside the unit that produced it)."""
        out = []
        for node in self.net.nodes[ref.producer + 1:]:
            if ref.name in node.bottoms and self._version_of.get(
                    (node.index, ref.name)) == ref:
                unit = self.unit_of_node.get(node.index)
                producer_unit = self.unit_by_output.get(ref.key)
                if unit is not None and unit is producer_unit:
                    continue
                out.append(node)
        return out

    def upstream_units(self, ref: BlobRef) -> tuple[list[FusedUnit], list[BlobRef]]:
        """Quantized units reached from ``ref`` going up through the INT8 pass-through
        layers, and the non-quantized blob versions where the walk stopped."""
        units, others, stack, seen = [], [], [ref], set()
        while stack:
            current = stack.pop()
            if current.key in seen:
                continue
            seen.add(current.key)
            unit = self.unit_by_output.get(current.key)
            if unit is not None:
                units.append(unit)
                continue
            if current.producer < 0:
                others.append(current)
                continue
            node = self.net.nodes[current.producer]
            if node.type in INT8_PASS_THROUGH and node.index not in self.unit_of_node:
                stack.extend(self.input_of(node, i) for i in range(len(node.bottoms)))
            else:
                others.append(current)
        return units, others

    def downstream(self, ref: BlobRef) -> tuple[list[FusedUnit], list[Node]]:
        """Units reached from ``ref`` going down through pass-through layers, and the
        other (non-INT8) consumers met on the way."""
        units, others, stack, seen = [], [], [ref], set()
        while stack:
            current = stack.pop()
            if current.key in seen:
                continue
            seen.add(current.key)
            for node in self.consumers(current):
                unit = self.unit_of_node.get(node.index)
                if unit is not None:  # its layer, or the residual input of its absorbed add
                    units.append(unit)
                elif node.type in INT8_PASS_THROUGH:
                    stack.extend(BlobRef(node.index, t) for t in node.tops)
                else:
                    others.append(node)
        return units, others


def _versions(net: CaffeNet) -> dict:
    """Which version each node reads for each bottom."""
    latest = {name: BlobRef(-1, name) for name in net.input_shapes}
    version_of = {}
    for node in net.nodes:
        for bottom in node.bottoms:
            if bottom in latest:
                version_of[(node.index, bottom)] = latest[bottom]
        for top in node.tops:
            latest[top] = BlobRef(node.index, top)
    return version_of


def _sole_consumer(net: CaffeNet, version_of: dict, ref: BlobRef) -> Node | None:
    readers = [n for n in net.nodes[ref.producer + 1:]
               if ref.name in n.bottoms and version_of.get((n.index, ref.name)) == ref]
    if len(readers) != 1 or ref.name in net.output_names and _is_final(net, ref):
        return None
    return readers[0]


def _is_final(net: CaffeNet, ref: BlobRef) -> bool:
    """True if this version is the last one of a net output (someone outside reads it)."""
    return all(ref.name not in n.tops for n in net.nodes[ref.producer + 1:])


def _foldable(node: Node) -> bool:
    """BatchNorm/Scale can be folded when they are a per-channel affine map."""
    try:
        node.module.channel_affine()
    except Exception:  # LayerError: batch statistics, a second bottom, a non-channel axis
        return False
    return True


def _readers(net: CaffeNet, version_of: dict, ref: BlobRef) -> list[tuple[int, int]]:
    """(node index, bottom position) of every read of this blob version, in layer order."""
    return [(n.index, i) for n in net.nodes[ref.producer + 1:]
            for i, b in enumerate(n.bottoms)
            if b == ref.name and version_of.get((n.index, b)) == ref]


def _split_blocks_fusion(net: CaffeNet, version_of: dict, eltwise: Node, refs) -> bool:
    """Intel's rule: no fusion when an Eltwise input is one of the first n-1 tops of a Split
    with n > 2 tops, i.e. the blob has more than two reads and this is not the last one."""
    for position, ref in enumerate(refs):
        reads = _readers(net, version_of, ref)
        if len(reads) > 2 and reads[-1] != (eltwise.index, position):
            return True
    return False


def analyze(net: CaffeNet, *, quantize_fc: bool = False) -> FusedGraph:
    """Find every fusable Convolution (and InnerProduct with ``quantize_fc``)."""
    version_of = _versions(net)
    units: list[FusedUnit] = []
    claimed: set[int] = set()
    kinds = {t: "conv" for t in CONV_TYPES}
    if quantize_fc:
        kinds["InnerProduct"] = "fc"
    for node in net.nodes:
        if node.type not in kinds or node.index in claimed or len(node.bottoms) != 1:
            continue
        unit = FusedUnit(node.name, kinds[node.type], node, version_of[(node.index,
                                                                        node.bottoms[0])])
        current = BlobRef(node.index, node.tops[0])
        follower = _sole_consumer(net, version_of, current)
        if follower is not None and follower.type == "BatchNorm" and _foldable(follower):
            unit.folded.append(follower)
            current = BlobRef(follower.index, follower.tops[0])
            follower = _sole_consumer(net, version_of, current)
            if follower is not None and follower.type == "Scale" and _foldable(follower):
                unit.folded.append(follower)
                current = BlobRef(follower.index, follower.tops[0])
                follower = _sole_consumer(net, version_of, current)
        if follower is not None and follower.type == "ReLU":
            unit.relu = follower
            current = BlobRef(follower.index, follower.tops[0])
        unit.output = current
        units.append(unit)
        claimed.update(n.index for n in unit.nodes)
    by_output = {u.output.key: u for u in units}
    notes: list[str] = []
    has_relu_flag = True  # Intel: set once, cleared by the first absorbed sum without a ReLU
    for node in net.nodes:
        if node.type != "Eltwise" or len(node.bottoms) != 2:
            continue
        refs = [version_of.get((node.index, b)) for b in node.bottoms]
        if any(r is None for r in refs) or refs[0] == refs[1]:
            continue
        if _split_blocks_fusion(net, version_of, node, refs):
            continue
        candidates = [(u, i) for i, u in enumerate(by_output.get(r.key) for r in refs)
                      if u is not None and u.kind == "conv" and u.eltwise is None
                      and _sole_consumer(net, version_of, u.output) is node]
        if not candidates:
            continue
        follower = _sole_consumer(net, version_of, BlobRef(node.index, node.tops[0]))
        if follower is None or follower.type != "ReLU":
            has_relu_flag = False
        adjacent = [(u, i) for u, i in candidates if u.last.index == node.index - 1]
        if not adjacent:
            continue
        unit, position = adjacent[0]
        if unit.relu is not None:            # ReLU(conv) + r becomes ReLU(conv + r)
            unit.pre_relu, unit.relu = unit.relu, None
            notes.append(f"'{unit.name}': Intel applies the ReLU '{unit.pre_relu.name}' after "
                         f"the Eltwise '{node.name}' it absorbs (ReLU(conv + residual))")
        unit.eltwise = node
        unit.residual = refs[1 - position]
        param = node.param.eltwise_param
        if param.operation != type(param).SUM:
            notes.append(f"'{unit.name}': Intel computes the Eltwise '{node.name}' "
                         f"({type(param).EltwiseOp.Name(param.operation)}) as a sum")
        elif len(param.coeff) == 2 and position == 0 and param.coeff[0] != param.coeff[1]:
            notes.append(f"'{unit.name}': Intel applies coeff(0) of '{node.name}' to the "
                         "residual (bottom 1), coeff(1) to the conv (bottom 0)")
        current = BlobRef(node.index, node.tops[0])
        if (has_relu_flag and follower is not None and follower.type == "ReLU"
                and follower.index == node.index + 1):
            unit.relu = follower
            current = BlobRef(follower.index, follower.tops[0])
        del by_output[unit.output.key]
        unit.output = current
        by_output[current.key] = unit
    fused = FusedGraph(net, units, version_of)
    fused.intel_notes = notes
    return fused
