"""How many test windows the default needs: the cost of an evaluation job and the width of the
intervals at 8, 24 and all 69 of wiki-mini's 512-token test windows.

Each quantized model given is evaluated once on every test window (``ptqrepro eval-ppl`` without
``--max-windows``, one thread, as a default job); the 8- and 24-window evaluations use windows
spread evenly over the text (``data.windows.spread_indices``), which are among the 69, so their
per-window losses are read off the full evaluation. The first model is also evaluated at 8 and 24
windows for the job's cost (import, load, dequantize, forward: the job's own clock). Printed: each
model's perplexity and the half-width of its 95 % interval, and each later model's paired
difference to the first with its half-width (``report.uncertainty``, as the tables and claims).

    python benchmarks/bench_windows.py --model results/models/smollm2-135m --corpus results/corpora/wiki-mini \\
        results/quantized/smollm2-135m/fp16/s0 results/quantized/smollm2-135m/rtn@int8/s0 ...
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from ptqrepro.cli import main as ptqrepro
from ptqrepro.data.windows import spread_indices
from ptqrepro.report.uncertainty import BootstrapSettings, paired_difference, perplexity_interval

SIZES = (8, 24)
SETTINGS = BootstrapSettings()


def evaluate(model: str, corpus: str, quantized: str, out: Path, max_windows: int | None) -> dict:
    extra = ["--max-windows", str(max_windows)] if max_windows else []
    arguments = ["eval-ppl", "--model", model, "--quantized", quantized, "--corpus", corpus, "--seqlen", "512",
                 "--batch-size", "4", "--threads", "1", "--device", "cpu", *extra, "--out", str(out)]
    if ptqrepro(arguments) != 0:
        raise SystemExit(f"eval-ppl failed on {quantized}")
    return json.loads(out.read_text())


def half_width_percent(interval) -> float:
    return 100 * max(interval.high - interval.value, interval.value - interval.low) / interval.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("quantized", nargs="+")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-windows-"))
    costs = {}
    for size in SIZES:
        result = evaluate(args.model, args.corpus, args.quantized[0], scratch / f"cost-{size}.json", size)
        costs[size] = result["provenance"]["wall_time_s"]
    losses = {}
    for index, quantized in enumerate(args.quantized):
        result = evaluate(args.model, args.corpus, quantized, scratch / f"all-{index}.json", None)
        losses[result["recipe"]] = np.array(result["window_nll"])
        if index == 0:
            costs[len(result["window_nll"])] = result["provenance"]["wall_time_s"]
    total = len(next(iter(losses.values())))
    subsets = {size: spread_indices(total, size) for size in (*SIZES, total)}
    print(f"eval-ppl job wall time (s), {args.quantized[0]}: " + ", ".join(f"{n} windows {t:.1f}" for n, t in costs.items()))
    first = next(iter(losses))
    print("| recipe | " + " | ".join(f"{n} windows: ppl ±% | vs {first} ±pp" for n in subsets) + " |")
    for recipe, nll in losses.items():
        cells = []
        for size, chosen in subsets.items():
            interval = perplexity_interval(nll[chosen], SETTINGS)
            difference = paired_difference(nll[chosen], losses[first][chosen], SETTINGS)
            change = 100 * math.expm1(difference.value)
            half = 100 * max(math.expm1(difference.high) - math.expm1(difference.value),
                             math.expm1(difference.value) - math.expm1(difference.low))
            cells.append(f"{interval.value:.2f} ±{half_width_percent(interval):.1f} % | "
                         + ("—" if recipe == first else f"{change:+.2f} % ±{half:.2f}"))
        print(f"| {recipe} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
