"""The process entry point (``python -m calibrator`` and the ``calibrator`` script).

Importing the command line loads torch, which takes a second or two; a Ctrl-C (or a
SIGTERM) in that time must give the same one line and exit code as one during the work, not
an interpreter traceback. So this module imports nothing heavy at its top: it sets its
handlers first, then imports the CLI (the one place in the package that imports at call
time, for that reason). A signal during that import is noted and acted on once the import
is over: raised inside it, a KeyboardInterrupt can be swallowed by a library's own
``except:`` and leave a half-imported module behind (numpy without ``numpy.matrix``).
The import runs with the garbage collector paused, and what it made is then moved out of
the collector's sight (:func:`_import_main`). Once the command has returned, its outputs are
complete or cleaned up: a signal while the interpreter shuts down is ignored, not raised
inside a library's exit hook as a traceback. The process then ends without the
interpreter's teardown (:func:`_leave`)."""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupted(signum, frame):
    raise KeyboardInterrupt(signum)


def _ignore() -> None:
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _stop(signum: int) -> int:
    _ignore()
    print("calibrator: interrupted", file=sys.stderr, flush=True)
    return 128 + signum


def entry() -> int:
    """Run the command line of this process; the exit code (where :func:`_leave` could
    not end the process itself)."""
    try:
        code = _command()
    except SystemExit as exc:   # (argparse's --help and --version end this way)
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        code = exc.code or 0
    _leave(code)
    gc.unfreeze()   # (the usual teardown finalises no frozen object: see _import_main)
    return code


def _command() -> int:
    pending: list[int] = []
    for s in _SIGNALS:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    main = _import_main()
    if pending:
        return _stop(pending[0])
    try:
        for s in _SIGNALS:
            signal.signal(s, _interrupted)
        return main()  # sets its own handlers; this try covers the moments around it
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        return _stop(signum)
    finally:
        _ignore()  # the command is over; the interpreter's shutdown is not the work


def _import_main():
    """``calibrator.cli.main.main``, imported (heavy: torch; see the module docstring) with
    the garbage collector paused, its objects then frozen (``gc.freeze``). The import makes
    about 275,000 objects (torch's modules, functions, types) that live as long as the
    process; the collector, run every 700 new objects, walks those made so far again and
    again during the import, and a full collection of the command would walk them all
    again. Frozen, they are never walked: ``-q`` on MobileNetV2 through this entry point
    5.71 s -> 5.53 s (mean of four runs each, the same files).
    The import's own unreachable cycles (about 7,000 small objects, 0.7 MB) stay frozen
    with them: collecting them first would cost a full collection (0.08 s). Where the
    process ends the usual way (see :func:`_leave`), :func:`entry` unfreezes them first:
    the interpreter's teardown finalises no frozen object."""
    gc.disable()
    try:
        from calibrator.cli.main import main
    finally:
        gc.freeze()
        gc.enable()
    return main


def _leave(code: int) -> None:
    """End the process with ``code`` now that the command has returned: the exit handlers
    run (``atexit``: logging's flush, temporary folders, a coverage tool's data), stdout
    and stderr are flushed, then ``os._exit`` skips the interpreter's teardown, which frees
    each of torch's thousands of modules one by one (about half a second on a 2-core
    machine, a tenth of an FP32 pass over 500 images; a user's every run). The command's
    outputs were written and closed before it returned. Returns without ending (the
    interpreter then ends the usual way) where a thread the usual way would wait for still
    runs (a daemon thread, such as a progress bar's monitor, is not waited for either way),
    or where a flush fails (a closed pipe: the usual way reports it as before)."""
    run_handlers = getattr(atexit, "_run_exitfuncs", None)   # (CPython's; the usual way
    if run_handlers is None or any(                            # runs the same handlers)
            thread is not threading.main_thread() and not thread.daemon
            for thread in threading.enumerate()):   # (the usual way waits for them)
        return
    if not _flushed():
        return
    run_handlers()
    _flushed()
    os._exit(code)


def _flushed() -> bool:
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return False
    return True
