"""The papers' qualitative claims as data, checked against the results with their uncertainty.

A claim names recipes of the config and a relation between their values of one metric
(perplexity by default, lower is better), for example MagR's "MagR+GPTQ below GPTQ at W2 per
channel" or the MX-PTQ paper's "SQ+AWQ+GPTQ at or below each single method". Three relations,
written in a config's ``claims:``:

    below: [a, b, c]                           v(a) < v(b) < v(c)
    at_or_below: {recipe: a, than: [b, c]}     v(a) <= v(b) and v(a) <= v(c)
    within: {recipe: a, of: b, relative: r}    |v(a) - v(b)| <= r · v(b)

each with ``paper`` and ``claim`` (its words), and optionally ``metric``: ``kld`` (the mean KL
divergence from the float model, ``eval.divergence``), ``flips`` (the share of top-1 flips), ``ppl``
(the default), or ``{kind, name, higher_is_better}`` for another metric (``below`` then reads
"worse than").

A claim is a set of pairwise comparisons (a chain a < b < c is a < b and b < c). Each compares the
quantity delta = log(ppl_a / ppl_b), the paired mean difference of the two recipes' per-window
NLLs (``report.uncertainty.paired_difference``, bootstrap over the shared test windows and the
calibration seeds), with the side the claim puts it on (below: delta < 0; at or below: delta <= 0;
within r: log(1 - r) <= delta <= log(1 + r)). On ``kld`` delta is the paired mean difference of the
per-window KL divergences, in nats per token like the log ratio of perplexities (KL(float || q) is the
rise of the next-token loss on text the float model would write), so "within r" keeps its bounds
log(1 - r) <= delta <= log(1 + r); on ``flips`` it is the difference of the shares. A comparison **holds** when its whole interval is on
the claimed side, **fails** when it is wholly on the other side, and is **inconclusive** otherwise,
or when the calibration seeds' own deltas fall on different sides (noted "seed-dependent"). A
comparison of a recipe that reads calibration data measured at one calibration seed only is a
**single draw**, never holds or fails: its interval covers the test windows, not the calibration
draw that a claim about a method is judged over. A claim fails when any comparison fails, holds
when every comparison holds, is inconclusive when any is inconclusive, and a single draw otherwise.
Each perplexity claim is also judged on the KL divergence where the results have it
(``kld_verdict``).
Metrics without per-window data (zero-shot accuracy) compare a - b with the normal interval
±z·sqrt(se_a² + se_b²) from the summary's intervals, unpaired. A claim is checked on every
(model, dataset) of the results; ``not run`` names the recipes without a result there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ptqrepro.errors import PtqError
from ptqrepro.runtime.io import atomic_path
from ptqrepro.report.result_format import PERPLEXITY_KIND
from ptqrepro.report.tables import FLIPS_METRIC, KLD_METRIC, PERPLEXITY_METRIC, recipe_losses
from ptqrepro.report.uncertainty import (
    BootstrapSettings,
    Interval,
    is_seedless,
    normal_quantile,
    pair_by_seed,
    paired_difference,
    seed_agreement,
)

RELATIONS = ("below", "at_or_below", "within")
HOLDS, FAILS, INCONCLUSIVE, NOT_RUN, SINGLE_DRAW = "holds", "fails", "inconclusive", "not run", "single draw"
SEED_DEPENDENT = "seed-dependent"
CLAIM_COLUMNS = ("paper", "claim", "model", "dataset", "verdict", "kld_verdict", "draws", "numbers", "comparisons",
                 "kld_comparisons", "note", "missing")
"""``draws``: the fewest calibration seeds any comparison of a calibrated recipe rests on (empty
where no recipe of the claim reads calibration data)."""
PER_WINDOW_METRICS = {PERPLEXITY_METRIC: "nll", KLD_METRIC: "kld", FLIPS_METRIC: "flips"}
"""Perplexity results' metrics compared window by window, and their windows.csv column."""
METRIC_NAMES = {name: {"kind": PERPLEXITY_KIND, "name": name} for name in PER_WINDOW_METRICS}
"""``metric:`` as one word."""


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
        if self.in_nats:
            low = math.log(1 - self.relative) if self.relative < 1 else -math.inf
            return low, math.log(1 + self.relative), False
        return -self.relative * abs(reference), self.relative * abs(reference), False

    @property
    def is_perplexity(self) -> bool:
        return self.kind == PERPLEXITY_KIND and self.metric == PERPLEXITY_METRIC

    @property
    def in_nats(self) -> bool:
        """delta is a difference of mean token losses: the log ratio of perplexities, or of KLs."""
        return self.kind == PERPLEXITY_KIND and self.metric in (PERPLEXITY_METRIC, KLD_METRIC)

    @property
    def window_column(self) -> str | None:
        """The windows.csv column compared window by window (None: an unpaired metric)."""
        return PER_WINDOW_METRICS.get(self.metric) if self.kind == PERPLEXITY_KIND else None

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
    if isinstance(metric, str) and metric in METRIC_NAMES:
        metric = METRIC_NAMES[metric]
    if not isinstance(metric, dict) or set(metric) - {"kind", "name", "higher_is_better"}:
        raise PtqError(f"{where}: 'metric' is one of {', '.join(METRIC_NAMES)} or {{kind, name, higher_is_better}}")
    return Claim(
        paper=entry["paper"], text=entry["claim"], relation=relation, recipes=names,
        relative=None if relative is None else float(relative),
        kind=metric.get("kind", PERPLEXITY_KIND), metric=metric.get("name", PERPLEXITY_METRIC),
        higher_is_better=bool(metric.get("higher_is_better", False)),
    )


