"""The process entry point (``python -m calibrator`` and the ``calibrator`` script).

Importing the command line loads torch, which takes a second or two; a Ctrl-C (or a
SIGTERM) in that time must give the same one line and exit code as one during the work, not
an interpreter traceback. So this module imports nothing heavy at its top: it sets the
handlers first, then imports the CLI inside the ``try`` (the one place in the package that
imports at call time, for that reason)."""

from __future__ import annotations

import signal
import sys


def _interrupted(signum, frame):
    raise KeyboardInterrupt(signum)


def entry() -> int:
    """Run the command line of this process; the exit code."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, _interrupted)
        from calibrator.cli.main import main  # heavy (torch): see the module docstring

        return main()  # sets its own handlers; this try covers the moments around it
    except KeyboardInterrupt as exc:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        print("calibrator: interrupted", file=sys.stderr, flush=True)
        return 128 + signum
