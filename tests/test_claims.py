"""Claims as data: parsing, the three relations, and their verdicts on a small hand-written frame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ptqrepro.errors import PtqError
from ptqrepro.report.claims import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_RUN,
    SINGLE_DRAW,
    check_claims,
    claims_from_config,
    paired_losses,
    write_claims,
)
from ptqrepro.report.tables import WINDOW_COLUMNS
from ptqrepro.report.uncertainty import BootstrapSettings

SETTINGS = BootstrapSettings(samples=500)
WINDOWS = 32

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
    """The summary (all.csv) of ``PPL`` and ``ACC``; accuracies without intervals."""
    rows = [{"model": m, "recipe": r, "dataset": d, "kind": "perplexity", "metric": "ppl", "value": v,
             "ci_low": v * 0.9, "ci_high": v * 1.1} for (m, r, d), v in PPL.items()]
    rows += [{"model": m, "recipe": r, "dataset": d, "kind": "zeroshot", "metric": "acc", "value": v,
              "ci_low": math.nan, "ci_high": math.nan} for (m, r, d), v in ACC.items()]
    return pd.DataFrame(rows)


def window_rows(model, recipe, dataset, nll, seed=None, fingerprint="abc") -> list[dict]:
    return [{"model": model, "recipe": recipe, "seed": seed, "dataset": dataset, "window": index, "nll": float(value),
             "windows_sha256": fingerprint, "source": f"{recipe}-s{seed}.json"} for index, value in enumerate(nll)]


def windows() -> pd.DataFrame:
    """Per-window losses whose mean is log(ppl) of ``PPL``: a window difficulty shared by every
    recipe of a (model, dataset) (spread 0.5 nats, as real test windows) and a little recipe noise."""
    rng = np.random.default_rng(1)
    difficulty = {place: rng.normal(0, 0.5, WINDOWS) for place in {(m, d) for m, _, d in PPL}}
    rows = []
    for (model, recipe, dataset), ppl in PPL.items():
        own = rng.normal(0, 0.001, WINDOWS)
        shared = difficulty[model, dataset]
        rows += window_rows(model, recipe, dataset, math.log(ppl) + shared - shared.mean() + own - own.mean())
    return pd.DataFrame(rows, columns=list(WINDOW_COLUMNS))


def verdicts(entry, summary=None, losses=None) -> dict:
    table = check_claims(claims_from_config([entry], RECIPES), frame() if summary is None else summary,
                         windows() if losses is None else losses, SETTINGS)
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
    table = check_claims(claims_from_config([entry], RECIPES), frame(), windows(), SETTINGS)
    assert table["verdict"].tolist() == [NOT_RUN] and table["missing"].iloc[0] == "fp16, rtn@int3"


def test_numbers_and_missing_recipes_are_reported():
    entry = {"paper": "GPTQ", "claim": "GPTQ below RTN", "below": ["gptq@int3", "rtn@int3"]}
    table = check_claims(claims_from_config([entry], RECIPES), frame(), windows(), SETTINGS).set_index(["model", "dataset"])
    assert table.loc[("a", "wiki"), "numbers"] == "gptq@int3 150.00 [135.00, 165.00], rtn@int3 500.00 [450.00, 550.00]"
    assert table.loc[("a", "wiki"), "comparisons"].startswith("gptq@int3 vs rtn@int3: -70.00 % [")
    assert table.loc[("a", "wiki"), "comparisons"].endswith("] holds")
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


def test_written_tables_mark_failures_and_say_how_verdicts_are_decided(tmp_path):
    entries = [{"paper": "GPTQ", "claim": "fp16 < GPTQ < RTN", "below": ["fp16", "gptq@int3", "rtn@int3"]}]
    paths = write_claims(check_claims(claims_from_config(entries, RECIPES), frame(), windows(), SETTINGS), tmp_path, SETTINGS)
    assert pd.read_csv(paths["csv"])["verdict"].tolist() == [FAILS, HOLDS, NOT_RUN]
    markdown = paths["md"].read_text()
    assert "**fails**" in markdown and "| holds" in markdown
    assert "wholly on the other side" in markdown and "500 replicates" in markdown


def two_recipes(nll_a, nll_b, seeds=(None,)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A summary and windows frame of recipes fp16 (a) and rtn@int3 (b) on model m, dataset d, from
    per-seed loss arrays [seeds, windows]."""
    nll_a, nll_b = np.atleast_2d(nll_a), np.atleast_2d(nll_b)
    rows = []
    for recipe, nll in (("fp16", nll_a), ("rtn@int3", nll_b)):
        for seed, losses in zip(seeds, nll):
            rows += window_rows("m", recipe, "d", losses, seed=seed)
    summary = pd.DataFrame([{"model": "m", "recipe": r, "dataset": "d", "kind": "perplexity", "metric": "ppl",
                             "value": math.exp(nll.mean()), "ci_low": math.nan, "ci_high": math.nan}
                            for r, nll in (("fp16", nll_a), ("rtn@int3", nll_b))])
    return summary, pd.DataFrame(rows, columns=list(WINDOW_COLUMNS))


