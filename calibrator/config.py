"""The run configuration: everything one calibration run needs, built once (by the CLI from
its options, or by a library caller) and read by the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from calibrator.data.options import DetectionListOptions, ImageFolderOptions
from calibrator.quant.scales import QuantOptions
from calibrator.search.loop import SearchSettings


@dataclass
class RunConfig:
    model: Path                       # -m: TEST prototxt
    weights: Path                     # -w: FP32 caffemodel
    quant: QuantOptions = field(default_factory=QuantOptions)
    iterations: int = 10              # -i: TEST batches per full evaluation
    sampling_iterations: int = 10     # -s: batches for the statistics
    sampling_single: bool = False     # -ss: statistics from the last of those batches only
    blob: str = ""                    # -n: metric blob ("" = Intel's default)
    metric: str = "blob"              # metric kind (calibrator.metrics)
    ap_version: str | None = None     # mAP flavour (None: 11point)
    detection: bool = False           # -d 1
    quantize_only: bool = False       # -q
    performance_only: bool = False    # -p
    #: writer name -> path (calibrator.writers); the prototxt gets its default if absent
    outputs: dict[str, Path] = field(default_factory=dict)
    report: Path | None = None        # --report DIR
    runtime: str = "intel"            # --runtime (calibrator.backends)
    target: str = "vnni"              # --target (calibrator.quant.targets)
    search: SearchSettings = field(default_factory=lambda: SearchSettings(tolerance=0.01))
    resume: bool = False
    easyquant: bool = False           # -q: EasyQuant on every quantized layer
    images: ImageFolderOptions | None = None
    detection_list: DetectionListOptions | None = None
    gpu: int | None = None
    quiet: bool = False

    def __post_init__(self):
        self.model = Path(self.model)
        self.weights = Path(self.weights)
        self.outputs = {name: Path(path) for name, path in self.outputs.items()}
        if self.report is not None:
            self.report = Path(self.report)
