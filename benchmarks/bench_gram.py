"""Time the Gram matrix G += XᵀX of one calibration batch, the statistic that GPTQ, AWQ and MagR
need for every linear input, on the CPU: ``add_gram_blocks`` (three torch products, 3/4 of a full
product) against ``add_gram_syrk`` (BLAS's symmetric rank-k update through SciPy, half of one),
the latter being what ``add_gram`` runs on the CPU. The inputs are rounded to bfloat16 first, as
a bfloat16 calibration pass produces them; the table also gives each result's distance to the
float64 Gram matrix.

Shapes: one batch of SmolLM2's default calibration (5 windows of 512 tokens) at its two input
widths (576: q/k/v, o, gate/up; 1536: down), and LLaMA-7B's (4096 and 11008) at 2048 tokens.
One thread for torch and for SciPy's BLAS (as in the default run's jobs); best of 5.

    python benchmarks/bench_gram.py
"""

from __future__ import annotations

import time

import torch
from threadpoolctl import threadpool_limits

from ptqrepro.layerwise.statistics import add_gram_blocks, add_gram_syrk

CASES = ((2560, 576), (2560, 1536), (2048, 4096), (2048, 11008))
"""(tokens, input features) per batch."""
REPEATS = 5


def best_time(update, gram: torch.Tensor, x: torch.Tensor) -> float:
    times = []
    for _ in range(REPEATS):
        gram.zero_()
        started = time.perf_counter()
        update(gram, x)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    generator = torch.Generator().manual_seed(0)
    print("| tokens × features | blocks (s) | ssyrk (s) | speed-up | relative error blocks / ssyrk |")
    print("|---|---|---|---|---|")
    for tokens, features in CASES:
        x = torch.randn(tokens, features, generator=generator).bfloat16().float()
        exact = x.double().T @ x.double()
        gram = torch.zeros(features, features)
        row = []
        errors = []
        for update in (add_gram_blocks, add_gram_syrk):
            row.append(best_time(update, gram, x))
            errors.append(float((gram.double() - exact).norm() / exact.norm()))
        print(f"| {tokens} × {features} | {row[0]:.3f} | {row[1]:.3f} | {row[0] / row[1]:.2f}x "
              f"| {errors[0]:.1e} / {errors[1]:.1e} |")


if __name__ == "__main__":
    main()