BELOW = {"paper": "X", "claim": "fp16 below RTN", "below": ["fp16", "rtn@int3"]}


def test_a_constant_difference_between_noisy_windows_is_conclusive():
    difficulty = np.random.default_rng(2).normal(3.0, 0.8, 24)
    assert verdicts(BELOW, *two_recipes(difficulty, difficulty + 0.01)) == {("m", "d"): HOLDS}
    assert verdicts(BELOW, *two_recipes(difficulty + 0.01, difficulty)) == {("m", "d"): FAILS}


def test_pure_noise_is_inconclusive_and_identical_models_are_not_below_each_other():
    rng = np.random.default_rng(3)
    difficulty = rng.normal(3.0, 0.8, 24)
    noisy = [verdicts(BELOW, *two_recipes(difficulty + rng.normal(0, 0.05, 24), difficulty + rng.normal(0, 0.05, 24)))
             for _ in range(40)]
    assert sum(v == {("m", "d"): INCONCLUSIVE} for v in noisy) >= 34  # 95 % intervals: about 38 of 40
    assert verdicts(BELOW, *two_recipes(difficulty, difficulty)) == {("m", "d"): FAILS}
    at_or_below = {"paper": "DWR", "claim": "never worse", "at_or_below": {"recipe": "fp16", "than": ["rtn@int3"]}}
    assert verdicts(at_or_below, *two_recipes(difficulty, difficulty)) == {("m", "d"): HOLDS}


def test_within_is_inconclusive_where_the_interval_straddles_the_bound():
    rng = np.random.default_rng(4)
    difficulty = rng.normal(3.0, 0.8, 24)
    within = {"paper": "X", "claim": "within 2 %", "within": {"recipe": "fp16", "of": "rtn@int3", "relative": 0.02}}
    # ratio exp(0.0198) = 1.02, right at the bound, with window noise: undecidable
    assert verdicts(within, *two_recipes(difficulty + 0.0198 + rng.normal(0, 0.02, 24), difficulty)) == {("m", "d"): INCONCLUSIVE}
    assert verdicts(within, *two_recipes(difficulty + 0.005, difficulty)) == {("m", "d"): HOLDS}
    assert verdicts(within, *two_recipes(difficulty + 0.05, difficulty)) == {("m", "d"): FAILS}


def test_seeds_that_disagree_make_a_claim_seed_dependent():
    difficulty = np.random.default_rng(5).normal(3.0, 0.8, 24)
    a = np.stack([difficulty - 0.2, difficulty - 0.2, difficulty + 0.01])  # two seeds below, one above
    summary, losses = two_recipes(a, np.stack([difficulty] * 3), seeds=(0, 1, 2))
    table = check_claims(claims_from_config([BELOW], RECIPES), summary, losses, SETTINGS)
    assert table["verdict"].tolist() == [INCONCLUSIVE] and table["note"].tolist() == ["seed-dependent: fp16 vs rtn@int3"]
    summary, losses = two_recipes(a[:2], np.stack([difficulty] * 2), seeds=(0, 1))
    assert check_claims(claims_from_config([BELOW], RECIPES), summary, losses, SETTINGS)["verdict"].tolist() == [HOLDS]


def test_pairs_follow_seeds_and_a_recipe_without_calibration_is_set_against_every_seed():
    rows = window_rows("m", "a", "d", [1.0, 2.0], seed=0) + window_rows("m", "a", "d", [3.0, 4.0], seed=1)
    rows += window_rows("m", "a", "d", [5.0, 6.0], seed=2)
    rows += window_rows("m", "b", "d", [0.0, 0.0], seed=2) + window_rows("m", "b", "d", [0.5, 0.5], seed=1)
    rows += window_rows("m", "c", "d", [9.0, 9.0], seed=None)  # reads no calibration data (RTN)
    rows += window_rows("m", "e", "d", [7.0, 7.0], seed=0)  # calibrated, at one seed only
    losses = pd.DataFrame(rows, columns=list(WINDOW_COLUMNS))
    a, b = paired_losses(losses, "m", "d", "a", "b")
    assert a.tolist() == [[3.0, 4.0], [5.0, 6.0]] and b.tolist() == [[0.5, 0.5], [0.0, 0.0]]
    a, c = paired_losses(losses, "m", "d", "a", "c")
    assert a.shape == c.shape == (3, 2) and c.tolist() == [[9.0, 9.0]] * 3
    a, e = paired_losses(losses, "m", "d", "a", "e")
    assert a.tolist() == [[1.0, 2.0]] and e.tolist() == [[7.0, 7.0]]
    with pytest.raises(PtqError, match="share no calibration seed"):
        paired_losses(losses, "m", "d", "b", "e")
    other = losses.assign(windows_sha256=np.where(losses["recipe"] == "c", "zzz", losses["windows_sha256"]))
    with pytest.raises(PtqError, match="different test windows"):
        paired_losses(other, "m", "d", "a", "c")


