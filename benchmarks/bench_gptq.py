"""Time ``ptqrepro.methods.gptq.gptq`` against a plain reimplementation of the reference loop.

Cases: weights [4096, 4096] (LLaMA-7B q/k/v/o_proj) and [11008, 4096] (up/gate_proj), random
N(0, 0.02²) weights, Hessian ``G = XᵀX`` from 2048 tokens with correlated channels (64 shared
latent factors) and a few outlier channels, int4 with groups of 128, 2 threads, best of 3.

Each (shape, implementation) runs in a fresh subprocess that loads the prepared weight and
Hessian, notes ``ru_maxrss``, runs three times and notes ``ru_maxrss`` again: the table shows
the peak resident memory of the process and how much the runs added to it.

    python benchmarks/bench_gptq.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptqrepro.formats import GroupedFormat, IntFormat
from ptqrepro.methods.gptq import gptq
from ptqrepro.methods.rtn import rtn

SHAPES = [(4096, 4096), (11008, 4096)]
FORMAT = IntFormat(4, 128)
TOKENS = 2048
THREADS = 2
REPEATS = 3
ERROR_ROWS = 1024
"""Rows on which the layer error is compared with RTN (all rows would take longer than GPTQ)."""


def calibration_case(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight [out, in] and realistic calibration inputs X [2048, in]: tokens = noise +
    0.5 * (64 shared latent factors), with 8 outlier channels scaled by 20."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(TOKENS, 64, generator=generator) @ torch.randn(64, in_features, generator=generator)
    x = torch.randn(TOKENS, in_features, generator=generator) + 0.5 * latent
    outliers = torch.randperm(in_features, generator=generator)[:8]
    x[:, outliers] *= 20.0
    weight = 0.02 * torch.randn(out_features, in_features, generator=generator)
    return weight, x


def make_case(out_features: int, in_features: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weight and its Hessian G = X^T X (see ``calibration_case``)."""
    weight, x = calibration_case(out_features, in_features, seed)
    return {"weight": weight, "gram": x.T @ x}


def reference_loop(weight: torch.Tensor, gram: torch.Tensor, fmt: GroupedFormat,
                   blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """REFERENCE LOOP: the structure of the authors' ``GPTQ.fasterquant`` (IST-DASLab/gptq, groups
    fitted at each group boundary, no act-order), transcribed plainly: per column a quantize call
    on a column slice, an outer product subtracted from the rest of the block, the block's errors
    applied to the later columns by one matmul. Returns the quantized weight [out, in]."""
    w = weight.clone().float()
    h = gram.clone()
    columns = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(columns)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    quantized = torch.zeros_like(w)
    length = fmt.group_length(columns) or columns
    for first in range(0, columns, blocksize):
        last = min(first + blocksize, columns)
        count = last - first
        block = w[:, first:last].clone()
        block_q = torch.zeros_like(block)
        block_err = torch.zeros_like(block)
        block_h_inv = h_inv[first:last, first:last]
        for i in range(count):
            column = block[:, i]
            pivot = block_h_inv[i, i]
            if (first + i) % length == 0:
                params = fmt.fit(w[:, first + i : first + i + length])
            q = fmt.fake(column.unsqueeze(1), params).flatten()
            block_q[:, i] = q
            err = (column - q) / pivot
            block[:, i:] -= err.unsqueeze(1).matmul(block_h_inv[i, i:].unsqueeze(0))
            block_err[:, i] = err
        quantized[:, first:last] = block_q
        w[:, last:] -= block_err.matmul(h_inv[first:last, last:])
    return quantized


def quantize(implementation: str, case: dict[str, torch.Tensor]) -> torch.Tensor:
    if implementation == "ours":
        return gptq(case["weight"], case["gram"], FORMAT).quantized.dequantize()
    return reference_loop(case["weight"], case["gram"], FORMAT)


def run_one(implementation: str, case_file: str, result_file: str) -> None:
    """Child process: load the case, time REPEATS runs, report times and ru_maxrss (KiB) as JSON."""
    torch.set_num_threads(THREADS)
    case = torch.load(case_file)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = quantize(implementation, case)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(result, result_file)
    print(json.dumps({"times": times, "maxrss_before_kib": before, "maxrss_after_kib": after}))


def layer_error(gram: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``||X Wᵀ - X Qᵀ||² = tr(D G Dᵀ)`` with ``D = W - Q`` on the first ERROR_ROWS rows."""
    difference = w[:ERROR_ROWS] - q[:ERROR_ROWS]
    return float(((difference @ gram) * difference).sum())


def different_grid_points(weight: torch.Tensor, ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of entries where the two results chose different grid points. A group's scale fitted
    on columns that differ in their last bits moves every value of the group by a few ulps, so
    values count as the same point when they agree to 1e-4 of the weight's range (a grid step is
    about 1/15 of a group's range)."""
    tolerance = 1e-4 * float(weight.abs().max())
    return float(((ours - reference).abs() > tolerance).float().mean())


def measure(shape: tuple[int, int], folder: Path) -> list[dict]:
    """Both implementations on one shape, each in its own subprocess."""
    torch.set_num_threads(THREADS)
    case = make_case(*shape)
    case_file = folder / "case.pt"
    torch.save(case, case_file)
    rows, results = [], {}
    for implementation in ("reference", "ours"):
        result_file = folder / f"{implementation}.pt"
        output = subprocess.run(
            [sys.executable, __file__, "--child", implementation, str(case_file), str(result_file)],
            check=True, capture_output=True, text=True,
        ).stdout
        report = json.loads(output.strip().splitlines()[-1])
        results[implementation] = torch.load(result_file)
        rows.append({"shape": shape, "implementation": implementation, **report})
    baseline = layer_error(case["gram"], case["weight"], rtn(case["weight"], FORMAT).dequantize())
    for row in rows:
        quantized = results[row["implementation"]]
        row["differing"] = different_grid_points(case["weight"], quantized, results["reference"])
        row["error_vs_rtn"] = layer_error(case["gram"], case["weight"], quantized) / baseline
    return rows


def markdown(rows: list[dict]) -> str:
    reference = {row["shape"]: min(row["times"]) for row in rows if row["implementation"] == "reference"}
    lines = [
        "| weight [out, in] | implementation | best of 3 (s) | runs (s) | ours / reference | peak RSS (MiB) "
        "| added by runs (MiB) | entries on another grid point than the reference | layer error / RTN (first 1024 rows) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        best = min(row["times"])
        runs = ", ".join(f"{t:.2f}" for t in row["times"])
        peak = row["maxrss_after_kib"] / 1024
        added = (row["maxrss_after_kib"] - row["maxrss_before_kib"]) / 1024
        lines.append(
            f"| {row['shape'][0]}×{row['shape'][1]} | {row['implementation']} | {best:.2f} | {runs} "
            f"| {best / reference[row['shape']]:.2f} | {peak:.0f} | {added:.0f} "
            f"| {row['differing']:.2e} | {row['error_vs_rtn']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("IMPLEMENTATION", "CASE", "RESULT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(*args.child)
        return
    print(f"torch {torch.__version__}, {THREADS} threads, format {FORMAT.name}, {TOKENS} calibration tokens\n")
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for shape in SHAPES for row in measure(shape, Path(folder))]
    print(markdown(rows))


if __name__ == "__main__":
    main()
