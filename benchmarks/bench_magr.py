"""Time ``ptqrepro.methods.magr.magr`` against a plain reimplementation of the authors' loop.

Cases: the weights and calibration inputs of ``bench_gptq.py`` (``calibration_case``: [4096, 4096]
and [11008, 4096], 2048 tokens), per-channel MagR with α = 1e-3 and 150 iterations, 2 threads.
Ours gets ``G = XᵀX``, with float32 products (``ours``) and bfloat16 ones (``ours-bf16``, the
step's ``precision: bfloat16``); the reference gets X, as the authors' ``W_proximal_preprocess`` does.

Each (shape, implementation) runs once in a fresh subprocess that loads only its inputs, notes
``ru_maxrss``, runs, and notes ``ru_maxrss`` again. The reference on [11008, 4096] would take over
10 minutes, so it runs ``TRUNCATED_REFERENCE`` iterations and its 150-iteration time is
extrapolated from them (its setup, the SVD, counted once).

    python benchmarks/bench_magr.py
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

from bench_gptq import SHAPES, THREADS, TOKENS, calibration_case
from ptqrepro.methods.magr import magr

ALPHA = 1e-3
ITERATIONS = 150
PRODUCT_DTYPES = {"ours": torch.float32, "ours-bf16": torch.bfloat16}
"""Our implementations: ``magr`` with these product dtypes."""
TRUNCATED_REFERENCE = {(11008, 4096): 15}
"""Shapes on which the reference runs only this many iterations (timed and extrapolated)."""


def reference_l1_projection(v: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Duchi et al.'s sort-based projection of each row of ``v`` onto the ℓ₁ ball, as the
    reference vectorises it: full sort of every row, then a mask keeps the rows already inside."""
    magnitudes = v.abs()
    ordered = torch.sort(magnitudes, dim=1, descending=True).values
    partial_sums = ordered.cumsum(dim=1)
    positions = torch.arange(1, v.shape[1] + 1)
    rho = ((ordered * positions > partial_sums - radius) * positions).amax(dim=1)
    theta = (partial_sums[torch.arange(v.shape[0]), rho - 1] - radius) / rho
    projected = torch.sign(v) * (magnitudes - theta.unsqueeze(1)).clamp(min=0)
    inside = (magnitudes.sum(dim=1, keepdim=True) < radius).float()
    return inside * v + (1 - inside) * projected


def reference_loop(weight: torch.Tensor, x: torch.Tensor, alpha: float, iterations: int) -> tuple[torch.Tensor, float]:
    """REFERENCE LOOP: the structure of the authors' ``W_proximal_preprocess`` (AozhongZhang/MagR
    ``MagR.py``), transcribed plainly: a full SVD of X (``full_matrices=True``) to divide its
    singular values by the largest, ``XtX`` of the rebuilt X, then per iteration
    ``Ŵ <- prox((Ŵ - XtX (Ŵ - Wᵀ))ᵀ)ᵀ`` on the transposed weight [in, out], the prox as
    ``v - α proj_{||·||₁≤1}(v / α)`` row by row. Returns the weight [out, in] and the seconds
    spent before the first iteration."""
    start = time.perf_counter()
    target = weight.T
    current = target.clone()
    tokens, features = x.shape
    left, singular, right = torch.linalg.svd(x)
    singular = singular / singular.max()
    if tokens > features:
        left = left[:, :features]
    elif tokens < features:
        right = right[:tokens]
    rebuilt = left @ torch.diag(singular) @ right
    xtx = rebuilt.T @ rebuilt
    setup = time.perf_counter() - start
    for _ in range(iterations):
        step = (current - xtx @ (current - target)).T
        current = (step - alpha * reference_l1_projection(step / alpha)).T
    return current.T.contiguous(), setup


def run_one(implementation: str, case_file: str, iterations: int, result_file: str) -> None:
    """Child process: load the inputs, time one run, report seconds and ru_maxrss (KiB) as JSON."""
    torch.set_num_threads(THREADS)
    case = torch.load(case_file)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if implementation in PRODUCT_DTYPES:
        result = magr(case["weight"], case["gram"], ALPHA, iterations, product_dtype=PRODUCT_DTYPES[implementation])
        weight, setup, objective = result.weight, None, result.objective
    else:
        (weight, setup), objective = reference_loop(case["weight"], case["x"], ALPHA, iterations), None
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(weight, result_file)
    print(json.dumps({"seconds": seconds, "setup_seconds": setup, "iterations": iterations,
                      "objective": objective, "maxrss_before_kib": before, "maxrss_after_kib": after}))


