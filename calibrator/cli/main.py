"""``calibrator`` / ``python -m calibrator``: dispatch to a sub-command, turn bad input into
a one-line error with exit code 2 (a traceback only with --debug).

Under ``torchrun`` (see :mod:`calibrator.distributed`) every rank runs this same command:
the ranks join the process group after parsing, ranks other than 0 print nothing (their
stdout and stderr are silenced until the end), and an error on any rank ends every rank
with the same line and exit code."""

from __future__ import annotations

import argparse
import io
import os
import sys
import traceback

from calibrator import __version__, distributed
from calibrator.cli import annoset_cmd, calibrate_cmd, gate_cmd, test_cmd, verify_cmd
from calibrator.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, CalibratorError
from calibrator.runtime import deterministic_cuda, tune_allocator

SUBCOMMANDS = ("test", "gate", "verify", "make-annoset")
#: sub-commands that run in one process only (ONNX Runtime on the CPU; one LMDB written)
SINGLE_PROCESS = ("verify", "make-annoset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibrator",
        description="Accuracy-driven INT8 post-training calibration for Caffe models. "
                    "Calibrate: calibrator -m TEST.prototxt -w W.caffemodel [-i N -n BLOB -l "
                    "LOSS -d 0|1 ...] (see `calibrator -m x -w y -h`).")
    parser.add_argument("--version", action="version", version=f"calibrator {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show a full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    test_cmd.add_parser(subparsers)
    gate_cmd.add_parser(subparsers)
    verify_cmd.add_parser(subparsers)
    annoset_cmd.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        parser = calibrate_cmd.build_parser()
        parser.set_defaults(run=calibrate_cmd.run)
    tune_allocator()
    streams = sys.stdout, sys.stderr
    try:
        code = _run(parser, argv, debug)
    finally:
        sys.stdout, sys.stderr = streams
        ranked = distributed.close()
    if ranked:  # a torchrun worker: see distributed.close
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(parser, argv: list[str], debug: bool) -> int:
    streams = sys.stdout, sys.stderr
    try:
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        gpu = getattr(args, "gpu", None)
        if distributed.launched()[1] > 1 and argv and argv[0] in SINGLE_PROCESS:
            raise CalibratorError(f"calibrator {argv[0]} runs in one process: run it "
                                  "without torchrun")
        if gpu is not None and gpu >= 0:
            deterministic_cuda()
        distributed.init(cuda=gpu is not None and gpu >= 0)
        if not distributed.is_main():  # rank 0 alone prints
            sys.stdout = sys.stderr = io.StringIO()
        return distributed.finish(args.run(args))
    except KeyboardInterrupt:
        distributed.abandon()
        sys.stdout, sys.stderr = streams
        print("calibrator: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # bad input (exit 2) or a bug (exit 3): one line
        code, line = distributed.settle(exc)
        sys.stdout, sys.stderr = streams
        if debug:
            if code == EXIT_INTERNAL and not distributed.active():
                raise
            traceback.print_exc()
        print(line, file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
