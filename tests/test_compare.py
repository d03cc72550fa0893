"""Two runs compared recipe by recipe: moves beyond the test windows' noise are flagged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ptqrepro.cli import main
from ptqrepro.report.compare import compare_runs
from ptqrepro.report.tables import WINDOW_COLUMNS
from ptqrepro.report.uncertainty import BootstrapSettings


def windows(losses: dict) -> pd.DataFrame:
    """A windows table from {(recipe, seed, fingerprint): per-window NLLs}."""
    rows = [{"model": "m", "recipe": recipe, "seed": seed, "dataset": "d", "window": index, "nll": float(value),
             "windows_sha256": fingerprint, "source": f"{recipe}.json"}
            for (recipe, seed, fingerprint), values in losses.items() for index, value in enumerate(values)]
    return pd.DataFrame(rows, columns=list(WINDOW_COLUMNS))


def test_a_move_beyond_the_windows_noise_is_resolved_and_noise_is_not(tmp_path):
    rng = np.random.default_rng(0)
    difficulty = rng.normal(3.0, 0.8, 24)
    first = windows({("rtn", None, "w"): difficulty, ("gptq", 0, "w"): difficulty + 1.0, ("gptq", 1, "w"): difficulty + 1.1,
                     ("other", None, "v"): difficulty})
    second = windows({("rtn", None, "w"): difficulty + rng.normal(0, 1e-4, 24), ("gptq", 1, "w"): difficulty + 1.3,
                      ("other", None, "x"): difficulty})
    table = compare_runs(first, second, BootstrapSettings(samples=500)).set_index("recipe")
    assert list(table.index) == ["rtn", "gptq"]  # "other" scored different windows in the two runs
    assert not table.loc["rtn", "resolved"] and table.loc["rtn", "change_low"] < 0 < table.loc["rtn", "change_high"]
    assert table.loc["gptq", "resolved"] and table.loc["gptq", "seeds"] == 1  # the one seed both ran
    assert table.loc["gptq", "change"] == pytest.approx(np.expm1(0.2))
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    first.to_csv(paths[0], index=False), second.to_csv(paths[1], index=False)
    assert main(["compare", "--windows", *map(str, paths), "--labels", "float32", "auto", "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "compare.md").read_text()
    assert "# auto against float32" in markdown and "+22.14 % [" in markdown and "] *" in markdown


def kept_run(folder, shifts: dict, difficulty) -> None:
    """A kept run (all.csv, windows.csv, provenance.json) of recipes fp16 and rtn, rtn at seeds 0-2
    with per-seed shifts of every window's loss."""
    import json
    import math

    losses = {("fp16", None, "w"): difficulty, **{("rtn", seed, "w"): difficulty + shift for seed, shift in shifts.items()}}
    table = windows(losses)
    summary = pd.DataFrame([{"model": "m", "recipe": recipe, "dataset": "d", "kind": "perplexity", "metric": "ppl",
                             "value": math.exp(group["nll"].mean()), "ci_low": math.nan, "ci_high": math.nan,
                             "seeds": "0 1 2" if recipe == "rtn" else "—"} for recipe, group in table.groupby("recipe")])
    folder.mkdir()
    summary.to_csv(folder / "all.csv", index=False), table.to_csv(folder / "windows.csv", index=False)
    (folder / "provenance.json").write_text(json.dumps({"git_commit": "abc1234", "hardware": f"cpu of {folder.name}"}))


def test_claims_whose_verdicts_differ_between_two_kept_runs_are_listed(tmp_path):
    difficulty = np.random.default_rng(1).normal(3.0, 0.8, 24)
    kept_run(tmp_path / "2026-12-05-amd", {0: 0.1, 1: 0.12, 2: 0.11}, difficulty)
    kept_run(tmp_path / "2026-12-05-intel", {0: 0.1, 1: -0.05, 2: 0.11}, difficulty)  # one seed on the other side
    config = tmp_path / "config.yaml"
    config.write_text("claims:\n  - {paper: X, claim: fp16 below RTN, below: [fp16, rtn]}\n"
                      "  - {paper: X, claim: fp16 at or below RTN, at_or_below: {recipe: fp16, than: [rtn]}}\n")
    out = tmp_path / "out"
    assert main(["compare-claims", "--runs", str(tmp_path / "2026-12-05-amd"), str(tmp_path / "2026-12-05-intel"),
                 "--config", str(config), "--bootstrap-samples", "500", "--out", str(out)]) == 0
    table = pd.read_csv(out / "compare-claims.csv")
    assert table["verdict_a"].tolist() == ["holds", "holds"] and table["verdict_b"].tolist() == ["inconclusive"] * 2
    markdown = (out / "compare-claims.md").read_text()
    assert "2 of 2 claims differ" in markdown and "commit abc1234 on cpu of 2026-12-05-intel" in markdown
    assert main(["compare-claims", "--runs", str(tmp_path / "2026-12-05-amd"), str(tmp_path), "--config", str(config),
                 "--out", str(out)]) == 1  # a missing input
