"""Paper tables (ours beside the paper's) against a small hand-written reference and results set."""

from __future__ import annotations

import pandas as pd
import pytest

from ptqrepro.errors import PtqError
from ptqrepro.report.paper_tables import REFERENCE_COLUMNS, load_reference, paper_sections, with_ours, write_paper_tables

REFERENCE = [
    # paper, table, model, method, setting, dataset, metric, value, recipe, source
    ("MagR", "Table 3", "llama-2-7b", "fp16", "FP16", "wikitext2", "ppl", "5.47", "fp16", "T3 FP16 Wiki 7B"),
    ("MagR", "Table 3", "llama-2-7b", "gptq", "W3A16", "wikitext2", "ppl", "8.37", "gptq@int3", "T3 W3 OPTQ Wiki 7B"),
    ("MagR", "Table 3", "llama-2-7b", "magr+gptq", "W3A16", "wikitext2", "ppl", "6.41", "magr+gptq@int3-beta0.9", "T3"),
    ("MagR", "Table 3", "llama-2-7b", "omniquant", "W3A16", "wikitext2", "ppl", "6.58", "", "T3 W3 OmniQuant"),
    ("MagR", "Table 3", "llama-2-13b", "gptq", "W3A16", "wikitext2", "ppl", "6.44", "gptq@int3", "T3 W3 OPTQ Wiki 13B"),
    ("MagR", "Table 3", "llama-2-7b", "gptq", "W2A16", "c4", "ppl", "NaN", "gptq@int2", "T3 W2 OPTQ C4 7B"),
    ("LQER", "ablation", "opt-1.3b", "lqer", "MXINT W4A8", "wikitext2", "ppl", "15.28", "lqer-k32@mxint4", "ablation"),
    ("LQER", "ablation", "opt-1.3b", "rtn", "MXINT W4A8", "wikitext2", "ppl", "16.12", "rtn@mxint4", "ablation plain"),
]


def results_frame(model="llama-2-7b"):
    rows = [
        ("fp16", "fp16", None, None, 5.50),
        ("gptq@int3", "gptq", "int3", None, 8.00),
        ("magr+gptq@int3-beta0.9", "magr+gptq", "int3-beta0.9", None, 6.60),
        ("lqer-k8@mxint4_a=mxint8", "rtn+lqer", "mxint4", "mxint8", 30.84),
    ]
    return pd.DataFrame([
        {"model": model, "recipe": r, "method": m, "weight_format": w, "act_format": a, "kind": "perplexity",
         "dataset": "wikitext2", "metric": "ppl", "value": v}
        for r, m, w, a, v in rows
    ])


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "ref.csv"
    pd.DataFrame(REFERENCE, columns=list(REFERENCE_COLUMNS)).to_csv(path, index=False)
    return load_reference([path])


def test_cells_put_ours_beside_the_paper_with_the_difference(reference):
    results = results_frame()
    sections = paper_sections(with_ours(reference, results), results)
    table = sections["MagR"]["Table 3"]
    assert table.loc[("W3A16", "gptq"), ("wikitext2", "llama-2-7b")] == "8.37 / 8.00 (-0.37)"
    assert table.loc[("W3A16", "magr+gptq"), ("wikitext2", "llama-2-7b")] == "6.41 / 6.60 (+0.19)"
    assert table.loc[("FP16", "fp16"), ("wikitext2", "llama-2-7b")] == "5.47 / 5.50 (+0.03)"
    # a method we do not implement, a model we did not run, a NaN the paper printed
    assert table.loc[("W3A16", "omniquant"), ("wikitext2", "llama-2-7b")] == "6.58 / —"
    assert table.loc[("W3A16", "gptq"), ("wikitext2", "llama-2-13b")] == "6.44 / —"
    assert table.loc[("W2A16", "gptq"), ("c4", "llama-2-7b")] == "NaN / —"


def test_a_run_without_the_papers_models_shows_ours_alone(reference):
    results = results_frame(model="smollm2-135m")
    sections = paper_sections(with_ours(reference, results), results)
    (title, table), = sections["MagR"].items()
    assert title.startswith("ours alone")
    assert table.loc[("int3", "gptq"), ("wikitext2", "smollm2-135m")] == "8.00"
    assert table.loc[("fp16", "fp16"), ("wikitext2", "smollm2-135m")] == "5.50"
    assert ("mxint4 a=mxint8", "rtn+lqer") not in table.index  # LQER is not a step of MagR's methods
    (title, lqer), = sections["LQER"].items()
    assert lqer.loc[("mxint4 a=mxint8", "rtn+lqer"), ("wikitext2", "smollm2-135m")] == "30.84"
    assert ("int3", "gptq") not in lqer.index


def test_markdown_and_latex_files(tmp_path, reference):
    results = results_frame()
    paths = write_paper_tables(paper_sections(with_ours(reference, results), results), tmp_path / "papers")
    assert sorted(path.name for path in paths) == ["lqer.md", "lqer.tex", "magr.md", "magr.tex"]
    markdown = (tmp_path / "papers" / "magr.md").read_text()
    assert "| setting | method | wikitext2 llama-2-7b | wikitext2 llama-2-13b | c4 llama-2-7b |" in markdown
    assert "| W3A16 | gptq | 8.37 / 8.00 (-0.37) | 6.44 / — |  |" in markdown
    latex = (tmp_path / "papers" / "magr.tex").read_text()
    assert r"\begin{tabular}{llrrr}" in latex and r"W3A16 & gptq & 8.37 / 8.00 (-0.37) & 6.44 / -- &  \\" in latex


