"""The one exception type the CLI turns into a one-line message and exit code 2, and the
one function that makes any message safe to print as one line."""

from __future__ import annotations

import unicodedata

#: the longest line the CLI prints; longer messages lose their middle to an ellipsis
MESSAGE_LIMIT = 1000
#: the longest single value (a path, a token of the input) quoted inside a message
VALUE_LIMIT = 200
ELLIPSIS = "…"

EXIT_BAD_INPUT = 2   # a CalibratorError: one line on stderr
EXIT_INTERNAL = 3    # anything else (a bug): one line, the traceback with --debug


class CalibratorError(Exception):
    """Bad input the user can fix: a missing file, a malformed prototxt, a blob shape that
    does not fit. The message is one line and names the file, layer or line at fault."""


class LayerError(CalibratorError):
    """A problem with one layer: the message is prefixed with its name and type."""

    def __init__(self, layer_name, layer_type, message):
        super().__init__(f"layer '{shorten(layer_name)}' ({shorten(layer_type)}): {message}")
        self.layer_name = layer_name
        self.layer_type = layer_type


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the CLI prints ``calibrator: interrupted`` and exits 128 + signum.
    A KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{code:02x}")
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    """Control, format (bidi overrides), separator and surrogate characters: anything a
    terminal may act on or that breaks the line."""
    if " " <= char <= "~":
        return False
    return unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn")


def escape(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``)."""
    text = str(text)
    if text.isprintable() and text.isascii():
        return text
    return "".join(_escape(c) if _unsafe(c) else c for c in text)


def shorten(value, limit: int = VALUE_LIMIT) -> str:
    """``value`` as text for a message, escaped and cut in the middle with an ellipsis when
    longer than ``limit`` (the start and the end of a path are what tell it apart)."""
    text = escape(str(value))
    if len(text) <= limit:
        return text
    head = (limit * 2) // 3
    return text[:head] + ELLIPSIS + text[len(text) - (limit - head - 1):]


def one_line(message, limit: int = MESSAGE_LIMIT) -> str:
    """What the CLI prints for ``message``: control characters escaped (no terminal
    injection, never a second line), at most ``limit`` characters."""
    return shorten(message, limit)
