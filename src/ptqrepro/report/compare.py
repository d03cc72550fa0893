"""Two runs of the same experiment side by side: how far each recipe's perplexity moved between
them (another machine, another dtype, another commit), with the paired interval of the move.

Both runs' ``windows.csv`` (``report.tables``) hold every perplexity's per-window NLL. For each
(model, recipe, dataset) that both ran on the same test windows (same ``windows_sha256``), the
move is ``ppl_b / ppl_a - 1`` with the paired bootstrap interval of ``mean(nll_b - nll_a)``
(``report.uncertainty.paired_difference``), by calibration seed where both ran the same seeds. A
move whose interval excludes 0 is more than the test windows' noise: the runs computed different
models or different losses.

``compare_verdicts`` compares at the level of the claims: both runs' claims judged by this code
(``report.claims``) from their kept tables, and every claim whose ppl or KLD verdict differs. A run
kept to compare against is a folder ``benchmarks/runs/<date>-<cpu>/`` (``RUN_FILES``) holding the
run's ``all.csv`` and ``windows.csv`` (``ptqrepro tables``) and a ``provenance.json`` saying which
commit ran on which machine, in how long.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from ptqrepro.errors import InputError, PtqError
from ptqrepro.runtime.io import atomic_path
from ptqrepro.report.tables import recipe_losses
from ptqrepro.report.uncertainty import BootstrapSettings, pair_by_seed, paired_difference

RUN_FILES = ("all.csv", "windows.csv", "provenance.json")
"""What a kept run's folder holds (provenance.json: at least ``git_commit`` and ``hardware``)."""
VERDICT_COLUMNS = ("paper", "claim", "model", "dataset", "verdict_a", "verdict_b", "kld_verdict_a", "kld_verdict_b",
                   "comparisons_a", "comparisons_b", "differs")
"""Columns of the claims-level comparison; ``differs`` when the ppl or the KLD verdict differs."""

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


def read_run(folder: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A kept run's ``(all.csv, windows.csv, provenance)``; a missing file is a ``PtqError``."""
    from ptqrepro.runtime.io import read_json

    folder = Path(folder)
    missing = [name for name in RUN_FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder}: not a kept run (missing {', '.join(missing)}; a run keeps {', '.join(RUN_FILES)})")
    return pd.read_csv(folder / "all.csv"), pd.read_csv(folder / "windows.csv"), read_json(folder / "provenance.json")


def compare_verdicts(claims: list, run_a: tuple[pd.DataFrame, pd.DataFrame], run_b: tuple[pd.DataFrame, pd.DataFrame],
                     settings: BootstrapSettings) -> pd.DataFrame:
    """Each claim on each (model, dataset) of both runs, judged in each from its ``(all.csv,
    windows.csv)`` (``VERDICT_COLUMNS``), in the claims' order."""
    from ptqrepro.report.claims import check_claims

    keys = ["paper", "claim", "model", "dataset"]
    first, second = (check_claims(claims, table, windows, settings) for table, windows in (run_a, run_b))
    both = first.merge(second, on=keys, suffixes=("_a", "_b"), sort=False)
    for column in ("verdict", "kld_verdict"):
        for side in ("_a", "_b"):
            both[column + side] = both[column + side].fillna("")
    both["differs"] = (both["verdict_a"] != both["verdict_b"]) | (both["kld_verdict_a"] != both["kld_verdict_b"])
    return both[list(VERDICT_COLUMNS)]


def write_verdict_comparison(table: pd.DataFrame, out_dir: str | os.PathLike, labels: tuple[str, str],
                             provenance: tuple[dict, dict]) -> dict[str, Path]:
    """``out_dir/compare-claims.csv`` (every claim) and ``out_dir/compare-claims.md`` (those whose
    verdicts differ, and each run's commit and machine), written atomically."""
    out_dir = Path(out_dir)
    written = {"csv": out_dir / "compare-claims.csv", "md": out_dir / "compare-claims.md"}
    with atomic_path(written["csv"]) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    first, second = labels
    differing = table[table["differs"]]
    shown = pd.DataFrame({
        "paper": differing["paper"], "claim": differing["claim"], "model": differing["model"],
        "dataset": differing["dataset"],
        f"{first}": differing["verdict_a"] + " / " + differing["kld_verdict_a"].replace("", "—"),
        f"{second}": differing["verdict_b"] + " / " + differing["kld_verdict_b"].replace("", "—"),
        f"{first}: comparisons": differing["comparisons_a"], f"{second}: comparisons": differing["comparisons_b"],
    })
    runs = "\n".join(f"- {label}: commit {record.get('git_commit', '?')} on {record.get('hardware', '?')}"
                     for label, record in zip(labels, provenance))
    body = shown.to_markdown(index=False, disable_numparse=True) if len(shown) else "Every verdict agrees."
    markdown = (f"# Claims: {second} against {first}\n\n{runs}\n\n{len(differing)} of {len(table)} claims differ "
                f"(verdict on perplexity / on the KL divergence):\n\n{body}\n")
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(markdown)
    return written
