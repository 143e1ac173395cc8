"""Output files: the quantized prototxt, the calibration table, the JSON record.

Every writer is deterministic (same plan, same bytes) and writes atomically."""

from calibrator.writers.outputs import (quantized_prototxt_path, write_json,
                                        write_quantized_prototxt, write_table)

__all__ = ["quantized_prototxt_path", "write_quantized_prototxt", "write_table", "write_json"]
