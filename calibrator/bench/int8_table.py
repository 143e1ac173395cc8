"""FP32 against simulated INT8 accuracy for the Intel options that matter most: range
estimator (DIRECT, KL), weight scales per tensor or per channel, first conv FP32 or INT8.

    python -m calibrator.bench.int8_table -m TEST.prototxt -w W.caffemodel [-i 10] [-s 10]

One statistics pass serves every configuration (the options only change the scales)."""

from __future__ import annotations

import argparse
import json
import time

from tabulate import tabulate

from calibrator.backends import make_backend
from calibrator.evaluation import run_test
from calibrator.model import load_model, select_device
from calibrator.quant.calibrate import Calibration, calibrate
from calibrator.quant.scales import QuantOptions
from calibrator.runtime import tune_allocator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("-w", "--weights", required=True)
    parser.add_argument("-n", "--blob", default="accuracy-top1")
    parser.add_argument("-i", "--iterations", type=int, default=10)
    parser.add_argument("-s", "--sampling-iterations", type=int, default=10)
    parser.add_argument("--gpu", type=int)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    tune_allocator()
    model = load_model(args.model, args.weights, device=select_device(args.gpu))
    started = time.time()
    base = calibrate(model, QuantOptions(), args.sampling_iterations, quiet=True)
    statistics_seconds = time.time() - started
    fp32 = run_test(model, args.iterations, quiet=True).scores[args.blob].item()
    rows = []
    for first in (False, True):
        for estimator in ("DIRECT", "KL"):
            for per_channel in (False, True):
                options = QuantOptions(estimator=estimator, per_channel=per_channel,
                                       first_conv=first)
                calibration = Calibration(base.fused, base.stats, options)
                t0 = time.time()
                plan = calibration.plan()
                plan_seconds = time.time() - t0
                overrides = make_backend().simulator(calibration.fused, plan).overrides
                int8 = run_test(model, args.iterations, overrides=overrides,
                                quiet=True).scores[args.blob].item()
                rows.append({"first_conv": "INT8 (-1st)" if first else "FP32",
                             "estimator": estimator,
                             "weights": "per channel" if per_channel else "per tensor",
                             "fp32": fp32, "int8": int8, "drop": fp32 - int8,
                             "int8_layers": len(plan.layers),
                             "scales_seconds": round(plan_seconds, 2)})
    print(tabulate([[r["first_conv"], r["estimator"], r["weights"], f"{r['fp32']:.3f}",
                     f"{r['int8']:.3f}", f"{r['drop']:+.3f}", r["int8_layers"],
                     r["scales_seconds"]] for r in rows],
                   headers=["first conv", "estimator", "weights", "FP32", "INT8", "drop",
                            "INT8 layers", "scales s"]))
    print(f"statistics pass (2 x {args.sampling_iterations} batches): "
          f"{statistics_seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "statistics_seconds": statistics_seconds}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
