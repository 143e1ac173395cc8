"""Activations run in place on blobs nobody reads after them (calibrator.graph.net): the same
values as a fresh output, and never on a tensor someone else still holds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibrator.graph.layers.activations import ReLU6
from calibrator.graph.net import CaffeNet
from tests.netutil import parse_net, random_weights
from tests.quant_helpers import conv_text, input_text

SHAPE = (2, 3, 6, 6)


def _net(text: str) -> CaffeNet:
    param = parse_net(input_text(SHAPE) + text)
    return CaffeNet(param, random_weights(param, seed=2)).eval()


def _relu6(name, bottom, top):
    return f'layer {{ name: "{name}" type: "ReLU6" bottom: "{bottom}" top: "{top}" }}\n'


def _conv(net: CaffeNet, x: torch.Tensor) -> torch.Tensor:
    module = net.node("c").module
    return F.conv2d(x, module.weight, module.bias, padding=module.pad)


def _counting(monkeypatch) -> list:
    calls = []
    real = ReLU6.apply_
    monkeypatch.setattr(ReLU6, "apply_", lambda self, x: calls.append(1) or real(self, x))
    return calls


def test_an_in_place_activation_gives_the_fresh_outputs_values(monkeypatch):
    net = _net(conv_text("c", "data", "c", 4, 3) + _relu6("r", "c", "c"))
    calls = _counting(monkeypatch)
    x = torch.randn(SHAPE) * 3
    kept = x.clone()
    with torch.no_grad():
        y = net({"data": x}, outputs=["c"])["c"]
        expected = _conv(net, x).clamp(0, 6)
    assert calls == [1]                               # it did run in place
    assert torch.allclose(y, expected, atol=1e-5) and (expected == 6).any()
    assert torch.equal(x, kept)                        # the caller's feed untouched


def test_a_blob_read_later_or_kept_is_not_overwritten(monkeypatch):
    """``r = relu6(c)`` under a new name while an Eltwise reads ``c`` after it: ``c`` keeps
    its negative values (the sum is r + c); and a hook that keeps what it saw sees it
    unchanged."""
    text = (conv_text("c", "data", "c", 4, 3) + _relu6("r", "c", "r")
            + 'layer { name: "s" type: "Eltwise" bottom: "r" bottom: "c" top: "s" }\n')
    net = _net(text)
    calls = _counting(monkeypatch)
    x = torch.randn(SHAPE) * 3
    with torch.no_grad():
        c = _conv(net, x)
        s = net({"data": x}, outputs=["s"])["s"]
        assert calls == []
        assert torch.allclose(s, c.clamp(0, 6) + c, atol=1e-5) and (c < 0).any()
        seen = {}

        def keep(node, tops):
            seen.setdefault(node.name, tops[0])

        single = _net(conv_text("c", "data", "c", 4, 3) + _relu6("r", "c", "c"))
        single({"data": x}, outputs=["c"], hook=keep)
        assert calls == [] and (seen["c"] < 0).any()   # kept: not clamped under the hook


def test_a_view_of_the_bottom_keeps_its_values(monkeypatch):
    """A Reshape of ``c`` (a view of its memory) is read after the ReLU6 on ``c``: the
    ReLU6 makes a fresh output, the view keeps the negative values."""
    text = ('layer { name: "c" type: "InnerProduct" bottom: "data" top: "c" '
            'inner_product_param { num_output: 8 } }\n'
            'layer { name: "f" type: "Reshape" bottom: "c" top: "f" '
            'reshape_param { shape { dim: 0 dim: 2 dim: 4 } } }\n'
            + _relu6("r", "c", "c"))
    net = _net(text)
    calls = _counting(monkeypatch)
    x = torch.randn(SHAPE) * 3
    module = net.node("c").module
    with torch.no_grad():
        out = net({"data": x}, outputs=["f", "c"])
        c = F.linear(x.flatten(1), module.weight, module.bias)
    assert calls == []
    assert torch.allclose(out["f"], c.reshape(2, 2, 4), atol=1e-5) and (out["f"] < 0).any()
    assert torch.allclose(out["c"], c.clamp(0, 6), atol=1e-5)


def test_consumed_feeds_are_the_passes_to_overwrite(monkeypatch):
    """``consume``: the caller gives its dict up (emptied); a ReLU6 on a fed blob then runs
    in place; without it the fed tensor is never written."""
    net = _net(_relu6("r", "data", "data"))
    calls = _counting(monkeypatch)
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last) * 8
    feeds = {"data": x.clone(memory_format=torch.channels_last)}
    with torch.no_grad():
        y = net(feeds, outputs=["data"], keep_all=True, consume=True)["data"]
        assert feeds == {} and calls == [1] and torch.equal(y, x.clamp(0, 6))
        mine = {"data": x}
        net(mine, outputs=["data"])
    assert calls == [1] and torch.equal(mine["data"], x) and (x < 0).any()


def test_the_int8_simulation_quantizes_a_dead_input_in_place_with_the_same_outputs(
        monkeypatch):
    """A quantized unit whose input nobody reads after it quantizes that tensor in place
    (``graph.net.Blobs.owned``); the outputs are those of the same simulation kept from
    overwriting anything, bit for bit. A fed batch is written only where the forward made
    its own copy (to NHWC), never where it holds the caller's tensor."""
    from calibrator.graph import net as net_module
    from calibrator.quant import simulate
    from calibrator.quant.simulate import Int8Simulator
    from tests.quant_helpers import TinyNet, relu_text

    text = (input_text((4, 3, 8, 8)) + conv_text("c1", "data", "a", 6, 3)
            + relu_text("r1", "a") + conv_text("c2", "a", "b", 5, 3)
            + relu_text("r2", "b") + conv_text("c3", "b", "c", 4, 1))
    tiny = TinyNet(text, seed=4)
    tiny.calibrate(first_conv=True)               # c1 quantizes the batch, c2 and c3 reorder
    overrides = Int8Simulator(tiny.fused, tiny.plan).overrides
    flags = []
    for name in ("quantize", "_reorder"):
        real = getattr(simulate, name)

        def recording(x, *args, in_place=False, real=real, **kwargs):
            flags.append(in_place)
            return real(x, *args, in_place=in_place, **kwargs)

        monkeypatch.setattr(simulate, name, recording)
    nchw = tiny.batches[0]["data"]
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    kept = nhwc.clone()
    with torch.no_grad():
        fast = tiny.net({"data": nchw}, outputs=["c"], overrides=overrides)["c"]
        assert flags == [True, True, True]        # the batch's NHWC copy, a and b
        held = tiny.net({"data": nhwc}, outputs=["c"], overrides=overrides)["c"]
        assert flags[3:] == [False, True, True]   # the caller's NHWC batch: not written
        monkeypatch.setattr(net_module, "_SOLE", None)          # nothing in place
        slow = tiny.net({"data": nchw}, outputs=["c"], overrides=overrides)["c"]
    assert flags[6:] == [False, False, False]
    assert torch.equal(fast, slow) and torch.equal(held, slow)
    assert torch.equal(nhwc, kept) and (kept != torch.round(kept)).any()


def test_writers_and_consumers_follow_a_blob_written_in_place():
    """The blob index: the producer then the in-place layers write ``c``; a reader that
    reads it twice (``c + c``) is listed once; ``after`` keeps the later readers."""
    eltwise = ('layer { name: "s" type: "Eltwise" bottom: "c" bottom: "c" top: "s" '
               'eltwise_param { operation: SUM } }\n')
    net = _net(conv_text("c", "data", "c", 4, 3) + _relu6("r", "c", "c") + eltwise
               + conv_text("d", "c", "d", 4, 1))
    scan = [n.name for n in net.nodes if "c" in n.tops]
    assert [n.name for n in net.writers("c")] == scan == ["c", "r"]
    assert [n.name for n in net.consumers("c")] == ["r", "s", "d"]
    assert [n.name for n in net.consumers("c", after=net.node("s").index)] == ["d"]
    assert net.writers("data") == [] and net.consumers("d") == []
    last = {b: n.index for n in net.nodes for b in n.bottoms}     # the last reader, scanned
    assert net.last_read("c") == last["c"] == net.node("d").index
    assert net.last_read("data") == last["data"] and net.last_read("d") == -1