def check_claims(claims: list[Claim], frame: pd.DataFrame, windows: pd.DataFrame,
                 settings: BootstrapSettings) -> pd.DataFrame:
    """One row per claim and (model, dataset) of the claim's metric in ``frame`` (the summary,
    all.csv), judged with ``windows`` (windows.csv) for the per-window metrics: ``verdict`` holds /
    fails / inconclusive / single draw / not run, ``kld_verdict`` the same claim judged on the KL
    divergence (perplexity claims, where the results have it), ``draws`` the calibration seeds it
    rests on, ``numbers`` the values and intervals in the claim's order, ``comparisons`` (and
    ``kld_comparisons``) each pairwise difference with its interval and verdict, ``note`` the
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
            row = _row(claim, model, dataset, claim_verdict(compared), here, compared,
                       [f"{a} vs {b}" for a, b, _, _, dependent, _ in compared if dependent], [])
            rows.append(row | _kld_judgement(claim, frame, windows, model, dataset, settings))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def claim_verdict(compared: list) -> str:
    """A claim's verdict from its comparisons' (module docstring)."""
    verdicts = {verdict for _, _, _, verdict, _, _ in compared}
    if FAILS in verdicts:
        return FAILS
    if verdicts == {HOLDS}:
        return HOLDS
    return INCONCLUSIVE if INCONCLUSIVE in verdicts else SINGLE_DRAW


def _kld_judgement(claim: Claim, frame: pd.DataFrame, windows: pd.DataFrame, model: str, dataset: str,
                   settings: BootstrapSettings) -> dict:
    """``kld_verdict`` and ``kld_comparisons`` of a perplexity claim: the same relation on the KL
    divergence, where every recipe of it has one here (else empty)."""
    if not claim.is_perplexity:
        return {}
    twin = dataclasses.replace(claim, metric=KLD_METRIC)
    here = frame[(frame["kind"] == twin.kind) & (frame["metric"] == twin.metric) & (frame["model"] == model)
                 & (frame["dataset"] == dataset)].set_index("recipe")
    if any(recipe not in here.index or pd.isna(here.loc[recipe, "value"]) for recipe in claim.recipes):
        return {}
    compared = [_compare(twin, a, b, here, windows, model, dataset, settings) for a, b in twin.pairs()]
    return {"kld_verdict": claim_verdict(compared), "kld_comparisons": _comparisons(twin, compared)}


def _compare(claim: Claim, a: str, b: str, here: pd.DataFrame, windows: pd.DataFrame, model: str, dataset: str,
             settings: BootstrapSettings) -> tuple[str, str, Interval, str, bool, int | None]:
    """``(a, b, delta, verdict, seed_dependent, draws)`` of one comparison; ``draws`` the calibration
    seeds it rests on (None where neither recipe reads calibration data)."""
    reference = float(here.loc[b, "value"])
    if claim.window_column:
        nll_a, nll_b, draws = paired_values(windows, model, dataset, a, b, claim.window_column)
        delta = paired_difference(nll_a, nll_b, settings)
        dependent = nll_a.shape[0] > 1 and not seed_agreement(nll_a, nll_b, lambda d: claim.on_claimed_side(d, reference))
    else:
        delta = _unpaired_difference(claim, here.loc[a], here.loc[b], settings)
        dependent = False
        draws = _summary_draws(here, a, b)
    verdict = INCONCLUSIVE if dependent else claim.judge(delta, reference)
    if draws == 1 and verdict in (HOLDS, FAILS):
        verdict = SINGLE_DRAW
    return a, b, delta, verdict, dependent, draws


def _summary_draws(here: pd.DataFrame, a: str, b: str) -> int | None:
    """The calibration draws of an unpaired comparison: the fewer seeds of its calibrated recipes
    (all.csv's ``seeds``, "—" for none)."""
    counts = [len([seed for seed in str(here.loc[recipe, "seeds"]).split() if seed != "—"])
              for recipe in (a, b) if "seeds" in here.columns and not pd.isna(here.loc[recipe, "seeds"])]
    counts = [count for count in counts if count]
    return min(counts) if counts else None


def paired_losses(windows: pd.DataFrame, model: str, dataset: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-window losses of recipes ``a`` and ``b`` on one model and dataset, paired row by row
    (``report.uncertainty.pair_by_seed``). Both must have scored the same test windows."""
    return paired_values(windows, model, dataset, a, b)[:2]


def paired_values(windows: pd.DataFrame, model: str, dataset: str, a: str, b: str,
                  column: str = "nll") -> tuple[np.ndarray, np.ndarray, int | None]:
    """``paired_losses`` of a windows.csv ``column``, and the calibration draws the pairs rest on
    (their rows; None where neither recipe reads calibration data)."""
    first, second = (recipe_losses(windows, model, recipe, dataset, column) for recipe in (a, b))
    if first.fingerprint != second.fingerprint:
        raise PtqError(f"{a} and {b} on {dataset} ({model}) scored different test windows: they cannot be "
                       "compared window by window; evaluate both with the same protocol")
    values_a, values_b = pair_by_seed(first.seeds, first.nll, second.seeds, second.nll,
                                      f"{a} and {b} on {dataset} ({model})")
    calibrated = not (is_seedless(first.seeds) and is_seedless(second.seeds))
    return values_a, values_b, values_a.shape[0] if calibrated else None


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
    note = f"{SEED_DEPENDENT}: {', '.join(dependent)}" if dependent else ""
    draws = [count for *_, count in compared if count is not None]
    return {
        "paper": claim.paper, "claim": claim.text, "model": model, "dataset": dataset, "verdict": verdict,
        "kld_verdict": "", "draws": min(draws) if draws else None, "numbers": numbers,
        "comparisons": _comparisons(claim, compared), "kld_comparisons": "", "note": note, "missing": ", ".join(missing),
    }


def _comparisons(claim: Claim, compared: list) -> str:
    return "; ".join(f"{a} vs {b}: {_difference(claim, delta)} {verdict}" for a, b, delta, verdict, *_ in compared)


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
    if claim.in_nats:
        return f"{delta.value:+.4f} nats [{delta.low:+.4f}, {delta.high:+.4f}]"
    return f"{delta.value:+.4g} [{delta.low:+.4g}, {delta.high:+.4g}]"


def _number(value: float) -> str:
    """Four significant digits, at least two decimals (perplexities span 20 to 1e6)."""
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"


VERDICT_RULE = (
    "A comparison **holds** when its whole {level:.0%} interval is on the claimed side, **fails** when it is "
    "wholly on the other side, and is *inconclusive* otherwise, or where the calibration seeds disagree "
    "(seed-dependent). For perplexity the compared quantity is ppl_a / ppl_b − 1 (shown in %), from the "
    "paired bootstrap over the shared test windows and the calibration seeds ({samples} replicates, seed "
    "{seed}); 'within r' claims ask the ratio to lie within ±r. On the KL divergence from the float model "
    "(kld_verdict) the quantity is the paired difference of the mean token KLs in nats, with the same bounds "
    "(log(1 ± r)). A comparison of a calibrated recipe measured at one calibration seed (draws 1) is a "
    "*single draw*: never holds or fails, since its interval does not cover the calibration draw. A claim "
    "fails when any comparison fails and holds when every comparison holds."
)


def write_claims(table: pd.DataFrame, out_dir: str | os.PathLike, settings: BootstrapSettings) -> dict[str, Path]:
    """``out_dir/claims.csv`` and ``out_dir/claims.md`` (failures in bold, inconclusive in italics,
    and how a verdict is decided), written atomically."""
    out_dir = Path(out_dir)
    written = {"csv": out_dir / "claims.csv", "md": out_dir / "claims.md"}
    with atomic_path(written["csv"]) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    marks = {FAILS: "**{}**", INCONCLUSIVE: "*{}*", SINGLE_DRAW: "*{}*"}
    shown = table.assign(**{column: table[column].map(lambda v: marks.get(v, "{}").format(v) if isinstance(v, str) else "")
                            for column in ("verdict", "kld_verdict")},
                         draws=table["draws"].map(lambda d: "" if pd.isna(d) else str(int(d))))
    if not (table["kld_verdict"].fillna("") != "").any():
        shown = shown.drop(columns=["kld_verdict", "kld_comparisons"])
    rule = VERDICT_RULE.format(level=settings.level, samples=settings.samples, seed=settings.seed)
    markdown = "# Claims\n\n" + (
        shown.to_markdown(index=False) if not table.empty else "No claims in the config."
    ) + f"\n\n{rule}\n"
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(markdown)
    return written