def measure(shape: tuple[int, int], folder: Path, reference_iterations: int | None = None) -> list[dict]:
    """Both implementations on one shape, each in its own subprocess, and the quality of each
    result: mean ratio of row maxima after/before and relative output error ||X(W - W')ᵀ|| / ||XWᵀ||."""
    torch.set_num_threads(THREADS)
    weight, x = calibration_case(*shape)
    ours = {"weight": weight, "gram": x.T @ x}
    inputs = {**{name: ours for name in PRODUCT_DTYPES}, "reference": {"weight": weight, "x": x}}
    rows, results = [], {}
    for implementation in inputs:
        case_file, result_file = folder / f"{implementation}-case.pt", folder / f"{implementation}.pt"
        torch.save(inputs[implementation], case_file)
        truncated = reference_iterations or TRUNCATED_REFERENCE.get(shape, ITERATIONS)
        iterations = truncated if implementation == "reference" else ITERATIONS
        output = subprocess.run(
            [sys.executable, __file__, "--child", implementation, str(case_file), str(iterations), str(result_file)],
            check=True, capture_output=True, text=True,
        ).stdout
        report = json.loads(output.strip().splitlines()[-1])
        results[implementation] = torch.load(result_file)
        rows.append({"shape": shape, "implementation": implementation, **report})
    output_norm = float((x @ weight.T).norm())
    for row in rows:
        changed = results[row["implementation"]]
        row["max_ratio"] = float((changed.abs().amax(dim=1) / weight.abs().amax(dim=1)).mean())
        row["output_error"] = float((x @ (weight - changed).T).norm()) / output_norm
        complete = row["iterations"] == ITERATIONS
        row["difference"] = float((changed - results["ours"]).abs().max()) if complete else None
    return rows


def estimated_seconds(row: dict) -> float:
    """Seconds for ITERATIONS iterations: measured, or extrapolated from a truncated run."""
    if row["iterations"] == ITERATIONS:
        return row["seconds"]
    setup = row["setup_seconds"]
    return setup + (row["seconds"] - setup) * ITERATIONS / row["iterations"]


def markdown(rows: list[dict]) -> str:
    reference = {row["shape"]: estimated_seconds(row) for row in rows if row["implementation"] == "reference"}
    lines = [
        f"| weight [out, in] | implementation | iterations run | time (s) | time for {ITERATIONS} iterations (s) "
        "| ours / reference | peak RSS (MiB) | added by the run (MiB) | row max after / before "
        "| relative output error | max abs difference to ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak = row["maxrss_after_kib"] / 1024
        added = (row["maxrss_after_kib"] - row["maxrss_before_kib"]) / 1024
        full = estimated_seconds(row)
        marker = "" if row["iterations"] == ITERATIONS else " (extrapolated)"
        difference = "—" if row["difference"] is None else f"{row['difference']:.1e}"
        lines.append(
            f"| {row['shape'][0]}×{row['shape'][1]} | {row['implementation']} | {row['iterations']} "
            f"| {row['seconds']:.1f} | {full:.1f}{marker} | {full / reference[row['shape']]:.2f} | {peak:.0f} "
            f"| {added:.0f} | {row['max_ratio']:.4f} | {row['output_error']:.2e} | {difference} |"
        )
    return "\n".join(lines)


def objective_summary(rows: list[dict]) -> str:
    """Our objectives at the start and the end, and whether they never increased."""
    lines = []
    for row in rows:
        objective = row["objective"]
        if objective:
            monotone = all(later <= earlier for earlier, later in zip(objective, objective[1:]))
            lines.append(
                f"{row['shape'][0]}×{row['shape'][1]} {row['implementation']}: objective {objective[0]:.6g} -> {objective[-1]:.6g}, "
                f"non-increasing: {monotone}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("IMPLEMENTATION", "CASE", "ITERATIONS", "RESULT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--shape", nargs=2, type=int, metavar=("OUT", "IN"), action="append",
                        help="run only this weight shape (repeatable; default: all of SHAPES)")
    parser.add_argument("--reference-iterations", type=int,
                        help="run the reference loop only this many iterations and extrapolate its time to 150")
    args = parser.parse_args()
    if args.child:
        implementation, case_file, iterations, result_file = args.child
        run_one(implementation, case_file, int(iterations), result_file)
        return
    print(f"torch {torch.__version__}, {THREADS} threads, alpha {ALPHA}, {ITERATIONS} iterations, "
          f"{TOKENS} calibration tokens\n")
    with tempfile.TemporaryDirectory() as folder:
        shapes = [tuple(shape) for shape in args.shape] if args.shape else SHAPES
        rows = [row for shape in shapes for row in measure(shape, Path(folder), args.reference_iterations)]
    print(markdown(rows))
    print()
    print(objective_summary(rows))


if __name__ == "__main__":
    main()
