"""The papers' qualitative claims as data, checked against the tidy results frame.

A claim names recipes of the config and a relation between their values of one metric
(perplexity by default, lower is better), for example MagR's "MagR+GPTQ below GPTQ at W2 per
channel" or the MX-PTQ paper's "SQ+AWQ+GPTQ at or below each single method". It is checked on
every (model, dataset) of the results: ``holds`` or ``fails`` with the numbers, or ``not run``
naming the recipes without a result there. Three relations, written in a config's ``claims:``:

    below: [a, b, c]                           v(a) < v(b) < v(c)
    at_or_below: {recipe: a, than: [b, c]}     v(a) <= v(b) and v(a) <= v(c)
    within: {recipe: a, of: b, relative: r}    |v(a) - v(b)| <= r · v(b)

each with ``paper`` and ``claim`` (its words), and optionally ``metric: {kind, name, higher_is_better}``
for a metric other than perplexity (``below`` then reads "worse than").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ptqrepro.errors import PtqError
from ptqrepro.io import atomic_path
from ptqrepro.report.tables import PERPLEXITY_KIND, PERPLEXITY_METRIC

RELATIONS = ("below", "at_or_below", "within")
HOLDS, FAILS, NOT_RUN = "holds", "fails", "not run"
CLAIM_COLUMNS = ("paper", "claim", "model", "dataset", "verdict", "numbers", "missing")


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

    def verdict(self, values: dict[str, float]) -> bool:
        """Whether the relation holds for ``values`` (recipe -> metric value, all recipes present).
        With ``higher_is_better`` the values are negated, so "below" means "worse"."""
        sign = -1.0 if self.higher_is_better else 1.0
        v = [sign * values[recipe] for recipe in self.recipes]
        if self.relation == "below":
            return all(a < b for a, b in zip(v, v[1:]))
        if self.relation == "at_or_below":
            return all(v[0] <= other for other in v[1:])
        return abs(v[0] - v[1]) <= self.relative * abs(v[1])


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


def check_claims(claims: list[Claim], frame: pd.DataFrame) -> pd.DataFrame:
    """One row per claim and (model, dataset) of the claim's metric in ``frame`` (the tidy table):
    ``verdict`` holds / fails / not run, ``numbers`` the values in the claim's order, ``missing``
    the recipes without a result. A claim whose metric no result has gets one ``not run`` row."""
    rows = []
    for claim in claims:
        selected = frame[(frame["kind"] == claim.kind) & (frame["metric"] == claim.metric)]
        places = selected[["model", "dataset"]].drop_duplicates().sort_values(["model", "dataset"])
        if places.empty:
            rows.append(_row(claim, "—", "—", NOT_RUN, {}, list(claim.recipes)))
            continue
        for model, dataset in places.itertuples(index=False):
            here = selected[(selected["model"] == model) & (selected["dataset"] == dataset)]
            values = dict(zip(here["recipe"], here["value"]))
            missing = [recipe for recipe in claim.recipes if recipe not in values or pd.isna(values[recipe])]
            verdict = NOT_RUN if missing else (HOLDS if claim.verdict(values) else FAILS)
            rows.append(_row(claim, model, dataset, verdict, values, missing))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def _row(claim: Claim, model: str, dataset: str, verdict: str, values: dict, missing: list[str]) -> dict:
    numbers = ", ".join(f"{recipe} {_number(values[recipe])}" for recipe in claim.recipes if recipe in values)
    return {
        "paper": claim.paper, "claim": claim.text, "model": model, "dataset": dataset, "verdict": verdict,
        "numbers": numbers, "missing": ", ".join(missing),
    }


def _number(value: float) -> str:
    """Four significant digits, at least two decimals (perplexities span 20 to 1e6)."""
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"


def write_claims(table: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``out_dir/claims.csv`` and ``out_dir/claims.md`` (failures in bold), written atomically."""
    out_dir = Path(out_dir)
    written = {"csv": out_dir / "claims.csv", "md": out_dir / "claims.md"}
    with atomic_path(written["csv"]) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    shown = table.assign(verdict=table["verdict"].map(lambda v: f"**{v}**" if v == FAILS else v))
    markdown = "# Claims\n\n" + (
        shown.to_markdown(index=False) if not table.empty else "No claims in the config."
    ) + "\n"
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(markdown)
    return written
