"""``calibrator test``: the ``caffe test`` equivalent (FP32, or INT8 simulation when the
prototxt carries quantization_param)."""

from __future__ import annotations

import argparse

from calibrator.backends import backend_for
from calibrator.cli.common import (add_ap_version_option, add_backend_options,
                                   add_detection_list_options, add_device_options,
                                   add_image_folder_options, add_model_options,
                                   detection_list_options, image_folder_options)
from calibrator.cli.parsing import EXIT_CODES
from calibrator.evaluation import dump_names, run_test
from calibrator.model import load_model, quantized_plan, select_device
from calibrator.quant.fusion import analyze
from calibrator.quant.simulate import FoldedFP32
from calibrator.outputs import OutputPlan, data_inputs, option_inputs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "test", help="run N TEST batches and print each output blob's mean, as caffe test",
        description="Run N TEST-phase batches and print the mean of every output blob over "
                    "them (name = value), as `caffe test` does. A prototxt whose layers carry "
                    "quantization_param runs as simulated INT8, by the runtime and target it "
                    "records (or --runtime/--target).")
    parser.epilog = EXIT_CODES
    add_model_options(parser, "network definition with a TEST data layer (or --images)",
                      "trained weights, matched to layers by name")
    parser.add_argument("-i", "--iterations", type=int, default=50, metavar="N",
                        help="number of batches (default 50, as caffe test)")
    parser.add_argument("--dump", metavar="DIR",
                        help="save every output blob of every batch as DIR/<blob>_<batch>.npy")
    add_backend_options(parser, ", or what the quantized prototxt records")
    add_ap_version_option(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_options(parser)
    add_image_folder_options(parser)
    add_detection_list_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    images, detection = image_folder_options(args), detection_list_options(args)
    outputs = OutputPlan()
    if args.dump:
        outputs.folder("--dump", args.dump, dump_names(None, args.iterations))
    outputs.check(inputs=[args.model, args.weights, *option_inputs(detection)])
    model = load_model(args.model, args.weights, images=images, detection_list=detection,
                       device=select_device(args.gpu))
    if args.dump:
        outputs.folders[0].writes = dump_names(model.net.output_names, args.iterations)
    outputs.check_inputs(data_inputs(model))
    backend = backend_for(args.model, args.runtime, args.target)
    quantized = quantized_plan(model.net)
    if quantized is not None:  # an INT8 prototxt: simulate what it describes
        fused, plan = quantized
        overrides = backend.simulator(fused, plan).overrides
    else:  # FP32, each fused unit one convolution (as the runtimes fold it)
        overrides = FoldedFP32(analyze(model.net, quantize_fc=True)).overrides
    result = run_test(model, args.iterations, dump_dir=args.dump, overrides=overrides,
                      quiet=args.quiet, ap_version=args.ap_version, fp32=quantized is None)
    for line in result.lines():
        print(line)
    return 0