def test_recipes_that_differ_only_by_the_calibration_draw_never_hold_or_fail_on_one_draw():
    """Each calibrated recipe's model is its method plus the luck of its calibration draw: a shift of
    every window's loss by a draw-dependent amount (sd 0.02 nats, as GPTQ at INT4 between seeds).
    Measured on one draw, the paired interval over windows is tight around that luck, so the same
    numbers without calibration seeds would hold or fail; with one seed they are a single draw."""
    rng = np.random.default_rng(7)
    difficulty = rng.normal(3.0, 0.8, 24)
    seen, uncalibrated = set(), set()
    for _ in range(30):
        a, b = (difficulty + rng.normal(0, 0.02) + rng.normal(0, 0.002, 24) for _ in range(2))
        table = check_claims(claims_from_config([BELOW], RECIPES), *two_recipes(a, b, seeds=(0,)), SETTINGS)
        seen |= set(table["verdict"])
        assert table["draws"].tolist() == [1]
        uncalibrated |= set(verdicts(BELOW, *two_recipes(a, b)).values())
    assert seen <= {SINGLE_DRAW, INCONCLUSIVE} and SINGLE_DRAW in seen
    assert {HOLDS, FAILS} <= uncalibrated  # what the draw's luck would have claimed


def kld_windows(nll_a, nll_b, kld_a, kld_b, seeds=(None,)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``two_recipes`` with per-window KLs and their all.csv rows."""
    summary, losses = two_recipes(nll_a, nll_b, seeds)
    for recipe, kld in (("fp16", np.atleast_2d(kld_a)), ("rtn@int3", np.atleast_2d(kld_b))):
        for seed, values in zip(seeds, kld):
            chosen = (losses["recipe"] == recipe) & (losses["seed"].isna() if seed is None else losses["seed"] == seed)
            losses.loc[chosen, "kld"] = values
        summary.loc[len(summary)] = {"model": "m", "recipe": recipe, "dataset": "d", "kind": "perplexity", "metric": "kld",
                                     "value": kld.mean(), "ci_low": math.nan, "ci_high": math.nan}
    return summary, losses


def test_claims_are_judged_on_the_kl_divergence_too():
    rng = np.random.default_rng(8)
    difficulty = rng.normal(3.0, 0.8, 24)
    # perplexities undecidable (window noise), the KL divergences clearly ordered
    nll_a, nll_b = difficulty + rng.normal(0, 0.05, 24), difficulty + rng.normal(0, 0.05, 24)
    kld_a, kld_b = rng.uniform(0.01, 0.02, 24), rng.uniform(0.03, 0.05, 24)
    summary, losses = kld_windows(nll_a, nll_b, kld_a, kld_b)
    table = check_claims(claims_from_config([BELOW], RECIPES), summary, losses, SETTINGS)
    assert table["verdict"].tolist() == [INCONCLUSIVE] and table["kld_verdict"].tolist() == [HOLDS]
    assert "nats" in table["kld_comparisons"].iloc[0]
    on_kld = check_claims(claims_from_config([{**BELOW, "metric": "kld"}], RECIPES), summary, losses, SETTINGS)
    assert on_kld["verdict"].tolist() == [HOLDS] and on_kld["comparisons"].iloc[0].startswith("fp16 vs rtn@int3: -0.0")
    within = {"paper": "X", "claim": "KL within 2 %", "within": {"recipe": "rtn@int3", "of": "fp16", "relative": 0.02},
              "metric": "kld"}
    assert verdicts(within, summary, losses) == {("m", "d"): FAILS}  # 0.03 nats > log(1.02)
    assert verdicts({**within, "within": {**within["within"], "relative": 0.1}}, summary, losses) == {("m", "d"): HOLDS}
    with pytest.raises(PtqError, match="'metric' is one of ppl, kld, flips"):
        claims_from_config([{**BELOW, "metric": "kl"}], RECIPES)


def test_written_claims_show_the_kld_verdict_and_the_draws(tmp_path):
    rng = np.random.default_rng(9)
    difficulty = rng.normal(3.0, 0.8, 24)
    summary, losses = kld_windows(difficulty, difficulty + 0.1, np.full(24, 0.01), np.full(24, 0.05), seeds=(0,))
    table = check_claims(claims_from_config([BELOW], RECIPES), summary, losses, SETTINGS)
    assert table[["verdict", "kld_verdict", "draws"]].values.tolist() == [[SINGLE_DRAW, SINGLE_DRAW, 1]]
    markdown = write_claims(table, tmp_path, SETTINGS)["md"].read_text()
    assert "kld_verdict" in markdown and "kld_comparisons" in markdown
    assert "*single draw*" in markdown and "never holds or fails" in markdown
