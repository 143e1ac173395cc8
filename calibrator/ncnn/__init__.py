"""ncnn as a runtime: write the ncnn model ourselves and simulate ncnn's INT8 arithmetic.

Public surface:

* :func:`write_ncnn_model(net, plan_or_None, prefix, table=None)
  <calibrator.ncnn.writer.write_ncnn_model>` writes ``PREFIX.param`` + ``PREFIX.bin``: what
  caffe2ncnn -> ncnnoptimize would write for the Caffe net (``plan`` None), or with a
  :class:`~calibrator.quant.scales.QuantPlan` what ncnn2int8 would then write from our
  calibration table (``table``: also write that table). Returns an
  :class:`~calibrator.ncnn.writer.NcnnModel` (paths, the in-memory graph, and the
  Caffe-blob -> ncnn-blob names of ``inputs`` and ``outputs``).
* :class:`NcnnSimulator(fused, plan) <calibrator.ncnn.simulate.NcnnSimulator>`: ``.overrides``
  for ``CaffeNet.forward`` that compute what ncnn's x86 INT8 kernels compute with that model
  (int8 layers bit for bit; float layers to float32 rounding).
* :func:`run_ncnn(param_path, bin_path, feeds) -> outputs <calibrator.ncnn.runtime.run_ncnn>`:
  the real kernels through the optional ``ncnn`` Python package (``pip install ncnn``).
* :func:`~calibrator.ncnn.quantize.scales_from_plan` / :func:`~calibrator.ncnn.quantize.
  write_ncnn_table`: the ncnn calibration table (ncnn2table's conventions, 6-bit weight
  scales for Winograd 3x3 convolutions).

Modules, one concern each: ``convert`` (caffe2ncnn), ``optimize`` (ncnnoptimize),
``quantize`` (table + ncnn2int8), ``serialize`` (.param/.bin format), ``writer``,
``arith`` (ncnn's float32 rounding rules), ``simulate``, ``runtime``. Every conversion or
simulation function names the ncnn source file and function it reproduces.
"""

from calibrator.ncnn.quantize import scales_from_plan, write_ncnn_table
from calibrator.ncnn.runtime import run_ncnn
from calibrator.ncnn.simulate import NcnnSimulator
from calibrator.ncnn.writer import NcnnModel, build_ncnn_graph, write_ncnn_model

__all__ = ["write_ncnn_model", "build_ncnn_graph", "NcnnModel", "NcnnSimulator", "run_ncnn",
           "scales_from_plan", "write_ncnn_table"]
