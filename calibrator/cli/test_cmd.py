"""``calibrator test``: the ``caffe test`` equivalent (FP32, or INT8 simulation when the
prototxt carries quantization_param)."""

from __future__ import annotations

import argparse

from calibrator.cli.common import add_detection_list_options, add_device_options, \
    add_image_folder_options, add_model_options, detection_list_options, image_folder_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "test", help="run N TEST batches and print each output blob's mean, as caffe test",
        description="Run N TEST-phase batches and print the mean of every output blob over "
                    "them (name = value), as `caffe test` does. A prototxt whose layers carry "
                    "quantization_param runs as simulated INT8.")
    add_model_options(parser, "network definition with a TEST data layer (or --images)",
                      "trained weights, matched to layers by name")
    parser.add_argument("-i", "--iterations", type=int, default=50, metavar="N",
                        help="number of batches (default 50, as caffe test)")
    parser.add_argument("--dump", metavar="DIR",
                        help="save every output blob of every batch as DIR/<blob>_<batch>.npy")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_options(parser)
    add_image_folder_options(parser)
    add_detection_list_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from calibrator.evaluation import run_test
    from calibrator.model import load_model, select_device
    from calibrator.quant.fusion import analyze
    from calibrator.quant.params import from_proto, has_quantization
    from calibrator.quant.simulate import Int8Simulator

    model = load_model(args.model, args.weights, images=image_folder_options(args),
                       detection_list=detection_list_options(args),
                       device=select_device(args.gpu))
    overrides = None
    if has_quantization(model.test_param):  # an INT8 prototxt: simulate what it describes
        fused = analyze(model.net, quantize_fc=True)
        overrides = Int8Simulator(fused, from_proto(fused)).overrides
    result = run_test(model, args.iterations, dump_dir=args.dump, overrides=overrides,
                      quiet=args.quiet)
    for line in result.lines():
        print(line)
    return 0
