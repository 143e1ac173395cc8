"""`make intel-check`: our INT8 simulation against the real Intel Caffe 1.1.6 + MKL-DNN runtime,
blob by blob.

Each case writes a quantized prototxt and a caffemodel with our writers, runs them through
real Intel Caffe (``intel_dump``, built by build.sh against $INTEL_CAFFE, default
/work/intelcaffe) and through our simulation (the same files loaded back, as `calibrator
test` loads them), on the same input, and compares every top Intel writes:

* INT8 tops (Intel's memory is u8/s8 at a scale s): the largest difference in steps of 1/s
  and the number of elements that differ, and the data type and scale against ours;
* FP32 tops: the largest absolute difference and that relative to the largest |value|;
* the last top: top-1 agreement (argmax over channels, per sample).

Cases: the small nets of tests/test_intel_rules.py (each kernel and compile rule), the -fu
net of tests/test_force_u8.py (its u8 data fed as input: Intel's transformer pad path needs
OpenCV, which the build here has not), SqueezeNet v1.1 from shared models/zoo calibrated with
our -q (random He weights, image-like inputs) at batch 4 and batch 1.

Exit status 0 when every INT8 top is within one step of Intel's, the data types agree and
the last tops agree on top-1; 1 otherwise; 0 with a note when no Intel build is found.

    python tools/intel_check/check.py [--work DIR] [--case NAME ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from calibrator.caffe import caffe_pb2  # noqa: E402
from calibrator.caffe.caffemodel import write_caffemodel  # noqa: E402
from calibrator.caffe.prototxt import read_net, write_net  # noqa: E402
from calibrator.caffe.types import DATA_LAYER_TYPES  # noqa: E402
from calibrator.model import load_model, quantized_plan  # noqa: E402
from calibrator.quant.simulate import F32, Int8Simulator  # noqa: E402
from calibrator.writers import write_quantized_prototxt  # noqa: E402

INTEL_CAFFE = Path(os.environ.get("INTEL_CAFFE", "/work/intelcaffe"))
DUMP = REPO / "build/intel_check/intel_dump"


@dataclass
class Case:
    name: str
    intel_prototxt: Path        # what Intel runs (Input layers only)
    weights: Path
    feeds: dict                 # top -> np.ndarray fed to both
    ours_prototxt: Path | None = None   # what we load (default: intel_prototxt)
    source_feeds: bool = False  # our side reads its own data layer (the same values)
    notes: list = field(default_factory=list)
    #: a configuration real Intel Caffe computes wrongly (our plans never write it):
    #: reported, not counted as a disagreement
    intel_defect: str | None = None


# -- our side ----------------------------------------------------------------------------------

def simulate(case: Case) -> tuple[dict, dict, dict]:
    """(tops, formats, feeds): every top our simulation writes (last writer), the data type
    and scale we hold it in, and the feeds used."""
    model = load_model(case.ours_prototxt or case.intel_prototxt, case.weights)
    fused, plan = quantized_plan(model.net)
    sim = Int8Simulator(fused, plan)
    feeds = model.source.batch(0) if case.source_feeds else {
        k: torch.from_numpy(v) for k, v in case.feeds.items()}
    tops, formats = {}, {}

    def hook(node, values):
        for name, value in zip(node.tops, values):
            tops[name] = value.detach().float().numpy().copy()
            formats[name] = sim.formats.get(f"{node.index}:{name}", F32)

    with torch.no_grad():
        model.net(feeds, overrides=sim.overrides, hook=hook)
    return tops, formats, {k: v.numpy() for k, v in feeds.items()}


# -- Intel's side ----------------------------------------------------------------------------

def run_intel(case: Case, feeds: dict, folder: Path) -> tuple[dict, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    args = [str(DUMP), str(case.intel_prototxt), str(case.weights), str(folder)]
    for name, value in feeds.items():
        path = folder / f"input_{name.replace('/', '_')}.npy"
        np.save(path, np.ascontiguousarray(value, np.float32))
        args.append(f"{name}={path}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               GLOG_minloglevel="2")
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    (folder / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"intel_dump failed ({done.returncode}), see {folder / 'run.log'}")
    info, order = {}, []
    for line in (folder / "blobs.tsv").read_text().splitlines()[1:]:
        _, layer, kind, top, _, dtype, scale = line.split("\t")[:7]
        if kind == "Input":
            continue
        info[top] = (dtype, float(scale.split(",")[0]), layer)
        if top not in order:
            order.append(top)
    tops = {t: np.load(folder / f"{t.replace('/', '_')}.npy") for t in order}
    return tops, {t: info[t] for t in order}


# -- comparison ---------------------------------------------------------------------------

def compare(case: Case, work: Path) -> dict:
    ours, formats, feeds = simulate(case)
    try:
        intel, info = run_intel(case, feeds, work / case.name)
    except RuntimeError as exc:
        log = (work / case.name / "run.log").read_text().splitlines()
        why = next((l for l in log if "Check failed" in l or "error" in l.lower()), str(exc))
        return {"case": case.name, "ok": case.intel_defect is not None, "agrees": False,
                "intel_defect": case.intel_defect, "top1_agreement": 0.0, "last": "",
                "notes": case.notes + [f"Intel Caffe aborted: {why.strip()}"], "tops": []}
    rows, ok = [], True
    for top, (dtype, scale, layer) in info.items():
        if top not in ours and "_split_" in top:
            continue  # a Split Intel inserted (InsertSplits): a copy of its bottom
        if top not in ours or ours[top].shape != intel[top].shape:
            rows.append({"top": top, "layer": layer, "missing": True})
            continue
        diff = np.abs(ours[top].astype(np.float64) - intel[top].astype(np.float64))
        row = {"top": top, "layer": layer, "intel": f"{dtype}@{scale:.6g}"
               if dtype in ("u8", "s8") else dtype,
               "ours": (f"{formats[top].dtype}@{formats[top].scale:.6g}"
                        if formats[top].int8 else "f32"),
               "max_abs": float(diff.max()), "differ": int((diff > 0).sum()),
               "size": int(diff.size)}
        if dtype in ("u8", "s8"):
            row["max_steps"] = float(diff.max() * scale)
            same_type = formats[top].int8 and formats[top].dtype == dtype and np.float32(
                formats[top].scale) == np.float32(scale)
            row["type_ok"] = bool(same_type)
            ok = ok and row["max_steps"] <= 1.0 + 1e-3 and same_type
        else:
            row["rel"] = float(diff.max() / max(np.abs(intel[top]).max(), 1e-30))
            row["type_ok"] = not formats[top].int8
            ok = ok and row["type_ok"]
        rows.append(row)
    last = list(info)[-1]
    a, b = ours[last], intel[last]
    if a.ndim >= 2 and a.shape == b.shape and a.shape[1] > 1:
        agree = float((a.argmax(1) == b.argmax(1)).mean())
    else:
        agree = 1.0 if a.shape == b.shape else 0.0
    ok = ok and agree == 1.0 and not any(r.get("missing") for r in rows)
    return {"case": case.name, "ok": bool(ok) or case.intel_defect is not None,
            "agrees": bool(ok), "intel_defect": case.intel_defect, "top1_agreement": agree,
            "last": last, "notes": case.notes, "tops": rows}


def report(result: dict) -> str:
    verdict = "OK" if result["agrees"] else "DIFFERENT"
    if result["intel_defect"] and not result["agrees"]:
        verdict = f"INTEL DEFECT, as known ({result['intel_defect']})"
    lines = [f"== {result['case']}: {verdict} "
             f"(top-1 agreement on '{result['last']}': {result['top1_agreement']:.3f})"]
    lines.extend(f"   note: {n}" for n in result["notes"])
    lines.append(f"   {'top':26s} {'Intel':18s} {'ours':18s} {'max|diff|':>10s} "
                 f"{'steps':>6s} {'differ':>14s}")
    for row in result["tops"]:
        if row.get("missing"):
            lines.append(f"   {row['top']:26s} (not comparable)")
            continue
        steps = f"{row['max_steps']:.3g}" if "max_steps" in row else f"rel {row['rel']:.1e}"
        lines.append(f"   {row['top']:26s} {row['intel']:18s} {row['ours']:18s} "
                     f"{row['max_abs']:10.3g} {steps:>6s} {row['differ']:>7d}/{row['size']:<7d}"
                     + ("" if row["type_ok"] else "  TYPE"))
    return "\n".join(lines)


# -- the cases ---------------------------------------------------------------------------

def _write_case(name, work, text, weights, plan_fn, feeds, notes=()) -> Case:
    """A TinyNet-style case: net text (Input layers), weights, a plan, feeds."""
    from tests.netutil import parse_net

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    net = parse_net(text)
    plan = plan_fn()
    prototxt = write_quantized_prototxt(folder / "net.prototxt", net, plan)
    caffemodel = write_caffemodel(folder / "net.caffemodel", weights, net)
    return Case(name, prototxt, caffemodel, feeds, notes=list(notes))


def rule_cases(work: Path) -> list[Case]:
    from tests import test_intel_rules as rules
    from tests.quant_helpers import TinyNet

    cases = []

    def add(name, text, seed, edit=None, notes=(), defect=None, **options):
        net = TinyNet(text, seed=seed)

        def plan_fn():
            plan = rules.plan_of(net, **options)
            if edit is not None:
                plan = edit(net, plan) or plan
            return plan

        feeds = {k: v.numpy() for k, v in net.batches[0].items()}
        cases.append(_write_case(name, work, text, net.weights, plan_fn, feeds, notes))
        cases[-1].intel_defect = defect

    def clip_255(net, plan):
        lq = plan.layers["convb"]
        lq.scale_out *= 255 / 127
        lq.output_unsigned = True

    def fp32_residual(net, plan):
        plan.layers["convr"].output_int8 = False
        plan.layers["convr"].scale_out = 1.0

    def fp32_residual_excluded(net, plan):  # what our plan writes: the sum conv FP32 too
        fp32_residual(net, plan)
        plan.excluded["convb"] = "its residual is FP32"

    def fp32_residual_conv(net, plan):      # the residual conv entirely FP32
        del plan.layers["convr"]

    def int8_eltwise_inputs(net, plan):
        for name in ("convr", "convb"):
            lq = plan.layers[name]
            lq.output_int8 = True
            lq.scale_out = 127 / net.absmax_after(name)

    def other_scale(net, plan):
        plan.layers["c2"].scale_in = float(np.float32(plan.layers["c1"].scale_out * 0.37))

    add("fused_sum_s8_residual", rules.residual_net(), 13)
    relu_sum = rules.residual_net().replace(
        rules.eltwise_text("add", "r", "b", "s"),
        rules.eltwise_text("add", "r", "b", "s") + rules.relu_text("relus", "s"))
    add("fused_sum_255_scale_clips", relu_sum, 16, clip_255,
        ["the sum conv written with 255/T and an s8 residual, as Intel's calibrator does"])
    garbage = ("a conv + sum reading an INT8 conv's FP32 output computes garbage; our plans "
               "run such a producer FP32 (quant/scales.py)")
    add("fp32_residual_runs_fp32", rules.residual_net(), 17, fp32_residual,
        ["the residual is an INT8 conv's FP32 output; the sum conv carries quantization_param"],
        defect=garbage)
    add("fp32_residual_sum_conv_fp32", rules.residual_net(), 17, fp32_residual_excluded,
        ["the residual is an INT8 conv's FP32 output; the sum conv is FP32 (no param)"],
        defect=garbage)
    add("fp32_residual_from_fp32_conv", rules.residual_net(), 17, fp32_residual_conv,
        ["the residual conv is FP32 (no param); the sum conv carries quantization_param"])
    add("sum_coefficients_swapped", rules.residual_net(coeff="coeff: 0.5 coeff: -1.5",
                                                        add_bottoms=("b", "r")), 13)
    add("relu_before_the_sum", rules.residual_net(pre_relu=True), 14)
    add("prod_fused_as_sum", rules.residual_net(op="operation: PROD"), 13)
    between = rules.conv_text("convx", "c0", "x", 4, 1) + rules.relu_text("relux", "x")
    add("eltwise_not_after_the_conv", rules.residual_net(between), 11)
    readers = (rules.conv_text("convp", "r", "p", 4, 1)
               + rules.conv_text("convq", "r", "q", 4, 1))
    add("split_of_three_blocks_fusion", rules.residual_net() + readers, 12)
    add("relu_after_sum_flag_sticky", rules.RELU_FLAG_NET, 15)
    add("fp32_sum_conv_int8_residual", rules.residual_net(), 17,
        lambda net, plan: plan.excluded.__setitem__("convb", "FP32 by choice"),
        ["the sum conv FP32 (no param), its residual an INT8 conv's s8 output"],
        defect="an FP32 conv + sum with an INT8 residual aborts (Check failed: convFwd_pd); "
               "our plans run the residual's producers FP32 then (quant/scales.py)")
    def revert_sum_conv(net, plan):  # as the search reverts a unit: build_plan with a choice
        from calibrator.quant.scales import UnitChoice, build_plan

        return build_plan(net.fused, net.stats, plan.options, {"convb": UnitChoice(fp32=True)})

    add("reverted_sum_conv_runs", rules.residual_net(), 17, revert_sum_conv,
        ["the sum conv reverted to FP32 as the search does: its residual's producer runs FP32"])
    def fp32_sum_output(net, plan):   # as Intel's calibrator writes it (force_fp32_opt)
        plan.excluded.clear()
        plan.layers["convb"].output_int8 = False
        plan.layers["convb"].scale_out = 1.0

    add("int8_kept_from_standalone_batchnorm", rules.PRE_ACTIVATION, 27,
        notes=["the sum read by a standalone BatchNorm: our plan runs the sum conv (and its "
               "residual's producer) FP32"])
    add("sum_conv_fp32_output_is_s8_at_1", rules.PRE_ACTIVATION, 27, fp32_sum_output,
        ["bw_layer_out 32 on the sum conv, as force_fp32_opt writes it: s8 at scale 1.0; the "
         "BatchNorm after it then runs on the integers (not simulated, our plans avoid it)"],
        defect="Intel's MKLDNN BatchNorm on INT8 data normalizes the integers at scale 1.0 "
               "(blob t); our plans never feed it INT8")
    add("concat_requantizes", rules.concat_net(), 18)
    add("concat_u8_s8_goes_fp32", rules.concat_net(relu_b=False), 19)
    ave = (rules.input_text((2, 3, 7, 7))
           + rules.conv_text("conv0", "data", "c0", 4, 3) + rules.relu_text("relu0", "c0")
           + rules.conv_text("c1", "c0", "x", 4, 3) + rules.relu_text("relu1", "x")
           + 'layer { name: "pool" type: "Pooling" bottom: "x" top: "p" '
             'pooling_param { pool: AVE kernel_size: 3 stride: 2 } }\n'
           + rules.conv_text("c2", "p", "y", 4, 1) + rules.relu_text("relu2", "y")
           + rules.conv_text("last", "y", "out", 3, 1))
    add("ave_pooling_int8", ave, 20)
    ip = (rules.input_text((2, 3, 4, 4))
          + rules.conv_text("conv0", "data", "c0", 4, 3) + rules.relu_text("relu0", "c0")
          + 'layer { name: "fc" type: "InnerProduct" bottom: "c0" top: "f" '
            'inner_product_param { num_output: 6 } }\n' + rules.relu_text("relufc", "f", 0.1)
          + 'layer { name: "fc2" type: "InnerProduct" bottom: "f" top: "g" '
            'inner_product_param { num_output: 3 } }\n')
    add("inner_product_leaky_relu_u8", ip, 21, quantize_fc=True)
    standalone = rules.residual_net(rules.conv_text("convx", "c0", "x", 4, 1)
                                    + rules.relu_text("relux", "x"))
    add("standalone_eltwise_scale_1", standalone, 22, int8_eltwise_inputs,
        ["Eltwise inputs written INT8 (our plan makes them FP32)"])
    reorder = (rules.input_text((2, 3, 6, 6))
               + rules.conv_text("conv0", "data", "c0", 4, 3) + rules.relu_text("relu0", "c0")
               + rules.conv_text("c1", "c0", "x", 5, 3) + rules.relu_text("relu1", "x")
               + rules.conv_text("c2", "x", "y", 4, 1) + rules.relu_text("relu2", "y")
               + rules.conv_text("last", "y", "out", 3, 1))
    add("int8_reorder_other_scale", reorder, 23, other_scale)
    add("force_fp32_opt", rules.SQUEEZE_TAIL, 24)
    return cases


def bn_caffemodel_case(work: Path) -> Case:
    """The -fu net's s8 plan (-1st) with the caffemodel our writer wrote, BatchNorm/Scale not
    folded: Intel folds them when it loads it (CopyTrainedLayersFrom compiles its layers)."""
    from tests import test_force_u8 as fu

    folder = work / "bn_caffemodel_s8_first_conv"
    folder.mkdir(parents=True, exist_ok=True)
    prototxt, caffemodel, _, _ = fu.make_net(folder)
    from calibrator.cli.main import main

    assert main(["-m", str(prototxt), "-w", str(caffemodel), "-1st", "-q", "-s", "2",
                 "--quiet"]) == 0
    ours = folder / "net_quantized.prototxt"
    model = load_model(ours, caffemodel)
    feeds = {k: v.numpy() for k, v in model.source.batch(0).items()}
    return Case(folder.name, deploy_of(ours, feeds, folder / "intel.prototxt"), caffemodel,
                feeds, ours_prototxt=ours, source_feeds=True,
                notes=["BatchNorm + Scale in the caffemodel, folded by Intel at load"])


def force_u8_case(work: Path, clx: bool) -> Case:
    from calibrator.cli.main import main
    from tests import test_force_u8 as fu

    name = "force_u8_clx" if clx else "force_u8"
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    prototxt, caffemodel, _, _ = fu.make_net(folder)
    code = main(["-m", str(prototxt), "-w", str(caffemodel), "-1st", "-fu", "-q", "-s", "2",
                 "--quiet"] + (["--is_clx"] if clx else []))
    assert code == 0
    ours = folder / "net_quantized_force_u8.prototxt"
    weights = folder / "net_new.caffemodel"
    model = load_model(ours, weights)
    feeds = {k: v.numpy() for k, v in model.source.batch(0).items()}
    return Case(name, deploy_of(ours, feeds, folder / "intel.prototxt"), weights, feeds,
                ours_prototxt=ours, source_feeds=True,
                notes=["Intel is fed our transformer's u8 data (its pad path needs OpenCV)"])


def deploy_of(prototxt: Path, feeds: dict, out: Path) -> Path:
    """The TEST net with its data layers replaced by one Input layer of the feeds' shapes."""
    net = read_net(prototxt)
    deploy = caffe_pb2.NetParameter(name=net.name)
    layer = deploy.layer.add(name="input", type="Input")
    for top, value in feeds.items():
        layer.top.append(top)
        layer.input_param.shape.add().dim.extend(value.shape)
    from calibrator.caffe.netstate import filter_net

    for source in filter_net(net).layer:
        if source.type not in DATA_LAYER_TYPES and source.type != "Input":
            deploy.layer.add().CopyFrom(source)
    return write_net(out, deploy)


