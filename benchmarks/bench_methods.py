"""Time AWQ and SmoothQuant on LLaMA-7B-shaped linear layers (CPU), with peak memory.

Cases: weights [4096, 4096] and [11008, 4096] (out x in), random N(0, 0.02^2) weights and the
same realistic Hessian as bench_gptq.py (G = X^T X of 2048 tokens with correlated channels and
outlier channels), weight format int4-g128, 2 threads, best of 3 (one run where the first takes
over 10 s). AWQ runs its scale search (20 ratios) and its clip search (10 thresholds) on the one
linear; SmoothQuant computes its scales and folds them into the weight. Each case runs in a fresh subprocess; the table shows its
peak resident memory.

    python benchmarks/bench_methods.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from bench_gptq import FORMAT, REPEATS, SHAPES, THREADS, calibration_case
from ptqrepro.methods.awq import apply_clip, search_clip, search_scales
from ptqrepro.methods.rtn import rtn
from ptqrepro.methods.smoothquant import smoothing_scales

SLOW_S = 10.0
"""A case whose first run takes longer than this is not repeated: its noise is small beside it."""


def make_case(out_features: int, in_features: int):
    weight, x = calibration_case(out_features, in_features)
    return weight, x.T @ x, x.abs().mean(dim=0), x.abs().amax(dim=0)


def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    return rtn(weight, FORMAT).dequantize()


def run_awq(weight, gram, absmean, _absmax):
    s, _ = search_scales([weight], gram, absmean, fake_quantize)
    scaled = weight * s
    return apply_clip(scaled, search_clip(scaled, gram / s[:, None] / s[None, :], 128, fake_quantize))


def run_smoothquant(weight, _gram, _absmean, absmax):
    return weight * smoothing_scales(absmax, [weight], 0.5)


METHODS = {"awq": run_awq, "smoothquant": run_smoothquant}


def measure(method: str, out_features: int, in_features: int) -> dict:
    torch.set_num_threads(THREADS)
    case = make_case(out_features, in_features)
    times = []
    while len(times) < REPEATS and not (times and times[0] > SLOW_S):
        started = time.perf_counter()
        METHODS[method](*case)
        times.append(time.perf_counter() - started)
    return {"best_s": min(times), "runs": len(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, out_features, in_features = args.case.split(":")
        print(json.dumps(measure(method, int(out_features), int(in_features))))
        return
    print("| method | weight (out x in) | best time (s) | runs | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        for out_features, in_features in SHAPES:
            output = subprocess.run([sys.executable, __file__, "--case", f"{method}:{out_features}:{in_features}"],
                                    capture_output=True, text=True, check=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            print(f"| {method} | {out_features} x {in_features} | {result['best_s']:.2f} | {result['runs']} "
                  f"| {result['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
