"""The command line: parsing and wiring only (``calibrator.cli.main:main``).

Process-wide settings belong to the command-line process alone, never to a library caller:
idle OpenMP threads sleep instead of spinning (on a busy machine, CI or a shared 2-core box,
spinning threads cost 3-5x in PyTorch's CPU kernels). The variable must be set before torch
loads, which is why it is set here, when the CLI package is imported."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
