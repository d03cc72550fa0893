"""Claims as data: parsing, the three relations, and their verdicts on a small hand-written frame."""

from __future__ import annotations

import pandas as pd
import pytest

from ptqrepro.errors import PtqError
from ptqrepro.report.claims import FAILS, HOLDS, NOT_RUN, check_claims, claims_from_config, write_claims

# (model, recipe, dataset) -> ppl; model "b" lacks gptq@int3, and only model "a" has acc.
PPL = {
    ("a", "fp16", "wiki"): 20.0, ("a", "rtn@int3", "wiki"): 500.0, ("a", "gptq@int3", "wiki"): 150.0,
    ("a", "sq@w8a8", "wiki"): 20.3, ("a", "fp16", "c4"): 25.0, ("a", "rtn@int3", "c4"): 100.0,
    ("a", "gptq@int3", "c4"): 120.0, ("a", "sq@w8a8", "c4"): 26.0,
    ("b", "fp16", "wiki"): 10.0, ("b", "rtn@int3", "wiki"): 30.0, ("b", "sq@w8a8", "wiki"): 10.1,
}
ACC = {("a", "fp16", "lastword"): 0.5, ("a", "rtn@int3", "lastword"): 0.2, ("a", "gptq@int3", "lastword"): 0.3}
RECIPES = {"fp16": {}, "rtn@int3": {}, "gptq@int3": {}, "sq@w8a8": {}}


def frame() -> pd.DataFrame:
    rows = [{"model": m, "recipe": r, "dataset": d, "kind": "perplexity", "metric": "ppl", "value": v} for (m, r, d), v in PPL.items()]
    rows += [{"model": m, "recipe": r, "dataset": d, "kind": "zeroshot", "metric": "acc", "value": v} for (m, r, d), v in ACC.items()]
    return pd.DataFrame(rows)


def verdicts(entry) -> dict:
    table = check_claims(claims_from_config([entry], RECIPES), frame())
    return {(row.model, row.dataset): row.verdict for row in table.itertuples()}


def test_below_is_a_strict_chain_checked_per_model_and_dataset():
    result = verdicts({"paper": "GPTQ", "claim": "fp16 < GPTQ < RTN at int3", "below": ["fp16", "gptq@int3", "rtn@int3"]})
    assert result == {("a", "wiki"): HOLDS, ("a", "c4"): FAILS, ("b", "wiki"): NOT_RUN}


def test_at_or_below_compares_one_recipe_with_each_other():
    entry = {"paper": "X", "claim": "SQ at or below both", "at_or_below": {"recipe": "sq@w8a8", "than": ["gptq@int3", "rtn@int3"]}}
    assert verdicts(entry) == {("a", "wiki"): HOLDS, ("a", "c4"): HOLDS, ("b", "wiki"): NOT_RUN}
    equal = {"paper": "X", "claim": "fp16 at or below itself-like", "at_or_below": {"recipe": "fp16", "than": ["fp16"]}}
    with pytest.raises(PtqError, match="distinct"):
        claims_from_config([equal], RECIPES)


def test_within_is_relative_to_the_reference():
    entry = {"paper": "SmoothQuant", "claim": "W8A8 within 2% of fp16", "within": {"recipe": "sq@w8a8", "of": "fp16", "relative": 0.02}}
    # 20.3 vs 20 (1.5%) holds; 26 vs 25 (4%) fails; 10.1 vs 10 (1%) holds
    assert verdicts(entry) == {("a", "wiki"): HOLDS, ("a", "c4"): FAILS, ("b", "wiki"): HOLDS}


def test_higher_is_better_metrics_reverse_the_order():
    entry = {"paper": "MagR", "claim": "GPTQ more accurate than RTN", "below": ["rtn@int3", "gptq@int3", "fp16"],
             "metric": {"kind": "zeroshot", "name": "acc", "higher_is_better": True}}
    assert verdicts(entry) == {("a", "lastword"): FAILS}
    entry["below"] = ["fp16", "gptq@int3", "rtn@int3"]
    assert verdicts(entry) == {("a", "lastword"): HOLDS}


def test_a_claim_on_a_metric_nobody_measured_is_not_run():
    entry = {"paper": "X", "claim": "c4 only", "below": ["fp16", "rtn@int3"], "metric": {"kind": "zeroshot", "name": "acc_norm"}}
    table = check_claims(claims_from_config([entry], RECIPES), frame())
    assert table["verdict"].tolist() == [NOT_RUN] and table["missing"].iloc[0] == "fp16, rtn@int3"


def test_numbers_and_missing_recipes_are_reported():
    entry = {"paper": "GPTQ", "claim": "GPTQ below RTN", "below": ["gptq@int3", "rtn@int3"]}
    table = check_claims(claims_from_config([entry], RECIPES), frame()).set_index(["model", "dataset"])
    assert table.loc[("a", "wiki"), "numbers"] == "gptq@int3 150.00, rtn@int3 500.00"
    assert table.loc[("b", "wiki"), "missing"] == "gptq@int3"


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"paper": "X", "claim": "c", "below": ["fp16", "nope"]}, "nope not in the config's recipes"),
        ({"paper": "X", "claim": "c"}, "needs exactly one of below, at_or_below, within"),
        ({"paper": "X", "claim": "c", "below": ["fp16"]}, "at least two recipes"),
        ({"paper": "X", "claim": "c", "within": {"recipe": "fp16", "of": "rtn@int3", "relative": -1}}, "must be a number >= 0"),
        ({"paper": "X", "claim": "c", "at_or_below": {"recipe": "fp16"}}, "'at_or_below' is"),
        ({"paper": "X", "claim": "c", "below": ["fp16", "rtn@int3"], "typo": 1}, "unknown key"),
        ({"claim": "c", "below": ["fp16", "rtn@int3"]}, "needs 'paper' and 'claim'"),
    ],
)
def test_bad_claims_name_the_problem(entry, message):
    with pytest.raises(PtqError, match=message):
        claims_from_config([entry], RECIPES)


def test_written_tables_mark_failures(tmp_path):
    entries = [{"paper": "GPTQ", "claim": "fp16 < GPTQ < RTN", "below": ["fp16", "gptq@int3", "rtn@int3"]}]
    paths = write_claims(check_claims(claims_from_config(entries, RECIPES), frame()), tmp_path)
    assert pd.read_csv(paths["csv"])["verdict"].tolist() == [FAILS, HOLDS, NOT_RUN]
    markdown = paths["md"].read_text()
    assert "**fails**" in markdown and "| holds" in markdown
