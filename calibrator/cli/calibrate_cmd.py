"""The main command: calibrate INT8 scales, search for accuracy, write the outputs.

It keeps Intel Caffe's ``calibrator.py`` flags (short and long names, defaults) so existing
scripts keep working; our additions use long options only. This module only turns the
options into a :class:`~calibrator.config.RunConfig`; the choices and help of the
estimators, metrics, targets, runtimes and outputs come from their registries."""

from __future__ import annotations

import argparse
import functools
import logging

from calibrator import pipeline
from calibrator.cli.common import (add_ap_version_option, add_backend_options,
                                   add_detection_list_options, add_device_options,
                                   add_image_folder_options, add_model_options,
                                   detection_list_options, given_options,
                                   image_folder_options)
from calibrator.cli.parsing import EXIT_CODES, ArgumentParser
from calibrator.config import RunConfig
from calibrator.errors import CalibratorError
from calibrator.metrics import describe_metrics, metric_kinds
from calibrator.quant.estimators import describe_estimators, parse_estimator
from calibrator.quant.layerwise import LayerwiseSettings
from calibrator.quant.scales import QuantOptions
from calibrator.quant.targets import COUNTERMEASURES
from calibrator.search import SearchSettings
from calibrator.writers import writers

log = logging.getLogger(__name__)

