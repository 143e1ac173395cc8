"""``calibrator`` / ``python -m calibrator``: dispatch to a sub-command, turn bad input into
a one-line error with exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import argparse
import sys
import traceback

from calibrator import __version__
from calibrator.cli import annoset_cmd, calibrate_cmd, gate_cmd, test_cmd, verify_cmd
from calibrator.errors import CalibratorError
from calibrator.runtime import tune_allocator

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
SUBCOMMANDS = ("test", "gate", "verify", "make-annoset")


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
    try:
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        return args.run(args)
    except CalibratorError as exc:
        if debug:
            traceback.print_exc()
        print(f"calibrator: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("calibrator: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so in one line
        if debug:
            raise
        print(f"calibrator: internal error: {type(exc).__name__}: {exc}".splitlines()[0]
              + " (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
