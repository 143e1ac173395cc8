"""Human-readable results: the console tables and the ``--report DIR`` files."""

from calibrator.report.tables import layer_rows, layer_table, trace_table
from calibrator.report.files import write_report

__all__ = ["layer_rows", "layer_table", "trace_table", "write_report"]
