"""Options shared by several commands."""

from __future__ import annotations

import argparse

from calibrator.backends import describe_runtimes, runtime_names
from calibrator.data.options import DetectionListOptions, ImageFolderOptions
from calibrator.detection.map import AP_VERSIONS
from calibrator.errors import CalibratorError
from calibrator.quant.targets import target_names


def add_model_options(parser, model_help: str,
                      weights_help: str = "FP32 weights, matched to layers by name") -> None:
    """-m PROTOTXT and -w CAFFEMODEL, the pair every command that runs a model takes."""
    parser.add_argument("-m", "--model", required=True, metavar="PROTOTXT", help=model_help)
    parser.add_argument("-w", "--weights", required=True, metavar="CAFFEMODEL",
                        help=weights_help)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", type=int, default=None, metavar="ID",
                        help="run on CUDA device ID (default: CPU)")


def add_backend_options(parser, default_note: str = "") -> None:
    """--runtime and --target: the backend that runs INT8 (calibrator.backends)."""
    parser.add_argument("--runtime", choices=runtime_names(), default=None,
                        help="whose INT8 graph to simulate: " + describe_runtimes()
                             + f" (default: intel{default_note})")
    parser.add_argument("--target", choices=target_names(), default=None, metavar="TARGET",
                        help="the INT8 arithmetic the simulation reproduces: "
                             f"{', '.join(target_names())}; vnni/generic exact int32 (what "
                             "the written prototxt targets); avx2/avx512bw u8xs8 pair sums "
                             "saturated to int16 (ONNX Runtime's rule for s8 inputs; -onednn: "
                             "oneDNN's); int7 7-bit operands; auto: this machine's CPU "
                             f"(default: vnni{default_note})")


def add_ap_version_option(parser) -> None:
    parser.add_argument("--ap-version", choices=AP_VERSIONS, default=None,
                        help="how mAP averages precision, as caffe test -ap_version "
                             "(default 11point)")


def add_image_folder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "deploy nets without a data layer",
        "feed an Input blob from a folder of images: cv2.imread (BGR), cv2.resize to the "
        "input size, then (pixel - mean) * norm")
    group.add_argument("--images", metavar="DIR", help="folder of images (sorted by name)")
    # (not given: absent, so that preprocessing given without a folder or list is refused)
    group.add_argument("--mean", type=float, nargs=3, metavar=("B", "G", "R"),
                       default=argparse.SUPPRESS, help="per-channel mean (default 0 0 0)")
    group.add_argument("--norm", type=float, default=argparse.SUPPRESS, metavar="S",
                       help="scale applied after the mean (default 1.0)")
    group.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                       default=argparse.SUPPRESS,
                       help="resize to H W (default: the Input shape)")
    group.add_argument("--batch-size", type=int, metavar="N", default=argparse.SUPPRESS,
                       help="batch size for --images (default: the Input shape's batch)")


#: the preprocessing options of --images and --det-list, and their defaults
_FEED_DEFAULTS = {"mean": (0.0, 0.0, 0.0), "norm": 1.0, "size": None, "batch_size": None}


def _feed(args) -> tuple:
    """(mean, norm, size, batch size) as given, else their defaults."""
    mean, norm, size, batch = (getattr(args, name, default)
                               for name, default in _FEED_DEFAULTS.items())
    return tuple(mean), norm, tuple(size) if size else None, batch


def given_options(args, dests, flags: dict | None = None) -> list[str]:
    """The options among ``dests`` given on the command line, as their flags (``flags``:
    dest -> flag where it is not ``--dest-with-dashes``). For options parsed with
    ``default=argparse.SUPPRESS``: absent from ``args`` unless given."""
    flags = flags or {}
    return [flags.get(dest, "--" + dest.replace("_", "-")) for dest in dests
            if hasattr(args, dest)]


def given_feed_options(args) -> list[str]:
    """The preprocessing options given on the command line (``--mean``, ...)."""
    return given_options(args, _FEED_DEFAULTS)


def given_detection_list_options(args) -> list[str]:
    """--labelmap and --name-size where given (they describe a --det-list)."""
    return [option for option, name in (("--labelmap", "labelmap"), ("--name-size", "name_size"))
            if getattr(args, name, None)]


def _refuse_unused_feed(args) -> None:
    """Preprocessing given where neither --images nor --det-list reads it: the net's own
    data layer transforms its input, so the option would be ignored."""
    given = given_feed_options(args)
    if given:
        raise CalibratorError(f"{given[0]} applies only with --images or --det-list (it "
                              "preprocesses their images; a data layer's transform_param "
                              "preprocesses its own)")


def add_detection_list_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "deploy detectors without a data layer",
        "evaluate a deploy net ending in DetectionOutput on a create_annoset-style list "
        "(lines 'IMAGE XML', Pascal VOC boxes): adds the data and DetectionEvaluate layers "
        "in memory; preprocessing from --mean/--norm/--size")
    group.add_argument("--det-list", metavar="LIST", help="list of 'image annotation.xml' lines")
    group.add_argument("--labelmap", metavar="PROTOTXT", help="Caffe-SSD LabelMap")
    group.add_argument("--name-size", metavar="FILE",
                       help="'NAME HEIGHT WIDTH' lines: compare boxes in original pixels")


def detection_list_options(args) -> DetectionListOptions | None:
    if not getattr(args, "det_list", None):
        for option in given_detection_list_options(args):
            raise CalibratorError(f"{option} applies only with --det-list (a net's own "
                                  "DetectionEvaluate layer names its label map and sizes)")
        return None
    if not args.labelmap:
        raise CalibratorError("--det-list needs --labelmap")
    if getattr(args, "images", None):
        raise CalibratorError("give --images or --det-list, not both")
    return DetectionListOptions(args.det_list, args.labelmap, args.name_size, *_feed(args))


def image_folder_options(args) -> ImageFolderOptions | None:
    if getattr(args, "det_list", None):
        return None
    if not getattr(args, "images", None):
        _refuse_unused_feed(args)
        return None
    return ImageFolderOptions(args.images, *_feed(args))
