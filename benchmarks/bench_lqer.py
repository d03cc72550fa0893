"""Time LQER/L2QER's correction and DWR's search space on LLaMA-7B shapes (CPU), with peak memory.

* Correction: ``low_rank_correction`` at k = 32 (LQER, and L2QER with the scale of
  ``activation_scale``) of the error ``E = W - RTN(W)`` on weights [4096, 4096] and
  [11008, 4096], for int4-g128 and LQER's MXINT4 (block 16); the same weights and calibration
  inputs as bench_gptq.py. L2QER's statistic is the maximum over 4 batches of 512 tokens of each
  batch's mean |x_j|. For comparison, LQER by ``torch.linalg.svd(Eᵀ, full_matrices=False)`` in
  float32 (LAPACK gesdd), on int4-g128. Best of 3 runs.
* DWR: one LLaMA-7B block's 7 linears (4 × [4096, 4096], 2 × [11008, 4096], 1 × [4096, 11008]),
  each quantized by RTN to the base format; time to build the 7 "svd" search spaces (D = W - Ŵ_q
  and its decomposition), then to reconstruct all 7 linears at each of the 8 ranks
  512, 1024, ..., 4096 (the paper's step for 7B), one run. This is everything DWR computes per
  block except the calibration-perplexity evaluations that choose k, which dominate its cost and
  are not measured here.

Each case runs in a fresh subprocess that prepares its inputs, reads ``ru_maxrss``, runs and reads
it again: the tables show the process's peak resident memory and what the runs added to it.

    python benchmarks/bench_lqer.py [--part correction|dwr]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from bench_gptq import FORMAT as INT_FORMAT
from bench_gptq import REPEATS, SHAPES, THREADS, TOKENS, calibration_case
from ptqrepro.formats import MXFormat
from ptqrepro.methods.dwr import discarded_at_rank, discarded_weight, reconstruct, search_space
from ptqrepro.methods.lqer import LowRankCorrection, activation_scale, low_rank_correction
from ptqrepro.methods.rtn import rtn
from ptqrepro.layerwise.statistics import output_error

MX_FORMAT = MXFormat("int4", 16)
FORMATS = {fmt.name: fmt for fmt in (INT_FORMAT, MX_FORMAT)}
RANK = 32
CALIBRATION_BATCHES = 4
BLOCK_SHAPES = 4 * [(4096, 4096)] + 2 * [(11008, 4096)] + [(4096, 11008)]
"""q, k, v, o_proj; gate, up_proj; down_proj."""
DWR_RANKS = list(range(512, 4097, 512))


def lapack_svd_correction(error: torch.Tensor, rank: int) -> LowRankCorrection:
    """LQER by LAPACK's SVD of ``Eᵀ`` in float32: ``A = U_k``, ``B = Σ_k V_kᵀ``."""
    u, sigma, vh = torch.linalg.svd(error.T, full_matrices=False)
    return LowRankCorrection(a=u[:, :rank].contiguous(), b=sigma[:rank, None] * vh[:rank])


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_correction(implementation: str, format_name: str, out_features: int, in_features: int) -> dict:
    """Child: time REPEATS corrections; report the output error ``||X (E - (AB)ᵀ)ᵀ||²`` of the
    last one relative to the uncorrected ``||X Eᵀ||²``."""
    weight, x = calibration_case(out_features, in_features)
    error = weight - rtn(weight, FORMATS[format_name]).dequantize()
    batch_absmean = torch.stack([batch.abs().mean(dim=0) for batch in x.chunk(CALIBRATION_BATCHES)])
    scale = activation_scale(batch_absmean.amax(dim=0))
    correct = {
        "lqer": lambda: low_rank_correction(error, RANK),
        "l2qer": lambda: low_rank_correction(error, RANK, scale),
        "lqer, torch.linalg.svd float32": lambda: lapack_svd_correction(error, RANK),
    }[implementation]
    before = maxrss_mib()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        correction = correct()
        times.append(time.perf_counter() - started)
    after = maxrss_mib()
    gram = x.T @ x
    residual = error - correction.error_estimate().T
    return {"times": times, "maxrss_before_mib": before, "maxrss_after_mib": after,
            "error_ratio": float(output_error(residual, gram) / output_error(error, gram))}


