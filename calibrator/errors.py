"""The one exception type the CLI turns into a one-line message and exit code 2."""

EXIT_BAD_INPUT = 2   # a CalibratorError: one line on stderr
EXIT_INTERNAL = 3    # anything else (a bug): one line, the traceback with --debug


class CalibratorError(Exception):
    """Bad input the user can fix: a missing file, a malformed prototxt, a blob shape that
    does not fit. The message is one line and names the file, layer or line at fault."""


class LayerError(CalibratorError):
    """A problem with one layer: the message is prefixed with its name and type."""

    def __init__(self, layer_name, layer_type, message):
        super().__init__(f"layer '{layer_name}' ({layer_type}): {message}")
        self.layer_name = layer_name
        self.layer_type = layer_type
