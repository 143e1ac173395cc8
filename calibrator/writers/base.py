"""The Writer contract: one output file of a calibration run.

A writer names itself (the key of ``RunConfig.outputs``), may declare the command-line
option that asks for it (``option``, ``metavar``, ``help``: the CLI adds it), and writes its
file from an :class:`OutputContext`, deterministically (same plan, same bytes) and
atomically (:func:`calibrator.fileio.atomic_write`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class OutputContext:
    """What the writers read: the model, the fused view, the final plan and its record."""

    model: object                 # calibrator.model.Model
    fused: object                 # calibrator.quant.fusion.FusedGraph
    plan: object                  # calibrator.quant.scales.QuantPlan
    stats: dict | None = None     # tensor statistics (BlobRef.key -> TensorStats)
    backend: object = None        # calibrator.backends.Backend the plan was made for
    record: dict = field(default_factory=dict)   # extra JSON fields (the search summary)
    force_u8: object = None       # calibrator.quant.force_u8.ForceU8 (-fu), once computed


class Writer:
    name = ""
    option: str | None = None     # e.g. "--table"; None: no command-line option
    metavar = "FILE"
    help = ""
    #: the option may be given without a path: ``default_path(config)`` is used
    optional_value = False

    def default_path(self, config) -> Path | None:
        return None

    def write(self, path: Path, context: OutputContext) -> Path:
        raise NotImplementedError
