"""The papers' reported numbers in config/reference/*.csv: schema, completeness, and that every
number we can reproduce names a recipe and model of the matching paper config."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

REFERENCE = Path(__file__).resolve().parents[1] / "config" / "reference"
PAPERS = REFERENCE.parent / "papers"
COLUMNS = ["paper", "table", "model", "method", "setting", "dataset", "metric", "value", "recipe", "source"]
# paper -> the configs that reproduce its numbers, by evaluation dataset
CONFIGS = {"MagR": {"wikitext2": "magr.yaml", "c4": "magr-c4.yaml"}, "LQER": {"wikitext2": "lqer.yaml"}}
# (file, paper table) -> number of values the paper reports there (counted by hand in the paper's tables)
EXPECTED_ROWS = {
    ("magr.csv", "Table 1"): 12,   # 3 models x (FP16, MagR) x (Wiki, C4)
    ("magr.csv", "Table 3"): 160,  # 28 rows x 6 columns, less 8 empty cells (70B: OPTQ W2g128, AWQ W3/W3g128/W4)
    ("magr.csv", "Table 4"): 60,   # 8 LLaMA2-7B rows x 5 columns; 13B and 70B: FP16 and 3 x 3 averages each
    ("magr.csv", "Table 6"): 200,  # 25 rows x 8 columns
    ("magr.csv", "Table 7"): 20,   # 5 alphas x (W4, W3) x (Wiki, C4)
    ("magr.csv", "Table 8"): 16,   # 4 betas x (W3, W2) x (Wiki, C4)
    ("lqer.csv", "main W4A8 table"): 143,  # 11 models x 7 columns x (ppl, acc), less 13 empty (33B GPTQ ppl; no L2QER-INT or W4A6 for Vicuna-7B/13B, Mistral), plus 33B at k=64 (2)
    ("lqer.csv", "ablation"): 7,
    ("lqer.csv", "W2A8"): 12,
    ("lqer.csv", "W4A16"): 3,
    ("baselines.csv", "README LLaMA"): 24,
    ("baselines.csv", "README W8A8"): 8,
    ("dwr.csv", "summary (unverified)"): 12,
}


def frames():
    return {path.name: pd.read_csv(path, keep_default_na=False) for path in sorted(REFERENCE.glob("*.csv"))}


def test_every_file_has_the_schema_and_provenance():
    for name, frame in frames().items():
        assert list(frame.columns) == COLUMNS, name
        for column in ("paper", "table", "model", "method", "setting", "dataset", "metric", "source"):
            assert (frame[column].str.len() > 0).all(), (name, column)
        values = pd.to_numeric(frame["value"].replace("NaN", math.nan))
        assert values.notna().sum() + (frame["value"] == "NaN").sum() == len(frame), name
        assert not frame.duplicated(["paper", "table", "model", "method", "setting", "dataset", "metric"]).any(), name


def test_every_paper_table_has_all_its_rows():
    counts = {(name, table): len(rows) for name, frame in frames().items() for table, rows in frame.groupby("table")}
    for key, expected in EXPECTED_ROWS.items():
        assert counts.get(key) == expected, key


@pytest.mark.parametrize("paper", sorted(CONFIGS))
def test_reproducible_numbers_name_a_recipe_and_model_of_the_paper_config(paper):
    rows = pd.concat(frames().values())
    rows = rows[(rows["paper"] == paper) & (rows["recipe"] != "")]
    assert len(rows) > 50
    for dataset, config_name in CONFIGS[paper].items():
        config = yaml.safe_load((PAPERS / config_name).read_text())
        for row in rows[rows["dataset"] == dataset].itertuples():
            assert row.recipe in config["recipes"], (config_name, row.source, row.recipe)
            assert row.model in config["recipes"][row.recipe].get("models", config["models"]), (config_name, row.source)
