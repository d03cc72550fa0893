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
