"""The main command: calibrate INT8 scales, search for accuracy, write the outputs.

It keeps Intel Caffe's ``calibrator.py`` flags (short and long names, defaults) so existing
scripts keep working; our additions use long options only."""

from __future__ import annotations

import argparse

from calibrator.cli.common import add_detection_list_options, add_device_options, \
    add_image_folder_options, add_model_options

INTEL_FLAGS_HELP = "Intel calibrator.py flags (same names and defaults)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibrator",
        description="Calibrate INT8 scales for a Caffe model and keep its accuracy within -l. "
                    "Writes <model>_quantized.prototxt (Intel Caffe quantization_param) next "
                    "to -m. Other commands: `calibrator test -h`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    intel = parser.add_argument_group(INTEL_FLAGS_HELP)
    intel.add_argument("-r", "--root", default="",
                       help="Caffe build folder: accepted for compatibility, not needed")
    add_model_options(intel, "network with a TEST data layer and an Accuracy (or "
                             "DetectionEvaluate) layer")
    intel.add_argument("-i", "--iterations", type=int, default=10, metavar="N",
                       help="TEST batches per full evaluation")
    intel.add_argument("-n", "--blob_name", default="", metavar="BLOB",
                       help="metric blob (default: the top of the Accuracy layer with the "
                            "smallest top_k)")
    intel.add_argument("-l", "--accuracy_loss", type=float, default=0.01, metavar="LOSS",
                       help="tolerated metric drop (absolute; 0.01 = one point)")
    intel.add_argument("-d", "--detection", type=int, choices=(0, 1), default=0,
                       help="1 for detection nets (metric: mAP of DetectionEvaluate)")
    intel.add_argument("-c", "--weights_channel", choices=("single", "multiple"),
                       default="single", help="weight scales per tensor or per output channel")
    intel.add_argument("-s", "--sampling_iterations", type=int, default=10, metavar="N",
                       help="batches used for the calibration statistics")
    intel.add_argument("-a", "--calibration_algos", default="KL", metavar="ALGO",
                       help="range estimator: KL, DIRECT, MAXP, MA, MSE or PERCENTILE<p>")
    intel.add_argument("-q", "--quantize_model", action="store_true",
                       help="only quantize: write the quantized prototxt, no accuracy search")
    intel.add_argument("-p", "--performance_model", action="store_true",
                       help="write <model>_dummy.prototxt with scale 1.0 everywhere "
                            "(speed measurement only) and stop")
    intel.add_argument("-u", "--unsigned_range", action="store_true",
                       help="scale s8 outputs with 255 as well")
    intel.add_argument("-t", "--concat_use_fp32", action="store_true",
                       help="convs feeding a Concat output FP32")
    intel.add_argument("-f", "--unify_concat_scales", action="store_true",
                       help="convs feeding one Concat share the smallest scale_out")
    intel.add_argument("-1st", "--enable_1st_conv", action="store_true",
                       help="quantize the first convolution too (s8 input)")
    intel.add_argument("-fc", "--fc_int8", action="store_true",
                       help="quantize InnerProduct layers too")
    intel.add_argument("-fu", "--first_conv_force_u8", action="store_true",
                       help="with -1st: feed the first conv u8 (writes "
                            "<model>_quantized_force_u8.prototxt and <weights>_new.caffemodel)")
    intel.add_argument("-clx", "--cascade_lake", action="store_true",
                       help="the target has VNNI: -fu keeps full weight scales (no halving)")
    intel.add_argument("-wi", "--conv_algo", action="store_true",
                       help="Winograd convolution: not supported (refused)")
    intel.add_argument("-ss", "--scale_search", type=int, choices=(0, 1), default=1,
                       help="search: try EasyQuant-style scale search on the worst layers")
    intel.add_argument("-uff", "--use_fp32_fallback", type=int, choices=(0, 1), default=1,
                       help="search: allow reverting layers to FP32")
    intel.add_argument("-ucac", "--unify_concat_and_consumer", action="store_true",
                       help="with -f: the conv after the Concat takes the unified scale as "
                            "scale_in (no requantization)")
    ours = parser.add_argument_group("calibrator options")
    ours.add_argument("--bits", type=int, choices=(7, 8), default=8,
                      help="activation/weight bits (7: ARM-style +-63 values)")
    ours.add_argument("--output", metavar="PROTOTXT",
                      help="quantized prototxt path (default <model>_quantized.prototxt)")
    ours.add_argument("--table", metavar="FILE", help="also write an ncnn calibration table")
    ours.add_argument("--json", metavar="FILE", help="also write every scale and statistic")
    ours.add_argument("--metric", choices=("blob", "agreement"), default="blob",
                      help="blob: the -n blob (Accuracy / DetectionEvaluate); agreement: "
                           "top-1 agreement of INT8 with FP32 on the class scores (-n names "
                           "the scores blob), for data without labels")
    ours.add_argument("--relative", action="store_true", help="-l is a relative drop")
    ours.add_argument("--target", default="vnni",
                      choices=("vnni", "generic", "avx2", "avx512bw", "avx2-onednn",
                               "avx512bw-onednn", "int7", "auto"),
                      help="INT8 arithmetic the simulation reproduces: vnni/generic exact int32 "
                           "(what the written prototxt targets); avx2/avx512bw u8xs8 pair sums "
                           "saturated to int16 (ONNX Runtime's rule for s8 inputs; -onednn: "
                           "oneDNN's); auto: this machine's CPU")
    ours.add_argument("--saturation-fix", default="auto",
                      choices=("auto", "off", "w7", "half", "s8"),
                      help="counter-measures where --target saturates int16 pair sums "
                           "(avx2, avx512bw): auto: the search picks per layer, on the probe "
                           "images, among 7-bit weights (w7), halved weight scales (half) and, "
                           "on -onednn targets, s8 input (s8); off: none; w7/half/s8: that "
                           "fix on every layer whose weights can saturate (also with -q)")
    ours.add_argument("--runtime", choices=("intel", "ort"), default="intel",
                      help="whose graph the full evaluations simulate: intel (Intel Caffe's "
                           "fused INT8 kernels, what the prototxt is for) or ort (the model "
                           "--export-onnx writes, as ONNX Runtime runs it: its float32 "
                           "requantization, residual adds as QLinearAdd, the convs it keeps "
                           "in float; needs onnxruntime)")
    ours.add_argument("--export-onnx", metavar="FILE",
                      help="also write the quantized net as an ONNX model with "
                           "QuantizeLinear/DequantizeLinear pairs carrying these scales")
    ours.add_argument("--strategy", choices=("bisect", "intel"), default="bisect",
                      help="bisect: rank layers by sensitivity, adjust the worst, bisect the "
                           "ranking for the FP32 layers, prune; intel: Intel's legacy loop "
                           "(revert convs in prototxt order, one full evaluation per step)")
    ours.add_argument("--max-evals", type=int, metavar="N",
                      help="stop after N full evaluations (FP32 included); the best found "
                           "is written")
    ours.add_argument("--time-budget", type=float, metavar="SECONDS",
                      help="start no full evaluation after this many seconds")
    ours.add_argument("--resume", action="store_true",
                      help="continue an interrupted search from <output>.search.json "
                           "without repeating its full evaluations")
    ours.add_argument("--report", metavar="DIR",
                      help="write report.md, report.json and PNG plots into DIR")
    ours.add_argument("--probe-images", type=int, default=16, metavar="N",
                      help="images for the sensitivity ranking and the layer fixes")
    ours.add_argument("--quiet", action="store_true", help="no progress bars")
    ours.add_argument("--debug", action="store_true", help="traceback on errors")
    add_device_options(ours)
    add_image_folder_options(parser)
    add_detection_list_options(parser)
    return parser