TRANSFORM = REPO / "build/intel_check/intel_transform"

#: (name, transform_param, image size): Intel's pad path with and without a crop, a crop
#: margin smaller than the pad, one or no mean value
TRANSFORMS = [
    ("crop_margin_1_pad_2", "scale: 0.913 mean_value: 104 mean_value: 117 mean_value: 123 "
                            "crop_size: 12 pad: 2", 14),
    ("crop_margin_16_pad_1", "scale: 0.017 mean_value: 103.53 mean_value: 116.28 "
                             "mean_value: 123.675 crop_size: 32 pad: 1", 64),
    ("no_crop_pad_3", "scale: 0.841059625 mean_value: -48.18897 mean_value: -35.18897 "
                      "mean_value: -29.18897 pad: 3", 20),
    ("one_mean_value_pad_2", "scale: 0.5 mean_value: 100 crop_size: 10 pad: 2", 17),
    ("no_mean_value_pad_2", "scale: 0.75 crop_size: 10 pad: 2", 13),
]


def transformer_check(work: Path) -> list[dict]:
    """Our ImageData source against Intel's own DataTransformer (intel_transform) on
    image-like pictures: every value equal."""
    import cv2

    from calibrator.data import build_data_source

    results = []
    for name, transform, size in TRANSFORMS:
        folder = work / "transform" / name
        images = folder / "img"
        if not images.exists():
            image_like(images, 3, size, seed=len(name))
        names = sorted(p.name for p in images.iterdir())
        (folder / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
        text = (f'layer {{ name: "data" type: "ImageData" top: "data" top: "label" '
                f'transform_param {{ {transform} }} image_data_param {{ source: '
                f'"{folder}/list.txt" root_folder: "{images}/" batch_size: {len(names)} }} }}')
        (folder / "net.prototxt").write_text(text)
        layer = read_net(folder / "net.prototxt").layer[0]
        ours = build_data_source(layer, folder).batch(0)["data"].numpy()
        worst, differ = 0.0, 0
        for i, image in enumerate(names):
            out = folder / f"intel_{i}.npy"
            done = subprocess.run([str(TRANSFORM), str(folder / "net.prototxt"), "data",
                                   str(images / image), str(out)], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise RuntimeError(f"intel_transform failed: {done.stderr[-300:]}")
            intel = np.load(out)[0]
            diff = np.abs(intel.astype(np.float64) - ours[i])
            worst, differ = max(worst, float(diff.max())), differ + int((diff > 0).sum())
            assert cv2 is not None
        results.append({"case": f"transformer_{name}", "ok": worst == 0.0, "agrees": worst == 0.0,
                        "intel_defect": None, "max_abs": worst, "differ": differ,
                        "shape": list(ours.shape)})
    return results


SHARED = Path(os.environ.get("CALIBRATOR_SHARED", REPO.parent / "shared"))


def squeezenet_case(work: Path, batch: int) -> Case:
    from calibrator.cli.main import main

    deploy = SHARED / "models/zoo/squeezenet_v1.1/deploy.prototxt"
    name = f"squeezenet_v1.1_batch{batch}"
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    net = read_net(deploy)
    net.layer[0].input_param.shape[0].dim[0] = batch
    prototxt = write_net(folder / "deploy.prototxt", net)
    weights = he_weights(net, seed=0)
    caffemodel = write_caffemodel(folder / "weights.caffemodel", weights, net)
    images = folder / "images"
    if not images.exists():
        image_like(images, 4, 227, seed=0)
    quantized = folder / "quantized.prototxt"
    code = main(["-m", str(prototxt), "-w", str(caffemodel), "-q", "-s", "1", "--quiet",
                 "--images", str(images), "--mean", "104", "117", "123", "--batch-size", "4",
                 "--output", str(quantized)])
    assert code == 0
    model = load_model(prototxt, caffemodel, images=_folder_options(images, batch))
    feeds = {k: v.numpy() for k, v in model.source.batch(0).items()}
    return Case(name, quantized, caffemodel, feeds,
                notes=[f"-q (KL) on 4 images, Intel and ours run batch {batch}"])


def _folder_options(images: Path, batch: int):
    from calibrator.data.options import ImageFolderOptions

    return ImageFolderOptions(str(images), (104.0, 117.0, 123.0), 1.0, None, batch)


def he_weights(net, seed: int) -> dict:
    """He-normal weights, N(0, 0.05^2) biases, for every Convolution / InnerProduct."""
    from tests.netutil import random_weights

    rng = np.random.default_rng(seed)
    weights = random_weights(net, seed=seed)
    for blobs in weights.values():
        if len(blobs) == 2 and blobs[0].ndim >= 2:
            fan_in = int(np.prod(blobs[0].shape[1:]))
            blobs[0] = rng.normal(0, np.sqrt(2.0 / fan_in), blobs[0].shape).astype(np.float32)
            blobs[1] = rng.normal(0, 0.05, blobs[1].shape).astype(np.float32)
    return weights


def image_like(folder: Path, count: int, size: int, seed: int) -> None:
    import cv2

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.uniform(0, 255, (size // 16 + 1, size // 16 + 1, 3)).astype(np.float32)
        image = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)


CASE_GROUPS = {"rules": rule_cases,
               "force_u8": lambda w: [bn_caffemodel_case(w), force_u8_case(w, False),
                                      force_u8_case(w, True)],
               "squeezenet": lambda w: ([squeezenet_case(w, 4), squeezenet_case(w, 1)]
                                        if SHARED.is_dir() else [])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="keep the files here (default: a temporary folder)")
    parser.add_argument("--group", action="append", choices=sorted(CASE_GROUPS) + ["transformer"],
                        help="only these groups of cases (default: all)")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args(argv)
    if not (INTEL_CAFFE / "src/.build_release/lib/libcaffe.so").exists():
        print(f"intel-check: no Intel Caffe build at {INTEL_CAFFE} (set INTEL_CAFFE); skipped")
        return 0
    if not DUMP.exists():
        print(f"intel-check: {DUMP} missing: run tools/intel_check/build.sh")
        return 1
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch).resolve()
        results = []
        groups = args.group or list(CASE_GROUPS) + ["transformer"]
        if "transformer" in groups:
            if TRANSFORM.exists():
                for result in transformer_check(work):
                    results.append(result)
                    print(f"== {result['case']}: {'OK' if result['ok'] else 'DIFFERENT'} "
                          f"(Intel's DataTransformer vs ours, {result['shape']}: max|diff| "
                          f"{result['max_abs']:.3g}, {result['differ']} values differ)",
                          flush=True)
            else:
                print("== transformer: skipped (intel_transform not built: it needs OpenCV's "
                      "headers, libopencv-imgcodecs-dev)")
        for group in [g for g in groups if g in CASE_GROUPS]:
            for case in CASE_GROUPS[group](work):
                result = compare(case, work / "intel")
                results.append(result)
                print(report(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    failed = [r["case"] for r in results if not r["ok"]]
    defects = [r["case"] for r in results if r["intel_defect"] and not r["agrees"]]
    agree = sum(r["agrees"] for r in results)
    print(f"intel-check: {agree}/{len(results)} cases agree with Intel Caffe"
          + (f"; Intel's known defects: {', '.join(defects)}" if defects else "")
          + (f"; different: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
