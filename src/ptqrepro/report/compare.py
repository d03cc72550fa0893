"""Two runs of the same experiment side by side: how far each recipe's perplexity moved between
them (another machine, another dtype, another commit), with the paired interval of the move.

Both runs' ``windows.csv`` (``report.tables``) hold every perplexity's per-window NLL. For each
(model, recipe, dataset) that both ran on the same test windows (same ``windows_sha256``), the
move is ``ppl_b / ppl_a - 1`` with the paired bootstrap interval of ``mean(nll_b - nll_a)``
(``report.uncertainty.paired_difference``), by calibration seed where both ran the same seeds. A
move whose interval excludes 0 is more than the test windows' noise: the runs computed different
models or different losses.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from ptqrepro.errors import PtqError
from ptqrepro.io import atomic_path
from ptqrepro.report.tables import recipe_losses
from ptqrepro.report.uncertainty import BootstrapSettings, pair_by_seed, paired_difference

COMPARISON_COLUMNS = ("model", "recipe", "dataset", "windows", "seeds", "ppl_a", "ppl_b", "change", "change_low",
                      "change_high", "resolved")
"""Columns of the comparison: ``change`` = ppl_b / ppl_a - 1 and its interval; ``resolved`` when
the interval excludes 0."""


def compare_runs(a: pd.DataFrame, b: pd.DataFrame, settings: BootstrapSettings) -> pd.DataFrame:
    """One row per (model, recipe, dataset) of both runs' windows tables (``COMPARISON_COLUMNS``),
    in run a's order; measurements of only one run, or on different windows, are left out."""
    keys = ["model", "recipe", "dataset"]
    shared = a[keys + ["windows_sha256"]].drop_duplicates().merge(b[keys + ["windows_sha256"]].drop_duplicates())
    if shared.empty:
        raise PtqError("the two runs share no perplexity measured on the same test windows")
    rows = []
    for model, recipe, dataset, _ in shared.itertuples(index=False):
        first, second = recipe_losses(a, model, recipe, dataset), recipe_losses(b, model, recipe, dataset)
        try:
            nll_a, nll_b = pair_by_seed(first.seeds, first.nll, second.seeds, second.nll)
        except PtqError:
            continue  # no calibration seed in common
        change = paired_difference(nll_b, nll_a, settings)
        rows.append({
            "model": model, "recipe": recipe, "dataset": dataset, "windows": nll_a.shape[1], "seeds": nll_a.shape[0],
            "ppl_a": math.exp(nll_a.mean()), "ppl_b": math.exp(nll_b.mean()),
            "change": math.expm1(change.value), "change_low": math.expm1(change.low),
            "change_high": math.expm1(change.high), "resolved": change.low > 0 or change.high < 0,
        })
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def write_comparison(table: pd.DataFrame, out_dir: str | os.PathLike, labels: tuple[str, str],
                     settings: BootstrapSettings) -> dict[str, Path]:
    """``out_dir/compare.csv`` and ``out_dir/compare.md``, written atomically."""
    out_dir = Path(out_dir)
    written = {"csv": out_dir / "compare.csv", "md": out_dir / "compare.md"}
    with atomic_path(written["csv"]) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    first, second = labels
    shown = pd.DataFrame({
        "model": table["model"], "recipe": table["recipe"], "dataset": table["dataset"],
        first: table["ppl_a"].map(lambda v: f"{v:.2f}"), second: table["ppl_b"].map(lambda v: f"{v:.2f}"),
        f"{second} / {first} − 1": [f"{100 * c:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]" + (" *" if r else "")
                                    for c, lo, hi, r in table[["change", "change_low", "change_high", "resolved"]].itertuples(index=False)],
    })
    note = (f"Paired {settings.level:.0%} bootstrap over the shared test windows (and calibration seeds; "
            f"{settings.samples} replicates, seed {settings.seed}); * where the interval excludes 0, a move the "
            "test windows' noise does not explain.")
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(f"# {second} against {first}\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n\n{note}\n")
    return written