INTEL_FLAGS_HELP = "Intel calibrator.py flags (same names and defaults)"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="calibrator",
        description="Calibrate INT8 scales for a Caffe model and keep its accuracy within -l. "
                    "Writes <model>_quantized.prototxt (Intel Caffe quantization_param) next "
                    "to -m. Other commands: `calibrator test -h`.",
        epilog=EXIT_CODES, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    intel = parser.add_argument_group(INTEL_FLAGS_HELP)
    intel.add_argument("-r", "--root", default="",
                       help="Caffe build folder: accepted for compatibility, not needed")
    add_model_options(intel, "network with a TEST data layer and an Accuracy (or "
                             "DetectionEvaluate) layer")
    intel.add_argument("-i", "--iterations", default="10", metavar="N",
                       help="TEST batches per full evaluation (default 10; not an integer: 1000, "
                            "as Intel's calibrator.py)")
    intel.add_argument("-n", "--blob_name", default="", metavar="BLOB",
                       help="metric blob (default: the top of the Accuracy layer with the "
                            "smallest top_k)")
    intel.add_argument("-l", "--accuracy_loss", type=float, default=0.01, metavar="LOSS",
                       help="tolerated metric drop (absolute; 0.01 = one point)")
    intel.add_argument("-d", "--detection", type=int, choices=(0, 1), default=0,
                       help="1 for detection nets (metric: mAP of DetectionEvaluate)")
    intel.add_argument("-c", "--weights_channel", choices=("single", "multiple"),
                       default="single", help="weight scales per tensor or per output channel")
    intel.add_argument("-s", "--sampling_iterations", default="10", metavar="N",
                       help="batches used for the calibration statistics (default 10; not an "
                            "integer: 10, as Intel's calibrator.py)")
    intel.add_argument("-ss", "--sampling_single", action="store_true",
                       help="statistics from the last of the -s batches only")
    intel.add_argument("-a", "--calibration_algos", default="KL", metavar="ALGO",
                       help="range estimator (Intel's default is DIRECT, ours KL): "
                            + describe_estimators())
    intel.add_argument("-q", "--quantize_model", action="store_true",
                       help="only quantize: write the quantized prototxt, no accuracy search")
    intel.add_argument("-p", "--performance_model", action="store_true",
                       help="write <model>_dummy.prototxt (or --output) with scale 1.0 "
                            "everywhere (speed measurement only) and stop")
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
                       help="with -1st: also write the first conv fed u8 as Intel's "
                            "first_conv_force_u8.py does (<output>_force_u8.prototxt and "
                            "<weights>_new.caffemodel beside it) and report its accuracy")
    intel.add_argument("-clx", "--is_clx", action="store_true",
                       help="the target has VNNI: -fu keeps the first conv's weight scales "
                            "(without it they are halved)")
    intel.add_argument("-uff", "--disable_force_fp32", action="store_true",
                       help="skip Intel's force_fp32_opt (every INT8 conv keeps an INT8 output, "
                            "the last one too)")
    intel.add_argument("-ucac", "--disable_cac_unify", action="store_true",
                       help="skip Intel's cac_opt (the conv after an AVE pooling takes the "
                            "scale of the conv before it)")
    intel.add_argument("-wi", "--conv_algo", action="store_true",
                       help="Winograd convolution: not supported (refused)")
    ours = parser.add_argument_group("calibrator options")
    ours.add_argument("--no-scale-search", dest="scale_search", action="store_false",
                      default=argparse.SUPPRESS,
                      help="search: no EasyQuant-style scale search on the worst layers")
    ours.add_argument("--no-fp32-fallback", dest="fp32_fallback", action="store_false",
                      default=argparse.SUPPRESS, help="search: never revert layers to FP32")
    ours.add_argument("--unify-concat-consumer", action="store_true",
                      help="with -f: the conv reading a Concat takes its unified scale as "
                           "scale_in (no requantization)")
    ours.add_argument("--bits", type=int, choices=(7, 8), default=8,
                      help="activation/weight bits (7: ARM-style +-63 values)")
    for writer in writers():
        if writer.option:
            ours.add_argument(writer.option, dest=f"output_{writer.name}",
                              metavar=writer.metavar, help=writer.help,
                              **({"nargs": "?", "const": ""} if writer.optional_value else {}))
    ours.add_argument("--easyquant", action="store_true",
                      help="with -q: EasyQuant (Wu et al. 2020) on every quantized layer, in "
                           "network order with the quantized network upstream (the search "
                           "always tries it unless --no-scale-search)")
    ours.add_argument("--equalize", action="store_true",
                      help="with --weights-out: channel equalization before calibrating: "
                           "each channel of a tensor read only by convolutions (through "
                           "sums and ReLU/ReLU6) is rescaled towards the tensor's widest "
                           "channel in the producers' weights and back in the consumers', "
                           "so the per-tensor INT8 scale fits every channel; the FP32 net is "
                           "unchanged (ReLU6: up to each channel's calibration maximum). "
                           "Best with -c multiple")
    ours.add_argument("--easyquant-images", type=int, default=argparse.SUPPRESS, metavar="N",
                      help="calibration images of EasyQuant and bias correction (default 50; "
                           "the positions are sampled over all of them, so more images make "
                           "the scales depend less on --easyquant-seed, in more time)")
    ours.add_argument("--easyquant-steps", type=int, default=argparse.SUPPRESS, metavar="N",
                      help="candidates per scale over [0.5, 2] x S (default 100)")
    ours.add_argument("--easyquant-positions", type=int, default=argparse.SUPPRESS,
                      metavar="N",
                      help="output positions EasyQuant samples in each layer to score its "
                           "candidates (default 1024, and 4096 with --bits 7: on MobileNetV2 "
                           "the larger sample lowered the 7-bit top-1 drop; all of them where "
                           "the layer has fewer): a larger sample makes the scales depend less on "
                           "--easyquant-seed, in more time (every candidate is scored on "
                           "every sampled position)")
    ours.add_argument("--easyquant-seed", type=int, default=argparse.SUPPRESS, metavar="N",
                      help="seed (default 0) of the output positions EasyQuant samples in "
                           "each layer (--easyquant-positions): the scales depend on the "
                           "sample, so the accuracy varies with it (on MobileNetV2 by about a "
                           "point of top-1 on unseen images); run two seeds to see the "
                           "spread on your model")
    ours.add_argument("--metric", choices=metric_kinds(), default=argparse.SUPPRESS,
                      help="what -n measures (default blob): " + describe_metrics())
    add_ap_version_option(ours)
    ours.add_argument("--relative", action="store_true", default=argparse.SUPPRESS,
                      help="-l is a relative drop")
    add_backend_options(ours)
    ours.add_argument("--saturation-fix", default="auto",
                      choices=("auto", "off") + tuple(COUNTERMEASURES),
                      help="counter-measures where --target saturates int16 pair sums "
                           "(avx2, avx512bw): auto: the search picks per layer, on the probe "
                           "images, among 7-bit weights (w7), halved weight scales (half) and, "
                           "on -onednn targets, s8 input (s8); off: none; w7/half/s8: that "
                           "fix on every layer whose weights can saturate (also with -q)")
    ours.add_argument("--strategy", choices=("bisect", "intel"), default=argparse.SUPPRESS,
                      help="bisect (default): rank layers by sensitivity, adjust the worst, "
                           "find the shortest prefix of the ranking to keep FP32 (top 1, 2, "
                           "4, ... then bisection), prune; intel: Intel's legacy loop "
                           "(revert convs in prototxt order, one full evaluation per step)")
    ours.add_argument("--max-evals", type=int, metavar="N", default=argparse.SUPPRESS,
                      help="stop after N full evaluations (FP32 included); the best found "
                           "is written")
    ours.add_argument("--time-budget", type=float, metavar="SECONDS", default=argparse.SUPPRESS,
                      help="start no full evaluation after this many seconds")
    ours.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                      help="continue an interrupted search from <output>.search.json "
                           "without repeating its full evaluations")
    ours.add_argument("--report", metavar="DIR",
                      help="write report.md, report.json and PNG plots into DIR")
    ours.add_argument("--probe-images", type=int, default=argparse.SUPPRESS, metavar="N",
                      help="images for the sensitivity ranking and the layer fixes, and "
                           "for --report's cosines (default 16)")
    ours.add_argument("--quiet", action="store_true", help="no progress bars")
    ours.add_argument("--debug", action="store_true", help="traceback on errors")
    add_device_options(ours)
    add_image_folder_options(parser)
    add_detection_list_options(parser)
    return parser


