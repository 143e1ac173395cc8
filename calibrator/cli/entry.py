"""The process entry point (``python -m calibrator`` and the ``calibrator`` script).

Importing the command line loads torch, which takes a second or two; a Ctrl-C (or a
SIGTERM) in that time must give the same one line and exit code as one during the work, not
an interpreter traceback. So this module imports nothing heavy at its top: it sets its
handlers first, then imports the CLI (the one place in the package that imports at call
time, for that reason). A signal during that import is noted and acted on once the import
is over: raised inside it, a KeyboardInterrupt can be swallowed by a library's own
``except:`` and leave a half-imported module behind (numpy without ``numpy.matrix``).
Once the command has returned, its outputs are complete or cleaned up: a signal while the
interpreter shuts down is ignored, not raised inside a library's exit hook as a traceback."""

from __future__ import annotations

import signal
import sys

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
    """Run the command line of this process; the exit code."""
    pending: list[int] = []
    for s in _SIGNALS:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    from calibrator.cli.main import main  # heavy (torch): see the module docstring

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
