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
ZEROSHOT_DATASETS = {"MagR": ["arc_challenge", "arc_easy", "piqa", "winogrande", "average"], "LQER": ["average6"],
                     "DWR": ["commonsense_qa_average"]}
CONFIGS = {"MagR": {"wikitext2": "magr.yaml", "c4": "magr-c4.yaml", **dict.fromkeys(ZEROSHOT_DATASETS["MagR"], "magr.yaml")},
           "LQER": {"wikitext2": "lqer.yaml", "average6": "lqer.yaml"},
           "DWR": {"wikitext2": "dwr.yaml", "commonsense_qa_average": "dwr.yaml"}}
# (file, paper table) -> number of values the paper reports there (counted by hand in the paper's tables)
EXPECTED_ROWS = {
    ("magr.csv", "Table 1"): 12,   # 3 models x (FP16, MagR) x (Wiki, C4)
    ("magr.csv", "Table 3"): 160,  # 28 rows x 6 columns, less 8 empty cells (70B: OPTQ W2g128, AWQ W3/W3g128/W4)
    ("magr.csv", "Table 4"): 64,   # 8 LLaMA2-7B rows x 5 columns; 13B: FP16's 5 columns and 3 x 3 averages; 70B: FP16 and 3 x 3 averages
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
    assert len(rows) > (50 if paper != "DWR" else 6)
    assert set(rows["dataset"]) <= set(CONFIGS[paper])
    for dataset, config_name in CONFIGS[paper].items():
        config = yaml.safe_load((PAPERS / config_name).read_text())
        for row in rows[rows["dataset"] == dataset].itertuples():
            assert row.recipe in config["recipes"], (config_name, row.source, row.recipe)
            assert row.model in config["recipes"][row.recipe].get("models", config["models"]), (config_name, row.source)


@pytest.mark.parametrize("paper", sorted(ZEROSHOT_DATASETS))
def test_zero_shot_numbers_are_scored_by_the_paper_config(paper):
    """Every zero-shot number with a recipe is one its paper config scores: the recipe and model
    among eval.zeroshot's, the dataset a task or an average of it, the metric the task's reported
    one (acc_pct: acc, acc_norm_pct: acc_norm) or every member's for an average."""
    rows = pd.concat(frames().values())
    rows = rows[(rows["paper"] == paper) & (rows["recipe"] != "") & rows["dataset"].isin(ZEROSHOT_DATASETS[paper])]
    assert len(rows) >= 4
    config = yaml.safe_load((PAPERS / CONFIGS[paper][rows["dataset"].iloc[0]]).read_text())
    zeroshot = config["eval"]["zeroshot"]
    reported = {task: (zeroshot.get("metrics") or {}).get(task, "acc") for task in zeroshot["tasks"]}
    for row in rows.itertuples():
        assert row.recipe in zeroshot["recipes"] and row.model in zeroshot.get("models", config["models"]), row.source
        members = zeroshot["averages"].get(row.dataset, [row.dataset])
        assert set(members) <= set(reported), row.source
        assert row.metric == "+".join(sorted({reported[task] for task in members})) + "_pct", row.source
