"""A Caffe NetParameter as a PyTorch module that runs its layers in prototxt order.

Blobs are named as in Caffe. In-place layers (top == bottom) overwrite the blob name, so
every *version* of a blob is identified by the node that produced it; hooks see each node's
tops as they are produced, which is where calibration hangs its observers and the INT8
simulation its fake-quantizers. Blobs are freed after their last use unless asked for, and
an activation overwrites a bottom nobody reads after it (``CaffeNet._overwritable``)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from calibrator.caffe.types import EXTERNAL_TYPES, SHAPED_TYPES
from calibrator.errors import CalibratorError, LayerError, shorten
from calibrator.graph.layer import Layer, Shape, layer_class
from calibrator.limits import FLOAT32, check_blob, check_memory, elements

Hook = Callable[["Node", tuple], "tuple | None"]


def channels_last(value: torch.Tensor) -> torch.Tensor:
    """A 4-D float CPU blob in NHWC memory (the same tensor, another stride order): oneDNN's
    CPU convolutions run about twice as fast on it (a depthwise 3x3 on 50x144x56x56: 19 ms
    NCHW, 9 ms NHWC), and convolutions and elementwise layers keep the layout, so one
    conversion of the input carries the whole net. Values are those of NCHW up to float32
    summation order in the convolutions (exact for the INT8 simulation's integers)."""
    if (value.dim() == 4 and value.is_floating_point() and value.device.type == "cpu"
            and not value.is_contiguous(memory_format=torch.channels_last)):
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _storage_users(x: torch.Tensor) -> int | None:
    """How many tensors share ``x``'s memory (views included), plus the storage object asked
    (None where this torch cannot tell)."""
    try:
        return torch._C._storage_Use_Count(x.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):  # pragma: no cover (another torch)
        return None


#: what :func:`_storage_users` says of a tensor whose memory nobody else shares
_SOLE = _storage_users(torch.empty(1))

class Encoded(NamedTuple):
    """A top an override stores in a code of its own (the INT8 simulation: the stored
    integers, not their real values): ``code.decode(value)`` gives the blob's values (it may
    work in place on ``value``)."""

    value: torch.Tensor
    code: object


class Blobs(dict):
    """The blobs of one forward pass, by name. ``owned``: while an override runs, its first
    bottom's name when nobody reads that tensor after the node (the override may overwrite
    it), else None; a copy of the dict (``dict(blobs)``) carries no such permission.

    ``codes``: the blobs held in an override's code (:class:`Encoded`), by name. Only an
    override that says it reads codes (its attribute ``reads_codes``) sees them as they are;
    for every other reader (a layer, a hook, the caller) the forward decodes them first."""

    owned: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codes: dict[str, object] = {}

    def decoded(self, name: str) -> torch.Tensor:
        """Blob ``name``'s values, decoding it for good (in place) if it is held in a code."""
        code = self.codes.pop(name, None)
        if code is not None:
            self[name] = code.decode(self[name])
        return self[name]


def in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened in the order its elements lie in memory: a view, no copy, for a dense
    tensor in any dimension order (a channels-last blob; ``reshape(-1)`` would copy it into
    NCHW order). A histogram does not depend on the order."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    permuted = x.permute(*order)
    return permuted.view(-1) if permuted.is_contiguous() else x.reshape(-1)


@dataclass
class Node:
    """One layer of the graph with its connections and inferred top shapes."""

    index: int
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    module: Layer
    param: object  # caffe_pb2.LayerParameter
    bottom_shapes: list[Shape] = field(default_factory=list)
    top_shapes: list[Shape] = field(default_factory=list)


def _check_external_shape(param, top: str, shape) -> None:
    """A blob fed from outside (data layer, Input): positive dimensions that fit in memory."""
    if len(shape) == 0 or any(int(d) < 1 for d in shape):
        raise LayerError(param.name, param.type,
                         f"top '{shorten(top)}' has shape {tuple(shape)}: every dimension "
                         "must be at least 1")
    check_blob(shape, f"its top '{shorten(top)}'",
               lambda m: LayerError(param.name, param.type, m))


def fit_blob(array: np.ndarray, expected: Shape) -> np.ndarray | None:
    """``array`` reshaped to ``expected`` if Caffe would accept it, else None.

    Caffe accepts a legacy 4-D (num, channels, height, width) blob for a shape with fewer
    axes when the extra leading axes are 1; we accept any shape whose non-unit axes agree."""
    if tuple(array.shape) == tuple(expected):
        return array
    if array.size != int(np.prod(expected, dtype=np.int64)):
        return None
    squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
    if squeeze(array.shape) == squeeze(expected):
        return array.reshape(expected)
    return None


def _on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow twin of ``module`` whose tensors (parameters, buffers, tensor attributes,
    those of its submodules) are on the meta device; the module itself is left as it is."""
    twin = copy.copy(module)
    twin._parameters = {k: None if v is None else v.to("meta")
                        for k, v in module._parameters.items()}
    twin._buffers = {k: None if v is None else v.to("meta") for k, v in module._buffers.items()}
    twin._modules = {k: None if v is None else _on_meta(v) for k, v in module._modules.items()}
    for name, value in vars(module).items():
        if isinstance(value, torch.Tensor):
            twin.__dict__[name] = value.to("meta")
    return twin


def _run_symbolic(node: Node):
    """The node's tops as tensors on the meta device (shapes only: no arithmetic, no
    memory, no set-up cost), or None where the layer cannot run there: it reads values
    (Accuracy's label check, DetectionOutput's boxes) or holds tensors that are neither
    parameters nor buffers. (Fake tensors, tried before meta, ran no layer that meta
    cannot and cost about two seconds on first use; meta kernels cost as much on the first
    elementwise op, which imports torch's compiler stack: the layers that state a rule,
    :meth:`Layer.top_shapes`, never come here.)"""
    inputs = tuple(torch.empty(s, device="meta") for s in node.bottom_shapes)
    try:
        with torch.no_grad():
            tops = tuple(_on_meta(node.module)(*inputs))
    except LayerError:
        raise
    except Exception:  # data-dependent or not traceable: the caller runs real zeros
        return None
    if not all(isinstance(t, torch.Tensor) and t.is_meta for t in tops):
        return None
    return tops


class CaffeNet(torch.nn.Module):
    """The graph of one phase of a network.

    ``input_shapes`` gives the shape of every blob fed from outside (data-layer tops, Input
    layers may be overridden); ``weights`` maps layer names to learned blobs.
    """

    def __init__(self, net_param, weights: Mapping[str, Sequence[np.ndarray]] | None = None,
                 input_shapes: Mapping[str, Shape] | None = None, *, source: str = "",
                 require_weights: bool = True):
        super().__init__()
        self.net_param = net_param
        self.source = source
        self.nodes: list[Node] = []
        self.input_shapes: dict[str, Shape] = {}
        self.data_layers = []  # LayerParameters of the layers fed from outside
        weights = weights or {}
        input_shapes = dict(input_shapes or {})
        shapes: dict[str, Shape] = {}
        modules = torch.nn.ModuleList()
        used_weights = set()

        for param in net_param.layer:  # name a layer we cannot run before anything else
            if param.type not in EXTERNAL_TYPES and layer_class(param.type) is None:
                raise LayerError(param.name, param.type, f"unknown layer type '{param.type}'")
        for param in net_param.layer:
            if param.type in EXTERNAL_TYPES:
                self.data_layers.append(param)
                for i, top in enumerate(param.top):
                    shape = input_shapes.get(top)
                    if shape is None and param.type in SHAPED_TYPES:
                        declared = (param.input_param.shape if param.type == "Input"
                                    else param.dummy_data_param.shape)
                        if len(declared):
                            dims = declared[min(i, len(declared) - 1)].dim
                            shape = tuple(int(d) for d in dims)
                    if shape is None:
                        raise LayerError(param.name, param.type,
                                         f"no shape known for its top '{shorten(top)}'")
                    _check_external_shape(param, top, shape)
                    shapes[top] = tuple(shape)
                    self.input_shapes[top] = tuple(shape)
                continue
            cls = layer_class(param.type)
            if cls is None:
                raise LayerError(param.name, param.type, f"unknown layer type '{param.type}'")
            for bottom in param.bottom:
                if bottom not in shapes:
                    raise LayerError(param.name, param.type,
                                     f"bottom '{bottom}' is not produced by an earlier layer")
            bottom_shapes = [shapes[b] for b in param.bottom]
            try:
                module = cls(param, bottom_shapes)
            except LayerError:
                raise
            except (ValueError, IndexError, RuntimeError) as exc:
                raise LayerError(param.name, param.type, f"bad parameters: {exc}") from None
            self._load_weights(module, param, weights.get(param.name), require_weights)
            if param.name in weights:
                used_weights.add(param.name)
            node = Node(len(self.nodes), param.name, param.type, list(param.bottom),
                        list(param.top), module, param, bottom_shapes)
            check_memory(module.workspace_bytes(), "running it",
                         lambda m, p=param: LayerError(p.name, p.type, m))
            node.top_shapes = self._infer_top_shapes(node)
            for top, shape in zip(node.tops, node.top_shapes):
                check_blob(shape, f"its top '{shorten(top)}'",
                           lambda m, p=param: LayerError(p.name, p.type, m))
            for top, shape in zip(node.tops, node.top_shapes):
                shapes[top] = shape
            self.nodes.append(node)
            modules.append(module)
        self.layers = modules
        self.blob_shapes = shapes
        self.output_names = self._outputs()
        self._readers, self._writers = self._blob_index()
        # each blob's last reader (its index): where a forward may drop or overwrite it
        self._last_use = {blob: nodes[-1].index for blob, nodes in self._readers.items()}
        self._by_name: dict[str, Node] = {}
        for node in self.nodes:
            self._by_name.setdefault(node.name, node)
        self._check_peak_memory()

    # -- construction helpers ----------------------------------------------------------------
    def _load_weights(self, module: Layer, param, found, require: bool) -> None:
        expected = module.blob_shapes()
        found = list(found or [])
        if not expected:
            if found:
                module.load_blobs([])  # the layer ignores stored blobs it does not need
            return
        optional = module.optional_blob_count()
        if not found:
            if require:
                raise LayerError(param.name, param.type,
                                 "no weights for this layer in the caffemodel (layers are "
                                 "matched by name)")
            found = [np.zeros(s, np.float32) for s in expected]
        if not (len(expected) - optional <= len(found) <= len(expected)):
            raise LayerError(param.name, param.type,
                             f"expected {len(expected)} weight blobs, found {len(found)}")
        fitted = []
        for i, (array, shape) in enumerate(zip(found, expected)):
            blob = fit_blob(array, shape)
            if blob is None:
                raise LayerError(param.name, param.type,
                                 f"weight blob {i} has shape {tuple(array.shape)}, "
                                 f"expected {tuple(shape)}")
            blob = blob.astype(np.float32, copy=False)
            finite = np.isfinite(blob)
            if not finite.all():
                where = tuple(int(i) for i in np.argwhere(~finite)[0])
                raise LayerError(param.name, param.type,
                                 f"weight blob {i} holds {int((~finite).sum())} non-finite "
                                 f"value(s) (NaN or Inf), the first at index {where}")
            fitted.append(blob)
        module.load_blobs(fitted)

    def _infer_top_shapes(self, node: Node) -> list[Shape]:
        """Top shapes by the layer's own rule (:meth:`Layer.top_shapes`), else from running
        the layer on its bottom shapes: symbolically (meta tensors, no arithmetic) where the
        layer allows, else on zeros (layers that read values, such as Accuracy and
        DetectionOutput)."""
        shapes = node.module.top_shapes()
        if shapes is None:
            shapes = self._run_for_shapes(node)
        if len(shapes) != len(node.tops):
            raise LayerError(node.name, node.type,
                             f"produces {len(shapes)} tops, the prototxt names {len(node.tops)}")
        return [tuple(shape) for shape in shapes]

    @staticmethod
    def _run_for_shapes(node: Node) -> list[Shape]:
        tops = _run_symbolic(node)
        if tops is None:
            zeros = [torch.zeros(s) for s in node.bottom_shapes]
            try:
                with torch.no_grad():
                    tops = node.module(*zeros)
            except LayerError:
                raise
            except (RuntimeError, ValueError, IndexError) as exc:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise LayerError(node.name, node.type,
                                 f"cannot run on bottoms of shapes {node.bottom_shapes}: "
                                 f"{message}") from None
        return [tuple(t.shape) for t in tops]

    def _check_peak_memory(self) -> None:
        """The blobs alive at once during a forward pass (each freed after its last use)
        must fit in memory: a LayerError names the layer where the peak is reached."""
        live = {name: elements(shape) * FLOAT32 for name, shape in self.input_shapes.items()}
        total = sum(live.values())
        for node in self.nodes:
            for top, shape in zip(node.tops, node.top_shapes):
                total += elements(shape) * FLOAT32 - live.get(top, 0)
                live[top] = elements(shape) * FLOAT32
            check_memory(total, "the blobs alive when it runs",
                         lambda m, n=node: LayerError(n.name, n.type, m))
            for bottom in node.bottoms:
                if self._last_use.get(bottom) == node.index and bottom not in node.tops \
                        and bottom in live:
                    total -= live.pop(bottom)

    def _outputs(self) -> list[str]:
        """Caffe's net outputs: blobs produced and not consumed by any later layer."""
        available: dict[str, None] = {}
        for name in self.input_shapes:
            available[name] = None
        for node in self.nodes:
            for bottom in node.bottoms:
                available.pop(bottom, None)
            for top in node.tops:
                available[top] = None
        return list(available)

    def _blob_index(self) -> tuple[dict[str, list[Node]], dict[str, list[Node]]]:
        """(the nodes that read each blob, those that write it), each in network order, a
        node once per blob (``x + x`` reads ``x`` once)."""
        readers: dict[str, list[Node]] = {}
        writers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for blob in dict.fromkeys(node.bottoms):
                readers.setdefault(blob, []).append(node)
            for blob in dict.fromkeys(node.tops):
                writers.setdefault(blob, []).append(node)
        return readers, writers

    def _needed(self, wanted: frozenset, stop: int | None = None) -> set[int]:
        """Indices of the nodes before ``stop`` (None: all) the ``wanted`` blobs depend on
        as they are at ``stop`` (the rest need not run)."""
        cache = self.__dict__.setdefault("_needed_cache", {})
        if (wanted, stop) not in cache:
            needed, pending = set(), set(wanted)
            for node in reversed(self.nodes[:stop]):
                if pending & set(node.tops):
                    needed.add(node.index)
                    pending -= set(node.tops)
                    pending |= set(node.bottoms)
            cache[wanted, stop] = needed
        return cache[wanted, stop]

    def _overwritable(self, node: Node, blobs: dict, wanted: set, keep_all: bool) -> bool:
        """Whether ``node`` may overwrite its first bottom (an activation in place, an
        override quantizing it in place): the bottom's value is read by no one after it (an
        in-place layer's own name, or the bottom's last use, not asked for); and this
        forward alone holds it: no other reference (the caller's feeds, a simulator's
        stash, a hook that kept what it saw) and no other tensor on its memory (a view)."""
        if _SOLE is None or not node.bottoms:
            return False
        bottom = node.bottoms[0]
        if bottom not in node.tops and (keep_all or bottom in wanted
                                        or self._last_use.get(bottom) != node.index):
            return False
        x = blobs.get(bottom)   # (absent: a fused unit's inner node, which an override skips)
        # references: the blobs dict, ``x`` and getrefcount's argument
        return (x is not None and sys.getrefcount(x) == 3 and not x.requires_grad
                and _storage_users(x) == _SOLE)

    # -- queries -----------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        """The (first) node named ``name``; KeyError where none is."""
        return self._by_name[name]

    def consumers(self, blob: str, after: int = -1) -> list[Node]:
        """The nodes after index ``after`` that read ``blob``, in network order."""
        return [n for n in self._readers.get(blob, ()) if n.index > after]

    def last_read(self, blob: str) -> int:
        """The index of the last node that reads ``blob`` (-1 where none does)."""
        return self._last_use.get(blob, -1)

    def writers(self, blob: str) -> list[Node]:
        """The nodes that write ``blob``: its producer, then the layers in place on it."""
        return list(self._writers.get(blob, ()))

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    # -- running -----------------------------------------------------------------------------
    def forward(self, feeds: Mapping[str, torch.Tensor], *, outputs: Iterable[str] | None = None,
                start: int = 0, stop: int | None = None, hook: Hook | None = None,
                overrides: Mapping[int, Callable] | None = None,
                keep_all: bool = False, consume: bool = False) -> dict[str, torch.Tensor]:
        """Run nodes ``start``..``stop`` (exclusive) from the blobs in ``feeds``.

        Returns the ``outputs`` blobs (default: the net's outputs) or, with ``keep_all``,
        every blob's final version. ``hook(node, tops)`` may return replacement tops.
        ``overrides[node.index](node, blobs)`` runs instead of a node (the INT8 simulation
        uses it): it returns the node's tops, or None to write nothing; ``blobs.owned``
        (:class:`Blobs`) names its first bottom when nobody reads that tensor after it.
        ``consume``: the caller gives up ``feeds`` (a dict, emptied here), so the pass may
        free or overwrite its tensors as it does its own."""
        wanted = set(self.output_names if outputs is None else outputs)
        blobs = Blobs({name: channels_last(value) for name, value in feeds.items()})
        if consume:
            feeds.clear()
        nodes = self.nodes[start:stop]
        if outputs is not None and hook is None and not keep_all:
            needed = self._needed(frozenset(wanted), stop)
            nodes = [n for n in nodes if n.index in needed]
        for node in nodes:
            override = overrides.get(node.index) if overrides else None
            if blobs.codes and not getattr(override, "reads_codes", False):
                for bottom in node.bottoms:
                    if bottom in blobs.codes:
                        blobs.decoded(bottom)
            try:
                if override is not None:
                    if self._overwritable(node, blobs, wanted, keep_all):
                        blobs.owned = node.bottoms[0]
                    tops = override(node, blobs)
                    blobs.owned = None
                elif (getattr(node.module, "in_place", False)
                      and self._overwritable(node, blobs, wanted, keep_all)):
                    tops = (node.module.apply_(blobs[node.bottoms[0]]),)
                else:
                    tops = node.module(*[blobs[b] for b in node.bottoms])
            except KeyError as exc:
                raise CalibratorError(f"layer '{node.name}': blob {exc} was not fed") from None
            codes = ()
            if tops is None:
                tops = ()
            else:
                if override is not None:
                    tops, codes = self._unwrapped(tops, decode=hook is not None)
                if hook is not None:
                    replaced = hook(node, tops)
                    if replaced is not None:
                        tops = replaced
            for i, (top, value) in enumerate(zip(node.tops, tops)):
                blobs[top] = value
                if i < len(codes) and codes[i] is not None:
                    blobs.codes[top] = codes[i]
                else:
                    blobs.codes.pop(top, None)
            tops = value = None  # the blobs dict alone holds them (see _overwritable)
            if not keep_all:
                for bottom in node.bottoms:
                    if (self._last_use.get(bottom) == node.index and bottom not in wanted
                            and bottom not in node.tops):
                        blobs.pop(bottom, None)
                        blobs.codes.pop(bottom, None)
        for name in list(blobs.codes):
            if keep_all or name in wanted:
                blobs.decoded(name)
        if keep_all:
            return blobs
        return {name: blobs[name] for name in wanted if name in blobs}

    @staticmethod
    def _unwrapped(tops, decode: bool) -> tuple[tuple, tuple]:
        """An override's tops as the blobs hold them, and the code of each (None: its
        values); ``decode``: every top as its values (for a hook to see)."""
        values, codes = [], []
        for value in tops:
            code = None
            if isinstance(value, Encoded):
                value, code = value
                if decode:
                    value, code = code.decode(value), None
            values.append(value)
            codes.append(code)
        return tuple(values), tuple(codes)
