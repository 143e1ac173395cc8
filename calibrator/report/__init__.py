"""Human-readable results: the console tables and the ``--report DIR`` files."""

from calibrator.report.cosines import unit_cosines
from calibrator.report.files import REPORT_FILES, write_report
from calibrator.report.tables import layer_rows, layer_table, trace_table

__all__ = ["REPORT_FILES", "layer_rows", "layer_table", "trace_table", "unit_cosines",
           "write_report"]