def options_from_args(args):
    from calibrator.errors import CalibratorError
    from calibrator.quant.estimators import parse_estimator
    from calibrator.quant.scales import QuantOptions

    if args.conv_algo:
        raise CalibratorError("-wi/--conv_algo (Winograd) is not supported: INT8 Winograd "
                              "kernels are not simulated; run without -wi")
    if args.first_conv_force_u8 and not args.enable_1st_conv:
        raise CalibratorError("-fu/--first_conv_force_u8 needs -1st/--enable_1st_conv")
    if args.first_conv_force_u8:
        raise CalibratorError("-fu/--first_conv_force_u8 is not available yet: quantize the "
                              "first conv with -1st (s8 input) instead")
    for name in ("iterations", "sampling_iterations"):
        if getattr(args, name) < 1:
            raise CalibratorError(f"--{name} must be at least 1")
    return QuantOptions(estimator=parse_estimator(args.calibration_algos),
                        per_channel=args.weights_channel == "multiple",
                        first_conv=args.enable_1st_conv, quantize_fc=args.fc_int8,
                        unsigned_range=args.unsigned_range, concat_fp32=args.concat_use_fp32,
                        unify_concat=args.unify_concat_scales,
                        force_u8=args.first_conv_force_u8, bits=args.bits)


def run(args) -> int:
    from calibrator.pipeline import run_calibration

    return run_calibration(args, options_from_args(args))