def run_dwr_block(format_name: str) -> dict:
    """Child: build the block's 7 "svd" search spaces, then reconstruct the 7 linears at each rank."""
    fmt = FORMATS[format_name]
    weights = [calibration_case(*shape, seed=index)[0] for index, shape in enumerate(BLOCK_SHAPES)]
    bases = [rtn(weight, fmt) for weight in weights]
    before = maxrss_mib()
    started = time.perf_counter()
    spaces = [search_space(discarded_weight(weight, base), "svd") for weight, base in zip(weights, bases)]
    build_s = time.perf_counter() - started
    per_rank = []
    for rank in DWR_RANKS:
        started = time.perf_counter()
        candidates = [reconstruct(base, discarded_at_rank(space, rank)) for base, space in zip(bases, spaces)]
        seconds = time.perf_counter() - started
        changed = sum(int((c.codes != b.codes).sum()) for c, b in zip(candidates, bases))
        total = sum(b.codes.numel() for b in bases)
        per_rank.append({"rank": rank, "seconds": seconds, "changed": changed / total})
    return {"build_s": build_s, "per_rank": per_rank, "maxrss_before_mib": before, "maxrss_after_mib": maxrss_mib()}


def in_subprocess(*case: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--case", *case],
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def correction_table() -> str:
    cases = [(implementation, format_name, shape)
             for shape in SHAPES
             for format_name in FORMATS
             for implementation in ("lqer", "l2qer")]
    cases += [("lqer, torch.linalg.svd float32", INT_FORMAT.name, shape) for shape in SHAPES]
    lines = [
        f"| weight [out, in] | base format | correction (k = {RANK}) | best of {REPEATS} (s) | runs (s) "
        "| peak RSS (MiB) | added by runs (MiB) | output error / uncorrected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for implementation, format_name, shape in cases:
        row = in_subprocess("correction", implementation, format_name, str(shape[0]), str(shape[1]))
        runs = ", ".join(f"{t:.2f}" for t in row["times"])
        lines.append(
            f"| {shape[0]}×{shape[1]} | {format_name} | {implementation} | {min(row['times']):.2f} | {runs} "
            f"| {row['maxrss_after_mib']:.0f} | {row['maxrss_after_mib'] - row['maxrss_before_mib']:.0f} "
            f"| {row['error_ratio']:.4f} |"
        )
    return "\n".join(lines)


def dwr_table() -> str:
    lines = [
        "| base format | build 7 search spaces (s) | reconstruct 7 linears × 8 ranks (s) | per rank (s) "
        "| peak RSS (MiB) | added (MiB) | codes changed at k = 512 … 4096 (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for format_name in FORMATS:
        row = in_subprocess("dwr", format_name)
        seconds = [entry["seconds"] for entry in row["per_rank"]]
        changed = ", ".join(f"{100 * entry['changed']:.1f}" for entry in row["per_rank"])
        lines.append(
            f"| {format_name} | {row['build_s']:.1f} | {sum(seconds):.1f} | {min(seconds):.2f}–{max(seconds):.2f} "
            f"| {row['maxrss_after_mib']:.0f} | {row['maxrss_after_mib'] - row['maxrss_before_mib']:.0f} "
            f"| {changed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["correction", "dwr"], help="run only this table (default: both)")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.case:
        kind, *rest = args.case
        if kind == "correction":
            implementation, format_name, out_features, in_features = rest
            result = run_correction(implementation, format_name, int(out_features), int(in_features))
        else:
            result = run_dwr_block(*rest)
        print(json.dumps(result))
        return
    print(f"torch {torch.__version__}, {THREADS} threads, {TOKENS} calibration tokens\n")
    if args.part != "dwr":
        print(correction_table(), end="\n\n")
    if args.part != "correction":
        print(dwr_table())


if __name__ == "__main__":
    main()
