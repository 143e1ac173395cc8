"""The CUDA path (--gpu): statistics, the INT8 simulation's exactness against the integer
references, and a search. Skipped without a CUDA device (CI has none); they ran and passed
on an NVIDIA H200 (torch 2.11, CUDA 13) on 2026-12-04, the two-GPU case excepted.
test_quant_integer_reference.py runs its bit-exactness cases on CUDA too.

What exactness on CUDA rests on (see runtime.deterministic_cuda and
quant.simulate.exact_arithmetic): no TF32; no cuDNN inside the integer accumulations (its
Winograd/FFT algorithms are not exact on integers); histc counts in float32 only in chunks
below 2^24; integer-valued float64 index_add_ for the pair-saturation corrections (exact in
any order, so nondeterministic atomics do not matter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calibrator.cli.main import main
from calibrator.quant.kl import NUM_BINS, abs_histogram
from calibrator.quant.statistics import collect
from calibrator.runtime import CUDA_SETTINGS, deterministic_cuda
from tests.quant_helpers import TinyNet, conv_text, input_text, relu_text
from tests.test_search import tiny  # noqa: F401  (the module fixture)
from tests.test_targets import conv_net, integer_plan, large_case, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("q.prototxt", "q.json", "q.table")


@pytest.fixture(autouse=True)
def cuda_as_the_cli_runs_it():
    """Every test here runs CUDA as ``--gpu`` does (runtime.deterministic_cuda): PyTorch's
    own default lets cuDNN convolutions use TF32, whose 10-bit operands move FP32 outputs
    by about 1e-4 (seen on an H200: an absmax 5.70148 against the CPU's 5.70224)."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in CUDA_SETTINGS]
    deterministic_cuda()
    yield
    for owner, name, value in saved:
        setattr(owner, name, value)


def _simulate(net, fused, plan, x, target, device="cuda"):
    from calibrator.quant.simulate import Int8Simulator

    net.to(device)
    sim = Int8Simulator(fused, plan, target=target)
    with torch.no_grad():
        out = net({"data": torch.from_numpy(x).to(device)}, overrides=sim.overrides)
    return out["y"].double().cpu().numpy()


# -- statistics ------------------------------------------------------------------------------

def test_histogram_counts_exactly_on_cuda_beyond_2_24():
    """2^25 values in one bin: a float32 histc would stop counting at 2^24 (16777216); the
    chunked histogram counts every one. Bin centres land in the same bin on any device."""
    rng = np.random.default_rng(0)
    bins = rng.integers(0, NUM_BINS, 100_000)
    values = (bins + 0.5) * (3.0 / NUM_BINS)
    x = torch.from_numpy(values.astype(np.float32)).cuda()
    got = abs_histogram(-x, 3.0).cpu().numpy()  # |x| counts: the sign is dropped
    np.testing.assert_array_equal(got, np.bincount(bins, minlength=NUM_BINS))
    same = torch.full((2 ** 25,), 1.0 + 0.5 * 3.0 / NUM_BINS, device="cuda")
    counts = abs_histogram(same, 3.0)
    assert counts.dtype == torch.int64 and int(counts.sum()) == 2 ** 25
    assert int(counts.max()) == 2 ** 25 > 2 ** 24


def test_statistics_on_cuda_match_the_cpu():
    text = (input_text((4, 3, 12, 12)) + conv_text("conv1", "data", "c1", 16, 3)
            + relu_text("relu1", "c1") + conv_text("conv2", "c1", "c2", 32, 3)
            + relu_text("relu2", "c2") + conv_text("conv3", "c2", "c3", 8, 1))
    net = TinyNet(text, seed=3)
    net.calibrate()
    cpu = net.stats
    net.net.to("cuda")
    feeds = [{k: v.cuda() for k, v in b.items()} for b in net.batches]
    cuda = collect(net.net, net.fused, iter(feeds))
    net.net.to("cpu")
    assert list(cuda) == list(cpu)
    for key in cpu:
        a, b = cpu[key], cuda[key]
        assert b.count == a.count and abs(b.zeros - a.zeros) <= 1e-3 * a.count
        assert b.absmax == pytest.approx(a.absmax, rel=1e-5)
        assert len(b.batch_absmax) == len(a.batch_absmax) == len(net.batches)
        assert b.hist.sum() == pytest.approx(b.count - b.zeros)  # each non-zero value once
        assert np.abs(b.hist - a.hist).sum() <= 1e-3 * a.count
    data = "-1:data"  # the fed input (BlobRef.key: producer -1)
    # the input is the same tensor on both devices: its first-pass figures are identical
    assert (cuda[data].minimum, cuda[data].maximum, cuda[data].absmax,
            cuda[data].batch_absmax) == (cpu[data].minimum, cpu[data].maximum,
                                         cpu[data].absmax, cpu[data].batch_absmax)


# -- the simulation against the integer references -------------------------------------------

@pytest.mark.parametrize("channels,k,pad,stride,groups", [
    (8, 1, 0, 1, 1), (6, 3, 1, 1, 1), (3, 3, 1, 2, 1), (8, 3, 1, 1, 2)])
def test_pair_saturation_on_cuda_equals_the_int16_reference(channels, k, pad, stride, groups):
    """avx2's int16 pair saturation (index_add_ of float64 corrections on CUDA) and exact
    int32 (vnni), against test_targets.py's numpy references."""
    rng = np.random.default_rng(channels * 10 + k)
    shape = (2, channels, 7, 6)
    x, weight = large_case(rng, shape, 4, k, groups)
    net = conv_net(shape, f"convolution_param {{ num_output: 4 kernel_size: {k} pad: {pad} "
                          f"stride: {stride} group: {groups} bias_term: false }}", weight)
    fused, plan = integer_plan(net)
    want = reference(x, weight, pad, stride, groups, saturate=True)
    exact = reference(x, weight, pad, stride, groups, saturate=False)
    assert not np.array_equal(want, exact)
    np.testing.assert_array_equal(_simulate(net, fused, plan, x, "avx2"), want)
    np.testing.assert_array_equal(_simulate(net, fused, plan, x, "vnni"), exact)


def test_wide_3x3_convolution_is_exact_on_cuda():
    """64 -> 64 channels, 3x3, 32x32: the shape where cuDNN likes Winograd. With cuDNN
    off inside the accumulation the integers are exact; the caller's cuDNN setting is
    back afterwards."""
    rng = np.random.default_rng(5)
    shape = (2, 64, 32, 32)
    x = rng.integers(0, 256, size=shape).astype(np.float32)
    weight = rng.integers(-127, 128, size=(64, 64, 3, 3))
    net = conv_net(shape, "convolution_param { num_output: 64 kernel_size: 3 pad: 1 "
                          "bias_term: false }", weight)
    fused, plan = integer_plan(net)
    enabled = torch.backends.cudnn.enabled
    got = _simulate(net, fused, plan, x, "vnni")
    assert torch.backends.cudnn.enabled == enabled
    np.testing.assert_array_equal(got, reference(x, weight, 1, 1, 1, saturate=False))


# -- a search --------------------------------------------------------------------------------

def _search(tiny, out, *extra):
    tmp, prototxt, caffemodel = tiny
    out.mkdir(parents=True, exist_ok=True)
    return ["-m", str(prototxt), "-w", str(caffemodel), "-i", "4", "-s", "4", "-l", "0.05",
            "--output", str(out / "q.prototxt"), "--json", str(out / "q.json"),
            "--table", str(out / "q.table"), "--quiet", *extra]


def test_search_on_cuda_reverts_the_broken_layer_and_repeats_itself(tiny, tmp_path):
    assert main(_search(tiny, tmp_path / "a", "--gpu", "0")) == 0
    assert main(_search(tiny, tmp_path / "b", "--gpu", "0")) == 0
    search = json.loads((tmp_path / "a/q.json").read_text())["search"]
    assert search["fp32_layers"] == ["conv2"] and search["met"]
    for name in OUTPUTS:  # deterministic on the GPU
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than 2 CUDA devices")
def test_torchrun_on_two_gpus_writes_the_bytes_of_one_gpu(tiny, tmp_path):
    """NCCL for the histogram sums, gloo for the exchanges; rank r on cuda:r."""
    assert main(_search(tiny, tmp_path / "one", "--gpu", "0")) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "calibrator",
                          *_search(tiny, tmp_path / "two", "--gpu", "0")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in OUTPUTS:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_the_layerwise_pass_on_cuda_makes_the_cpus_choices():
    """On the GPU the candidates are scored with float products (no int8 products) and the
    data live on the device: the same thresholds and weight scales as on the CPU, for a unit
    with a ReLU (scored from outputs) and units without (scored from moments)."""
    from calibrator.quant.layerwise import LayerwiseSettings, layerwise
    from calibrator.quant.scales import QuantOptions

    text = (input_text((4, 3, 9, 9)) + conv_text("c1", "data", "a", 8, 3, "pad: 1")
            + relu_text("r1", "a") + conv_text("c2", "a", "b", 6, 3)
            + conv_text("c3", "b", "c", 4, 1))
    options = QuantOptions(first_conv=True, per_channel=True)
    settings = LayerwiseSettings(steps=21, positions=32)
    chosen = {}
    for device in ("cpu", "cuda"):
        net = TinyNet(text, seed=9)
        net.net.to(device)
        net.batches = [{k: v.to(device) for k, v in b.items()} for b in net.batches]
        net.calibrate(first_conv=True, per_channel=True)
        chosen[device], _ = layerwise(net.net, net.fused, net.stats, options, {},
                                      net.batches[0], settings)
    for name, choice in chosen["cpu"].items():
        assert choice.input_threshold == pytest.approx(chosen["cuda"][name].input_threshold,
                                                       rel=1e-6)
        assert np.allclose(choice.weight_scales, chosen["cuda"][name].weight_scales, rtol=1e-6)
