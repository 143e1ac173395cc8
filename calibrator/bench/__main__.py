"""``python -m calibrator.bench [--section NAME ...] [--out bench.json] [--gpu ID] [--quiet]``:
run the registered benchmark sections, print their tables, write bench.json."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import cv2
import numpy as np
import torch
from tabulate import tabulate

from calibrator.bench import Context, find_shared, load_sections
from calibrator.errors import CalibratorError
from calibrator.fileio import atomic_write
from calibrator.model import select_device
from calibrator.runtime import tune_allocator


def build_parser(sections) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m calibrator.bench",
        description="Benchmarks of calibrator (speed only: correctness is the test suite's). "
                    "Sections: " + "; ".join(f"{s.name}: {s.title}" for s in sections.values()))
    parser.add_argument("--out", default="bench.json", metavar="FILE",
                        help="where to write every figure as JSON (default bench.json)")
    parser.add_argument("--gpu", type=int, default=None, metavar="ID",
                        help="run calibrator on CUDA device ID (default: CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="timed passes per measurement (default 3; median and best kept)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch and OpenCV alike (default: each library's "
                             "own default; 1 gives stable figures on a busy machine)")
    parser.add_argument("--section", action="append", choices=list(sections), metavar="NAME",
                        help=f"run only this section (repeatable; default all: "
                             f"{', '.join(sections)})")
    parser.add_argument("--shared", metavar="DIR",
                        help="the shared models folder (default $CALIBRATOR_SHARED or ../shared)")
    return parser


def machine_info(ctx) -> dict:
    info = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads(),
        "numpy": np.__version__, "device": str(ctx.device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if ctx.device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(ctx.device)
    return info


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as the CLI does: the same process-wide settings as calibrator test
    sections = load_sections()
    args = build_parser(sections).parse_args(argv)
    try:

        if args.repeat < 1:
            raise CalibratorError(f"--repeat must be at least 1, got {args.repeat}")
        if args.threads is not None:
            if args.threads < 1:
                raise CalibratorError(f"--threads must be at least 1, got {args.threads}")
            torch.set_num_threads(args.threads)
            cv2.setNumThreads(args.threads)
        ctx = Context(shared=find_shared(args.shared), device=select_device(args.gpu),
                      gpu=args.gpu, repeat=args.repeat, quiet=args.quiet,
                      threads=args.threads)
        report = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "machine": machine_info(ctx), "load_average_start": _load(), "sections": {}}
        for name in args.section or list(sections):
            sec = sections[name]
            ctx.log(f"section {name}: {sec.title}")
            result = sec.run(ctx)
            report["sections"][name] = {"title": sec.title, **result.data,
                                        "notes": result.notes}
            print(f"\n== {name}: {sec.title}")
            for table in result.tables:
                if table.title:
                    print(f"\n{table.title}")
                print(tabulate(table.rows, headers=table.headers, floatfmt="g",
                               missingval="-"))
            for note in result.notes:
                print(f"- {note}")
        report["load_average_end"] = _load()
        busy = max(loads[0] if loads else 0.0
                   for loads in (report["load_average_start"], report["load_average_end"]))
        cpus = report["machine"]["cpus_usable"] or 1
        if busy > cpus:
            print(f"\nwarning: load average reached {busy:g} on {cpus} CPU(s) (other processes "
                  "compete for the CPUs): the timings are unreliable, rerun on an idle machine")
        atomic_write(args.out, json.dumps(report, indent=2) + "\n")
        print(f"\nwritten {args.out}")
        return 0
    except CalibratorError as exc:
        print(f"calibrator.bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
