"""The command line: parsing and wiring only (``calibrator.cli.main:main``).

Process-wide settings belong to the command-line process alone, never to a library caller.
One is set here, when the CLI package is imported, because it must be set before torch
starts its OpenMP threads: on a machine that is already busy (its load average at least its
CPU count) or shared by several ranks of a torchrun, idle OpenMP threads sleep instead of
spinning (``OMP_WAIT_POLICY=PASSIVE``: spinning threads that compete for the cores cost
3-5x in PyTorch's CPU kernels). On an idle machine the runtime's default is kept: there,
sleeping threads pay a wake-up on each of the many small operations of the KL search
(``-q`` on MobileNetV2: 31 s passive, 21 s with the default, same bytes). A value the user
set is never changed."""

import os


def _busy() -> bool:
    try:
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            return True
    except ValueError:
        pass
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:  # no load average on this system
        return False


if _busy():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