def test_a_reference_file_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("paper,model,value\nMagR,llama-2-7b,5.47\n")
    with pytest.raises(PtqError, match="reference columns must be"):
        load_reference([path])


def zeroshot_result(recipe, task, acc, acc_norm=None, stderr=0.01):
    """One zero-shot result JSON as eval-zeroshot writes it (the keys the tables read)."""
    metrics = {"acc": acc, "acc_stderr": stderr} | ({"acc_norm": acc_norm, "acc_norm_stderr": stderr} if acc_norm is not None else {})
    return {"kind": "zeroshot", "model": "llama-2-7b", "recipe": recipe, "method": recipe.split("@")[0],
            "weight_format": None, "weight_scheme": None, "weight_bits": 16, "bits_per_weight": 16.0, "act_format": None,
            "dataset": task, "metrics": metrics, "calibration_seed": None,
            "provenance": {"config_hash": "h", "git_commit": "c", "device": "cpu", "wall_time_s": 1.0, "peak_rss_mb": 1.0}}


def zeroshot_summary(tmp_path, results):
    from ptqrepro.report.tables import gather_results, summarize
    from ptqrepro.report.uncertainty import BootstrapSettings

    paths = []
    for index, result in enumerate(results):
        paths.append(tmp_path / f"zs-{index}.json")
        paths[-1].write_text(__import__("json").dumps(result))
    return summarize(gather_results(paths), BootstrapSettings(samples=200, seed=0, level=0.95))


def test_averages_are_the_mean_of_each_tasks_reported_accuracy(tmp_path):
    from ptqrepro.report.tables import with_averages

    summary = zeroshot_summary(tmp_path, [
        zeroshot_result("fp16", "arc_easy", 0.70, 0.60, stderr=0.03), zeroshot_result("fp16", "piqa", 0.80, 0.90, stderr=0.04),
        zeroshot_result("gptq@int4", "arc_easy", 0.50, 0.40),  # piqa not scored: no average
    ])
    table = with_averages(summary, {"avg": {"arc_easy": "acc", "piqa": "acc"}, "mixed": {"arc_easy": "acc_norm", "piqa": "acc"}})
    added = table.iloc[len(summary):].set_index("dataset")
    assert list(added.index) == ["avg", "mixed"] and set(added["recipe"]) == {"fp16"} and set(added["kind"]) == {"zeroshot"}
    assert added.loc["avg", "metric"] == "acc" and added.loc["avg", "value"] == pytest.approx(0.75)
    assert added.loc["mixed", "metric"] == "acc+acc_norm" and added.loc["mixed", "value"] == pytest.approx(0.70)
    z = 1.959964
    assert added.loc["avg", "ci_high"] - 0.75 == pytest.approx(z * (0.03**2 + 0.04**2) ** 0.5 / 2, rel=1e-4)
    assert len(added.loc["avg", "source"].split()) == 2
    assert with_averages(summary, {}) is summary


def test_zero_shot_cells_put_our_percentages_beside_the_papers(tmp_path):
    from ptqrepro.report.tables import with_averages

    summary = zeroshot_summary(tmp_path, [zeroshot_result("fp16", "arc_easy", 0.70, 0.60), zeroshot_result("fp16", "piqa", 0.80, 0.90)])
    results = with_averages(summary, {"average": {"arc_easy": "acc", "piqa": "acc"}})
    path = tmp_path / "ref.csv"
    pd.DataFrame([
        ("MagR", "Table 4", "llama-2-7b", "fp16", "FP16", "arc_easy", "acc_pct", "69.3", "fp16", "T4"),
        ("MagR", "Table 4", "llama-2-7b", "fp16", "FP16", "piqa", "acc_norm_pct", "78.5", "fp16", "T4"),
        ("MagR", "Table 4", "llama-2-7b", "fp16", "FP16", "average", "acc_pct", "63.8", "fp16", "T4"),
        ("MagR", "Table 4", "llama-2-7b", "omniquant", "W4A16", "average", "acc_pct", "62.5", "", "T4"),
    ], columns=list(REFERENCE_COLUMNS)).to_csv(path, index=False)
    table = paper_sections(with_ours(load_reference([path]), results), results)["MagR"]["Table 4"]
    assert table.loc[("FP16", "fp16"), ("arc_easy", "llama-2-7b")] == "69.30 / 70.00 (+0.70)"
    assert table.loc[("FP16", "fp16"), ("piqa", "llama-2-7b")] == "78.50 / 90.00 (+11.50)"  # acc_norm, as the row says
    assert table.loc[("FP16", "fp16"), ("average", "llama-2-7b")] == "63.80 / 75.00 (+11.20)"
    assert table.loc[("W4A16", "omniquant"), ("average", "llama-2-7b")] == "62.50 / —"
