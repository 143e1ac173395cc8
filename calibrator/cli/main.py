"""``calibrator`` / ``python -m calibrator``: dispatch to a sub-command, turn bad input into
a one-line error with exit code 2 (a traceback only with --debug).

Exit codes: 0 done (-l met), 1 -l not met (gate: a check failed), 2 bad input, 130/143
interrupted by SIGINT/SIGTERM, 3 a bug (a message asks for a report). Whatever happens,
stderr gets one line: the message is cleaned (:func:`calibrator.errors.one_line`), and
third-party noise (libjpeg's warnings written straight to file descriptor 2, numpy's
RuntimeWarnings, argparse's usage) is kept off it unless ``--debug``.

Under ``torchrun`` (see :mod:`calibrator.distributed`) every rank runs this same command:
the ranks join the process group after parsing, ranks other than 0 print nothing (their
stdout and stderr are silenced until the end), and an error on any rank ends every rank
with the same line and exit code."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import threading
import traceback
import warnings

from calibrator import __version__, distributed
from calibrator.cli import annoset_cmd, calibrate_cmd, gate_cmd, test_cmd, verify_cmd
from calibrator.cli.parsing import EXIT_CODES, ArgumentParser, UsageError
from calibrator.errors import (EXIT_BAD_INPUT, EXIT_INTERNAL, CalibratorError, Interrupted,
                               one_line)
from calibrator.runtime import deterministic_cuda, tune_allocator

SUBCOMMANDS = ("test", "gate", "verify", "make-annoset")
#: sub-commands that run in one process only (ONNX Runtime on the CPU; one LMDB written)
SINGLE_PROCESS = ("verify", "make-annoset")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="calibrator",
        description="Accuracy-driven INT8 post-training calibration for Caffe models. "
                    "Calibrate: calibrator -m TEST.prototxt -w W.caffemodel [-i N -n BLOB -l "
                    "LOSS -d 0|1 ...] (see `calibrator -m x -w y -h`).",
        epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"calibrator {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show a full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    test_cmd.add_parser(subparsers)
    gate_cmd.add_parser(subparsers)
    verify_cmd.add_parser(subparsers)
    annoset_cmd.add_parser(subparsers)
    return parser


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def _signal_handlers(handler):
    """SIGINT and SIGTERM go to ``handler`` inside the block, then back to what they were
    (only the main thread can set handlers: elsewhere, Python's defaults stay)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def _signals_raise():
    """SIGINT and SIGTERM raise :class:`Interrupted` while the command runs."""
    return _signal_handlers(_raise_interrupted)


def _ignore_signals():
    """While the one line is printed and the process winds down: a second Ctrl-C must not
    turn the message into a traceback."""
    return _signal_handlers(signal.SIG_IGN)


@contextlib.contextmanager
def _no_python_warnings(enabled: bool):
    """numpy's and torch's RuntimeWarnings/UserWarnings ("overflow encountered in cast")
    are noise to a user, whose input problems get our own one-line message."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool):
    """Send what native libraries write straight to file descriptor 2 (libjpeg's "Premature
    end of JPEG file", OpenCV's and ONNX Runtime's C++ warnings) to /dev/null, while Python's
    own ``sys.stderr`` keeps the real stderr."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):  # no fd 2 (embedded, closed): nothing to do
        yield
        return
    replaced = wrapper = None
    try:
        if _uses_fd2(sys.stderr):
            replaced = sys.stderr
            wrapper = open(saved, "w", buffering=1, encoding=replaced.encoding,
                           errors="backslashreplace", closefd=False)
            sys.stderr = wrapper
        os.dup2(devnull, 2)
        yield
    finally:
        try:
            if replaced is not None:
                sys.stderr = replaced
                wrapper.close()  # flushes; the descriptor is closed below
            os.dup2(saved, 2)
        finally:
            os.close(saved)
            os.close(devnull)


def _uses_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (OSError, ValueError, AttributeError):
        return False


class _CleanMessages(logging.Formatter):
    """Our log warnings as ``calibrator: warning: ...`` on one line."""

    def format(self, record) -> str:
        return one_line(f"calibrator: {record.levelname.lower()}: {record.getMessage()}")


class _Held(logging.Handler):
    """Keeps the package's log records (warnings about ignored fields, layers kept FP32...)
    until the command ends: printed, cleaned, when it finishes (exit 0 or 1); dropped when it
    fails, whose one line is then all of stderr."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(_CleanMessages())
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))

    def flush_to_stderr(self) -> None:
        for line in dict.fromkeys(self.lines):  # once each, in order
            print(line, file=sys.stderr)
        sys.stderr.flush()
        self.lines.clear()


@contextlib.contextmanager
def _held_warnings():
    logger = logging.getLogger("calibrator")
    handler = _Held()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _say(line: str) -> None:
    print(one_line(line), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    streams = sys.stdout, sys.stderr
    try:
        code = _main(argv, debug)
    finally:
        sys.stdout, sys.stderr = streams
        ranked = distributed.close()
    if ranked:  # a torchrun worker: see distributed.close
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str], debug: bool) -> int:
    streams = sys.stdout, sys.stderr
    with _signals_raise():
        try:
            with _quiet_native_stderr(not debug), _no_python_warnings(not debug), \
                    _held_warnings() as warnings_seen:
                code = _run(argv)
                warnings_seen.flush_to_stderr()
                return code
        except UsageError as exc:
            sys.stdout, sys.stderr = streams
            with _ignore_signals():
                if debug and exc.usage:
                    print(exc.usage.rstrip(), file=sys.stderr)
                _say(f"calibrator: error: {exc}")
            return EXIT_BAD_INPUT
        except KeyboardInterrupt as exc:
            distributed.abandon()
            sys.stdout, sys.stderr = streams
            with _ignore_signals():
                if debug:
                    traceback.print_exc()
                _say("calibrator: interrupted")
            return 128 + getattr(exc, "signum", signal.SIGINT)
        except Exception as exc:  # bad input (2) or a bug (3): one line, the same on all ranks
            code, line = distributed.settle(exc)
            sys.stdout, sys.stderr = streams
            with _ignore_signals():
                if debug:
                    if code == EXIT_INTERNAL and not distributed.active():
                        raise
                    traceback.print_exc()
                _say(line)
            return code


def _run(argv: list[str]) -> int:
    parser = build_parser()
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        parser = calibrate_cmd.build_parser()
        parser.set_defaults(run=calibrate_cmd.run)
    tune_allocator()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    gpu = getattr(args, "gpu", None)
    if distributed.launched()[1] > 1 and argv and argv[0] in SINGLE_PROCESS:
        raise CalibratorError(f"calibrator {argv[0]} runs in one process: run it without "
                              "torchrun")
    if gpu is not None and gpu >= 0:
        deterministic_cuda()
    distributed.init(cuda=gpu is not None and gpu >= 0)
    if not distributed.is_main():  # rank 0 alone prints
        sys.stdout = sys.stderr = io.StringIO()
    return distributed.finish(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
