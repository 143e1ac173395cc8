"""Blobs held in an override's code (calibrator.graph.net.Encoded): only an override that says
it reads codes sees the coded tensor; a layer, another override, a hook and the caller get
the blob's values, decoded once, in place. And the INT8 simulation's code, the stored
integers (calibrator.quant.simulate.StoredIntegers), is read as integers only where that
provably equals reading the values and rounding them back."""

from __future__ import annotations

import numpy as np
import torch

from calibrator.graph.net import CaffeNet, Encoded
from calibrator.quant.simulate import Format, StoredIntegers, round_trip_exact
from tests.netutil import parse_net, random_weights
from tests.quant_helpers import conv_text, input_text, relu_text

SHAPE = (2, 3, 5, 5)
TEXT = (input_text(SHAPE) + conv_text("c", "data", "c", 4, 3) + relu_text("r", "c")
        + conv_text("d", "c", "d", 2, 1))


class Tenfold:
    """A code: the tensor holds ten times the blob's values."""

    def __init__(self):
        self.decoded = 0

    def decode(self, value):
        self.decoded += 1
        return value.div_(10)


def _net() -> CaffeNet:
    param = parse_net(TEXT)
    return CaffeNet(param, random_weights(param, seed=3)).eval()


def _coding_override(net: CaffeNet, code: Tenfold):
    """Node ``c`` computed as usual, handed on as ten times its values, coded."""
    node_c = net.node("c")

    def override(node, blobs):
        return (Encoded(node_c.module(blobs[node.bottoms[0]])[0] * 10, code),)

    return {node_c.index: override}


def test_a_layer_after_a_coded_blob_reads_its_values():
    net, code = _net(), Tenfold()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        plain = net({"data": x}, outputs=["d"])["d"]
        coded = net({"data": x}, outputs=["d"], overrides=_coding_override(net, code))["d"]
    assert code.decoded == 1            # decoded once, for the ReLU, not again for ``d``
    assert torch.allclose(coded, plain, rtol=1e-5, atol=1e-6)


def test_an_override_that_reads_codes_sees_the_coded_tensor():
    net, code = _net(), Tenfold()
    x = torch.randn(SHAPE)
    seen = {}

    def relu(node, blobs):
        seen["value"] = blobs[node.bottoms[0]].clone()
        seen["code"] = blobs.codes.get(node.bottoms[0])
        return (blobs.decoded(node.bottoms[0]).clamp(min=0),)

    relu.reads_codes = True
    overrides = _coding_override(net, code)
    overrides[net.node("r").index] = relu
    with torch.no_grad():
        expected = net({"data": x}, outputs=["c"])["c"]      # after the in-place ReLU
        out = net({"data": x}, outputs=["d"], overrides=overrides)
    assert seen["code"] is code
    assert torch.allclose(seen["value"].clamp(min=0), expected * 10, rtol=1e-5, atol=1e-5)
    assert code.decoded == 1 and "d" in out


def test_hooks_and_callers_get_values():
    net = _net()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        plain = net({"data": x}, keep_all=True)
        seen = {}
        code = Tenfold()
        net({"data": x}, outputs=["d"], overrides=_coding_override(net, code),
            hook=lambda node, tops: seen.__setitem__(node.name, tops[0].clone()))
        asked = net({"data": x}, outputs=["c"], overrides=_coding_override(net, Tenfold()))
        every = net({"data": x}, keep_all=True, overrides=_coding_override(net, Tenfold()))
    # the hook saw node c's values before the in-place ReLU made them non-negative
    assert (seen["c"] < 0).any() and code.decoded == 1
    assert torch.allclose(seen["c"].clamp(min=0), plain["c"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(asked["c"], plain["c"], rtol=1e-5, atol=1e-6)
    assert every.codes == {}
    for name in ("c", "d"):
        assert torch.allclose(every[name], plain[name], rtol=1e-5, atol=1e-6)


def test_a_top_written_again_forgets_its_code():
    """Node ``r`` writes ``c`` again (in place): the blob is the ReLU's output, no code."""
    net, code = _net(), Tenfold()
    with torch.no_grad():
        blobs = net({"data": torch.randn(SHAPE)}, keep_all=True, stop=net.node("r").index + 1,
                    overrides=_coding_override(net, code))
    assert code.decoded == 1 and blobs.codes == {}


def test_stored_integers_are_read_where_the_round_trip_is_exact():
    for scale in (25.108232498168945, 1.0, float(np.float32(1 / 3)), 127 / 6.0, 3e38):
        scale = float(np.float32(scale))
        assert round_trip_exact(scale)
        assert StoredIntegers(scale).reads_as(Format("s8", scale))
        assert StoredIntegers(scale).reads_as(Format("u8", scale))
        assert not StoredIntegers(scale).reads_as(Format("f32", scale))
        assert not StoredIntegers(scale).reads_as(Format("u8", scale * 0.5))
    # near the small end of float32 f32(1 / scale) is inexact or infinite: not taken
    for scale in (3.7e-37, 1e-40):
        assert not round_trip_exact(scale)
        assert not StoredIntegers(scale).reads_as(Format("s8", scale))


def test_round_trip_exact_checks_what_it_claims():
    """Against numpy float32 arithmetic: where it says exact, every integer comes back."""
    q = np.arange(-256, 256, dtype=np.float32)
    for scale in np.float32([25.108232, 0.75, 3.7e-37, 1e-30, 2.9e38]):
        with np.errstate(over="ignore", invalid="ignore"):
            back = np.rint((q * (np.float32(1) / scale)).astype(np.float32) * scale)
        assert round_trip_exact(float(scale)) == bool(np.array_equal(back, q))
