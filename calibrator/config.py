"""The run configuration: everything one calibration run needs, built once (by the CLI from
its options, or by a library caller) and read by the pipeline."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from calibrator.data.options import DetectionListOptions, ImageFolderOptions
from calibrator.errors import CalibratorError
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
    equalize: bool = False            # --equalize: channel equalization (needs --weights-out)
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

    def validate(self) -> None:
        """A CalibratorError, naming the option, for a value no run can use: counts below 1,
        a tolerance or time budget that is not a finite number (NaN would make every
        comparison false: a search that can never pass)."""
        for option, value in (("-i/--iterations", self.iterations),
                              ("-s/--sampling_iterations", self.sampling_iterations),
                              ("--probe-images", self.search.probe_images)):
            if value < 1:
                raise CalibratorError(f"{option} must be at least 1, got {value}")
        layerwise = self.search.layerwise
        for option, value, least in (("--easyquant-images", layerwise.images, 1),
                                     ("--easyquant-steps", layerwise.steps, 2),
                                     ("--easyquant-positions", layerwise.positions, 1),
                                     ("--easyquant-seed", layerwise.seed, 0)):
            if value is not None and value < least:
                raise CalibratorError(f"{option} must be at least {least}, got {value}")
        if self.equalize and "weights" not in self.outputs:
            raise CalibratorError("--equalize rescales the weights, which reach the runtime "
                                  "only through the caffemodel --weights-out writes: give "
                                  "--weights-out")
        if self.equalize and self.performance_only:
            raise CalibratorError("--equalize contradicts -p (nothing is calibrated)")
        max_evals = self.search.max_evals
        if max_evals is not None and max_evals < 2:
            raise CalibratorError(f"--max-evals must be at least 2 (it counts the FP32 "
                                  f"evaluation, and the INT8 one), got {max_evals}")
        tolerance = self.search.tolerance
        if not math.isfinite(tolerance) or tolerance < 0:
            raise CalibratorError(f"-l/--accuracy_loss must be a finite number >= 0, got "
                                  f"{tolerance}")
        budget = self.search.time_budget
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise CalibratorError(f"--time-budget must be a finite number of seconds > 0, "
                                  f"got {budget}")
