"""The papers' qualitative claims as data, checked against the results with their uncertainty.

A claim names recipes of the config and a relation between their values of one metric
(perplexity by default, lower is better), for example MagR's "MagR+GPTQ below GPTQ at W2 per
channel" or the MX-PTQ paper's "SQ+AWQ+GPTQ at or below each single method". Three relations,
written in a config's ``claims:``:

    below: [a, b, c]                           v(a) < v(b) < v(c)
    at_or_below: {recipe: a, than: [b, c]}     v(a) <= v(b) and v(a) <= v(c)
    within: {recipe: a, of: b, relative: r}    |v(a) - v(b)| <= r · v(b)

each with ``paper`` and ``claim`` (its words), and optionally ``metric: {kind, name, higher_is_better}``
for a metric other than perplexity (``below`` then reads "worse than").

A claim is a set of pairwise comparisons (a chain a < b < c is a < b and b < c). Each compares the
quantity delta = log(ppl_a / ppl_b), the paired mean difference of the two recipes' per-window
NLLs (``report.uncertainty.paired_difference``, bootstrap over the shared test windows and the
calibration seeds), with the side the claim puts it on (below: delta < 0; at or below: delta <= 0;
within r: log(1 - r) <= delta <= log(1 + r)). A comparison **holds** when its whole interval is on
the claimed side, **fails** when it is wholly on the other side, and is **inconclusive** otherwise,
or when the calibration seeds' own deltas fall on different sides (noted "seed-dependent"). A
claim holds when every comparison holds, fails when any fails, and is inconclusive otherwise.
Metrics without per-window data (zero-shot accuracy) compare a - b with the normal interval
±z·sqrt(se_a² + se_b²) from the summary's intervals, unpaired. A claim is checked on every
(model, dataset) of the results; ``not run`` names the recipes without a result there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ptqrepro.errors import PtqError
from ptqrepro.io import atomic_path
from ptqrepro.report.tables import PERPLEXITY_KIND, PERPLEXITY_METRIC, recipe_losses
from ptqrepro.report.uncertainty import (
    BootstrapSettings,
    Interval,
    normal_quantile,
    pair_by_seed,
    paired_difference,
    seed_agreement,
)

RELATIONS = ("below", "at_or_below", "within")
HOLDS, FAILS, INCONCLUSIVE, NOT_RUN = "holds", "fails", "inconclusive", "not run"
SEED_DEPENDENT = "seed-dependent"
CLAIM_COLUMNS = ("paper", "claim", "model", "dataset", "verdict", "numbers", "comparisons", "note", "missing")


@dataclass(frozen=True)
class Claim:
    """One claim: ``recipes`` in the order the relation reads them (for ``at_or_below`` and
    ``within`` the first is the recipe under test and the rest what it is compared with)."""

    paper: str
    text: str
    relation: str
    recipes: tuple[str, ...]
    relative: float | None = None
    kind: str = PERPLEXITY_KIND
    metric: str = PERPLEXITY_METRIC
    higher_is_better: bool = False

    def pairs(self) -> list[tuple[str, str]]:
        """The comparisons (a, b) the claim is made of, each "a <relation> b"."""
        if self.relation == "below":
            return list(zip(self.recipes, self.recipes[1:]))
        return [(self.recipes[0], other) for other in self.recipes[1:]]

    def claimed_side(self, reference: float) -> tuple[float, float, bool]:
        """The claimed range ``(low, high, strict)`` of the compared quantity delta: the log ratio of
        perplexities, or for another metric the signed difference (``reference`` is b's value then,
        for ``within``). ``strict``: the range excludes ``high`` (``below``'s delta < 0)."""
        if self.relation == "below":
            return -math.inf, 0.0, True
        if self.relation == "at_or_below":
            return -math.inf, 0.0, False
        if self.is_perplexity:
            low = math.log(1 - self.relative) if self.relative < 1 else -math.inf
            return low, math.log(1 + self.relative), False
        return -self.relative * abs(reference), self.relative * abs(reference), False

    @property
    def is_perplexity(self) -> bool:
        return self.kind == PERPLEXITY_KIND and self.metric == PERPLEXITY_METRIC

    def judge(self, delta: Interval, reference: float) -> str:
        """holds / fails / inconclusive for one comparison's interval of delta."""
        low, high, strict = self.claimed_side(reference)
        if delta.low >= low and (delta.high < high if strict else delta.high <= high):
            return HOLDS
        if delta.high < low or (delta.low >= high if strict else delta.low > high):
            return FAILS
        return INCONCLUSIVE

    def on_claimed_side(self, delta: float, reference: float) -> bool:
        """Whether a point estimate of delta is on the claimed side."""
        low, high, strict = self.claimed_side(reference)
        return low <= delta and (delta < high if strict else delta <= high)


def claims_from_config(entries: list, recipes: dict | None = None) -> list[Claim]:
    """Validate a config's ``claims`` list; with the config's ``recipes``, every recipe a claim
    names must be one of them. Every problem is one line naming the claim."""
    if not isinstance(entries, list):
        raise PtqError(f"claims must be a list, got {type(entries).__name__}")
    return [_claim(index, entry, recipes) for index, entry in enumerate(entries)]


def _claim(index: int, entry, recipes: dict | None) -> Claim:
    where = f"claim {index + 1}"
    if not isinstance(entry, dict):
        raise PtqError(f"{where}: expected a mapping with paper, claim and one of {', '.join(RELATIONS)}")
    where = f"claim {index + 1} ({entry.get('claim', '?')!r})"
    relations = [key for key in RELATIONS if key in entry]
    unknown = set(entry) - {"paper", "claim", "metric", *RELATIONS}
    if unknown:
        raise PtqError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    if len(relations) != 1:
        raise PtqError(f"{where}: needs exactly one of {', '.join(RELATIONS)}, got {relations or 'none'}")
    if not isinstance(entry.get("paper"), str) or not isinstance(entry.get("claim"), str):
        raise PtqError(f"{where}: needs 'paper' and 'claim' (text)")
    relation = relations[0]
    body = entry[relation]
    relative = None
    if relation == "below":
        if not isinstance(body, list) or len(body) < 2:
            raise PtqError(f"{where}: 'below' is a list of at least two recipes")
        names = tuple(body)
    elif relation == "at_or_below":
        if not isinstance(body, dict) or set(body) != {"recipe", "than"} or not isinstance(body["than"], list) or not body["than"]:
            raise PtqError(f"{where}: 'at_or_below' is {{recipe: A, than: [B, ...]}}")
        names = (body["recipe"], *body["than"])
    else:
        if not isinstance(body, dict) or set(body) != {"recipe", "of", "relative"}:
            raise PtqError(f"{where}: 'within' is {{recipe: A, of: B, relative: r}}")
        relative = body["relative"]
        if isinstance(relative, bool) or not isinstance(relative, (int, float)) or relative < 0:
            raise PtqError(f"{where}: 'within.relative' must be a number >= 0, got {relative!r}")
        names = (body["recipe"], body["of"])
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise PtqError(f"{where}: recipes must be distinct names, got {list(names)}")
    if recipes is not None:
        missing = [name for name in names if name not in recipes]
        if missing:
            raise PtqError(f"{where}: recipe(s) {', '.join(missing)} not in the config's recipes")
    metric = entry.get("metric") or {}
    if not isinstance(metric, dict) or set(metric) - {"kind", "name", "higher_is_better"}:
        raise PtqError(f"{where}: 'metric' is {{kind, name, higher_is_better}}")
    return Claim(
        paper=entry["paper"], text=entry["claim"], relation=relation, recipes=names,
        relative=None if relative is None else float(relative),
        kind=metric.get("kind", PERPLEXITY_KIND), metric=metric.get("name", PERPLEXITY_METRIC),
        higher_is_better=bool(metric.get("higher_is_better", False)),
    )


def check_claims(claims: list[Claim], frame: pd.DataFrame, windows: pd.DataFrame,
                 settings: BootstrapSettings) -> pd.DataFrame:
    """One row per claim and (model, dataset) of the claim's metric in ``frame`` (the summary,
    all.csv), judged with ``windows`` (windows.csv) for perplexity: ``verdict`` holds / fails /
    inconclusive / not run, ``numbers`` the values and intervals in the claim's order,
    ``comparisons`` each pairwise difference with its interval and verdict, ``note`` the
    seed-dependent comparisons, ``missing`` the recipes without a result. A claim whose metric no
    result has gets one ``not run`` row."""
    rows = []
    for claim in claims:
        selected = frame[(frame["kind"] == claim.kind) & (frame["metric"] == claim.metric)]
        places = selected[["model", "dataset"]].drop_duplicates().sort_values(["model", "dataset"])
        if places.empty:
            rows.append(_row(claim, "—", "—", NOT_RUN, {}, [], [], list(claim.recipes)))
            continue
        for model, dataset in places.itertuples(index=False):
            here = selected[(selected["model"] == model) & (selected["dataset"] == dataset)].set_index("recipe")
            missing = [recipe for recipe in claim.recipes if recipe not in here.index or pd.isna(here.loc[recipe, "value"])]
            if missing:
                rows.append(_row(claim, model, dataset, NOT_RUN, here, [], [], missing))
                continue
            compared = [_compare(claim, a, b, here, windows, model, dataset, settings) for a, b in claim.pairs()]
            verdicts = {verdict for _, _, _, verdict, _ in compared}
            verdict = FAILS if FAILS in verdicts else HOLDS if verdicts == {HOLDS} else INCONCLUSIVE
            rows.append(_row(claim, model, dataset, verdict, here, compared,
                             [f"{a} vs {b}" for a, b, _, _, dependent in compared if dependent], []))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def _compare(claim: Claim, a: str, b: str, here: pd.DataFrame, windows: pd.DataFrame, model: str, dataset: str,
             settings: BootstrapSettings) -> tuple[str, str, Interval, str, bool]:
    """``(a, b, delta, verdict, seed_dependent)`` of one comparison."""
    reference = float(here.loc[b, "value"])
    if claim.is_perplexity:
        nll_a, nll_b = paired_losses(windows, model, dataset, a, b)
        delta = paired_difference(nll_a, nll_b, settings)
        dependent = nll_a.shape[0] > 1 and not seed_agreement(nll_a, nll_b, lambda d: claim.on_claimed_side(d, reference))
    else:
        delta = _unpaired_difference(claim, here.loc[a], here.loc[b], settings)
        dependent = False
    verdict = INCONCLUSIVE if dependent else claim.judge(delta, reference)
    return a, b, delta, verdict, dependent


def paired_losses(windows: pd.DataFrame, model: str, dataset: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-window losses of recipes ``a`` and ``b`` on one model and dataset, paired row by row
    (``report.uncertainty.pair_by_seed``). Both must have scored the same test windows."""
    first, second = (recipe_losses(windows, model, recipe, dataset) for recipe in (a, b))
    if first.fingerprint != second.fingerprint:
        raise PtqError(f"{a} and {b} on {dataset} ({model}) scored different test windows: they cannot be "
                       "compared window by window; evaluate both with the same protocol")
    return pair_by_seed(first.seeds, first.nll, second.seeds, second.nll, f"{a} and {b} on {dataset} ({model})")


def _unpaired_difference(claim: Claim, a: pd.Series, b: pd.Series, settings: BootstrapSettings) -> Interval:
    """a - b (negated for higher-is-better metrics) with a normal interval from both summary
    intervals; a point interval where neither has one."""
    sign = -1.0 if claim.higher_is_better else 1.0
    z = normal_quantile(settings.level)
    stderrs = [(row["ci_high"] - row["ci_low"]) / (2 * z) for row in (a, b)]
    half = z * math.sqrt(sum(0.0 if pd.isna(se) else se**2 for se in stderrs))
    delta = sign * (float(a["value"]) - float(b["value"]))
    return Interval(delta, delta - half, delta + half)


def _row(claim: Claim, model: str, dataset: str, verdict: str, here, compared: list, dependent: list[str],
         missing: list[str]) -> dict:
    numbers = ", ".join(f"{recipe} {_value_with_interval(here.loc[recipe])}" for recipe in claim.recipes
                        if len(here) and recipe in here.index)
    comparisons = "; ".join(f"{a} vs {b}: {_difference(claim, delta)} {verdict}" for a, b, delta, verdict, _ in compared)
    note = f"{SEED_DEPENDENT}: {', '.join(dependent)}" if dependent else ""
    return {
        "paper": claim.paper, "claim": claim.text, "model": model, "dataset": dataset, "verdict": verdict,
        "numbers": numbers, "comparisons": comparisons, "note": note, "missing": ", ".join(missing),
    }


def _value_with_interval(row: pd.Series) -> str:
    if pd.isna(row["value"]):
        return "—"
    interval = "" if pd.isna(row["ci_low"]) else f" [{_number(row['ci_low'])}, {_number(row['ci_high'])}]"
    return f"{_number(row['value'])}{interval}"


def _difference(claim: Claim, delta: Interval) -> str:
    """A comparison's quantity: for perplexity the ratio a/b as a percent change, else a - b."""
    if claim.is_perplexity:
        low, value, high = (100 * math.expm1(x) for x in (delta.low, delta.value, delta.high))
        return f"{value:+.2f} % [{low:+.2f}, {high:+.2f}]"
    return f"{delta.value:+.4g} [{delta.low:+.4g}, {delta.high:+.4g}]"


def _number(value: float) -> str:
    """Four significant digits, at least two decimals (perplexities span 20 to 1e6)."""
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"


VERDICT_RULE = (
    "A comparison **holds** when its whole {level:.0%} interval is on the claimed side, **fails** when it is "
    "wholly on the other side, and is *inconclusive* otherwise, or where the calibration seeds disagree "
    "(seed-dependent). For perplexity the compared quantity is ppl_a / ppl_b − 1 (shown in %), from the "
    "paired bootstrap over the shared test windows and the calibration seeds ({samples} replicates, seed "
    "{seed}); 'within r' claims ask the ratio to lie within ±r. A claim holds when every comparison holds "
    "and fails when any fails."
)


def write_claims(table: pd.DataFrame, out_dir: str | os.PathLike, settings: BootstrapSettings) -> dict[str, Path]:
    """``out_dir/claims.csv`` and ``out_dir/claims.md`` (failures in bold, inconclusive in italics,
    and how a verdict is decided), written atomically."""
    out_dir = Path(out_dir)
    written = {"csv": out_dir / "claims.csv", "md": out_dir / "claims.md"}
    with atomic_path(written["csv"]) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    marks = {FAILS: "**{}**", INCONCLUSIVE: "*{}*"}
    shown = table.assign(verdict=table["verdict"].map(lambda v: marks.get(v, "{}").format(v)))
    rule = VERDICT_RULE.format(level=settings.level, samples=settings.samples, seed=settings.seed)
    markdown = "# Claims\n\n" + (
        shown.to_markdown(index=False) if not table.empty else "No claims in the config."
    ) + f"\n\n{rule}\n"
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(markdown)
    return written
