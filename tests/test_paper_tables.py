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
