"""The argument parser every command uses: argparse with our error contract.

* A usage error is a :class:`UsageError` (a CalibratorError): the CLI prints it as its one
  line and exits 2; argparse's usage text stays off stderr unless ``--debug``.
* A negative number is always an option's value, never an option: ``-l -1`` gives -l the
  value -1, where argparse would take ``-1`` for an abbreviation of ``-1st`` (the parser has
  an option that looks like a negative number, so argparse stops recognising numbers)."""

from __future__ import annotations

import argparse
import re

from calibrator.errors import CalibratorError

_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                     re.IGNORECASE)

EXIT_CODES = ("exit codes: 0: done (the main command: -l met); 1: -l not met, the best "
              "configuration written (gate: a check failed); 2: bad input, one line on "
              "stderr, nothing written; 130: interrupted (SIGINT, Ctrl-C); 143: terminated "
              "(SIGTERM) - the search state is kept for --resume; 3: a bug in calibrator "
              "(please report it, with the --debug traceback)")


class UsageError(CalibratorError):
    """A command line argparse refuses; ``usage`` is the text argparse would print."""

    def __init__(self, message: str, usage: str = ""):
        super().__init__(message)
        self.usage = usage


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's hook: never print, never exit here
        raise UsageError(message, self.format_usage())

    def _parse_optional(self, arg_string):
        if _NUMBER.match(arg_string) and arg_string not in self._option_string_actions:
            return None  # a value (argparse treats None as a positional string)
        return super()._parse_optional(arg_string)