def intel_count(value: str, option: str, default: int) -> int:
    """-i / -s as Intel's calibrator.py reads them (scripts/calibrator.py, the ``int()``
    fallbacks after ``parse_args``): a value that is not an integer gives ``default``, with a
    warning (held, like every warning, until the command ends); below 1 is refused."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        log.warning("%s %r is not an integer: set to the default value %d, as Intel's "
                    "calibrator.py does", option, value, default)
        return default
    if count < 1:
        raise CalibratorError(f"{option} must be at least 1, got {count}")
    return count


def quant_options(args) -> QuantOptions:
    if args.conv_algo:
        raise CalibratorError("-wi/--conv_algo (Winograd) is not supported: INT8 Winograd "
                              "kernels are not simulated; run without -wi")
    if args.first_conv_force_u8 and not args.enable_1st_conv:
        raise CalibratorError("-fu/--first_conv_force_u8 needs -1st/--enable_1st_conv")
    if args.unify_concat_consumer and not args.unify_concat_scales:
        raise CalibratorError("--unify-concat-consumer needs -f/--unify_concat_scales")
    return QuantOptions(estimator=parse_estimator(args.calibration_algos),
                        per_channel=args.weights_channel == "multiple",
                        first_conv=args.enable_1st_conv, quantize_fc=args.fc_int8,
                        unsigned_range=args.unsigned_range, concat_fp32=args.concat_use_fp32,
                        unify_concat=args.unify_concat_scales,
                        unify_concat_consumer=args.unify_concat_consumer,
                        force_fp32_rule=not args.disable_force_fp32,
                        cac_rule=not args.disable_cac_unify,
                        force_u8=args.first_conv_force_u8, cascade_lake=args.is_clx,
                        bits=args.bits)


#: the options only the accuracy search reads (absent from ``args`` unless given: -q and -p
#: refuse them), with the value each takes when not given
SEARCH_DEFAULTS = {"strategy": "bisect", "metric": "blob", "max_evals": None,
                   "time_budget": None, "resume": False, "relative": False,
                   "fp32_fallback": True, "scale_search": True, "probe_images": 16}
_SEARCH_FLAGS = {"fp32_fallback": "--no-fp32-fallback", "scale_search": "--no-scale-search"}
#: --easyquant-images/-steps/-positions/-seed (absent unless given), LayerwiseSettings' own
#: defaults
_EASYQUANT_SETTINGS = ("easyquant_images", "easyquant_steps", "easyquant_positions",
                       "easyquant_seed")


def _search_option(args, name: str):
    return getattr(args, name, SEARCH_DEFAULTS[name])


def _refuse_search_options(args) -> None:
    """A search option given to -q or -p, which run no search: one line (it would be
    ignored). --probe-images stays with -q --report (its cosines use them)."""
    mode = "-p" if args.performance_model else "-q" if args.quantize_model else None
    if mode is None:
        return
    reported = mode == "-q" and args.report    # its cosines read --probe-images
    for flag in given_options(args, [name for name in SEARCH_DEFAULTS
                                     if not (name == "probe_images" and reported)],
                              _SEARCH_FLAGS):
        what = ("the accuracy search and --report" if flag == "--probe-images"
                else "the accuracy search")
        raise CalibratorError(f"{flag} applies to {what}, which this {mode} run does not "
                              f"have (drop {flag}, or {mode})")


def _refuse_layerwise_options(args, outputs: dict) -> None:
    """--easyquant and its settings where nothing runs EasyQuant or bias correction: one
    line (they would be ignored)."""
    if args.easyquant and (args.performance_model or not _search_option(args,
                                                                          "scale_search")):
        raise CalibratorError("--easyquant contradicts " + ("-p" if args.performance_model
                                                             else "--no-scale-search"))
    runs = ("weights" in outputs or args.easyquant if args.quantize_model
            else not args.performance_model and ("weights" in outputs
                                                 or _search_option(args, "scale_search")))
    given = given_options(args, _EASYQUANT_SETTINGS)
    if given and not runs:
        raise CalibratorError(f"{given[0]} applies only where EasyQuant or bias correction "
                              "runs (--easyquant or --weights-out with -q; the search unless "
                              "--no-scale-search)")


def run_config(args) -> RunConfig:
    """The RunConfig these options describe."""
    _refuse_search_options(args)
    outputs = {writer.name: getattr(args, f"output_{writer.name}")
               for writer in writers()
               if writer.option and getattr(args, f"output_{writer.name}", None) is not None}
    for writer in writers():  # an option given without its path: the writer's default
        if outputs.get(writer.name) == "":
            outputs[writer.name] = writer.default_path(args)
    _refuse_layerwise_options(args, outputs)
    option = functools.partial(_search_option, args)
    settings = SearchSettings(tolerance=args.accuracy_loss, relative=option("relative"),
                              strategy=option("strategy"), max_evals=option("max_evals"),
                              time_budget=option("time_budget"),
                              scale_search=option("scale_search"),
                              allow_fp32=option("fp32_fallback"),
                              probe_images=option("probe_images"),
                              saturation_fix=args.saturation_fix,
                              bias_correction="weights" in outputs,
                              layerwise=LayerwiseSettings(   # the defaults: its own
                                  **{dest.removeprefix("easyquant_"): getattr(args, dest)
                                     for dest in _EASYQUANT_SETTINGS if hasattr(args, dest)}))
    return RunConfig(model=args.model, weights=args.weights, quant=quant_options(args),
                     iterations=intel_count(args.iterations, "-i/--iterations", 1000),
                     sampling_iterations=intel_count(args.sampling_iterations,
                                                     "-s/--sampling_iterations", 10),
                     sampling_single=args.sampling_single,
                     blob=args.blob_name, metric=option("metric"), ap_version=args.ap_version,
                     detection=bool(args.detection), quantize_only=args.quantize_model,
                     performance_only=args.performance_model, outputs=outputs,
                     report=args.report, runtime=args.runtime or "intel",
                     target=args.target or "vnni", search=settings, resume=option("resume"),
                     easyquant=args.easyquant, equalize=args.equalize,
                     images=image_folder_options(args),
                     detection_list=detection_list_options(args), gpu=args.gpu,
                     quiet=args.quiet)


def run(args) -> int:
    return pipeline.run(run_config(args))
