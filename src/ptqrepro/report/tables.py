"""Tidy results table (one row per result file and metric) and its CSV / Markdown renderings."""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ptqrepro.errors import PtqError
from ptqrepro.io import atomic_path, read_json

RECIPE_KEYS = (
    "model",
    "recipe",
    "method",
    "weight_format",
    "weight_scheme",
    "weight_bits",
    "bits_per_weight",
    "act_format",
)
"""Top-level keys that describe the quantized model a result belongs to."""

MEASUREMENT_KEYS = ("kind", "dataset")
"""Top-level keys that describe what was measured."""

PROVENANCE_KEYS = ("config_hash", "git_commit", "device", "wall_time_s", "peak_rss_mb")
"""Keys of the ``provenance`` object copied into every row."""

COLUMNS = (
    *RECIPE_KEYS,
    *MEASUREMENT_KEYS,
    "metric",
    "value",
    *PROVENANCE_KEYS,
    "source",
)
"""Columns of the tidy frame, in order."""

SORT_COLUMNS = ("model", "weight_bits", "recipe", "kind", "dataset", "metric")
SORT_ASCENDING = (True, False, True, True, True, True)

IDENTITY_COLUMNS = ("model", "recipe", "kind", "dataset", "metric")
"""A measurement is identified by these; two files giving the same one are ambiguous."""

MISSING_CELL = "—"
PERPLEXITY_KIND, PERPLEXITY_METRIC = "perplexity", "ppl"
QUANTIZE_KIND, QUANTIZE_TIME_METRIC = "quantize", "quantize_time_s"
ZEROSHOT_KIND, ZEROSHOT_METRICS = "zeroshot", ("acc", "acc_norm")


def gather_results(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Read result JSONs into a tidy frame with ``COLUMNS``, sorted by ``SORT_COLUMNS``.

    ``source`` holds each path as given. Raises ``PtqError`` for an empty list, an unreadable file,
    a missing key, a non-numeric metric, or two files reporting the same measurement.
    """
    paths = list(paths)
    if not paths:
        raise PtqError("gather_results: no result files given")
    rows = [row for path in paths for row in _rows_of_result(path)]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    _reject_duplicate_measurements(frame)
    return _sorted_tidy(frame)


def write_tables(frame: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``out_dir/all.csv`` (the tidy frame) and ``out_dir/all.md`` atomically.

    Returns ``{"csv": path, "md": path}``.
    """
    out_dir = Path(out_dir)
    written = {"csv": out_dir / "all.csv", "md": out_dir / "all.md"}
    with atomic_path(written["csv"]) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    markdown = render_markdown(frame)
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(markdown)
    return written


def render_markdown(frame: pd.DataFrame) -> str:
    """One Markdown section per model: a recipe-by-dataset perplexity table and a note."""
    sections = ["# Results\n"]
    for model, model_rows in frame.groupby("model", sort=True):
        sections.append(f"## {model}\n\n{_model_table(model_rows)}\n")
        files = model_rows["source"].nunique()
        sections.append(f"Perplexity (lower is better), zero-shot accuracy (higher is better); generated from {files} result files.\n")
    return "\n".join(sections)


def _rows_of_result(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The tidy rows (one per metric) of one result file."""
    result = _read_result(path)
    provenance = _required(result, "provenance", path)
    metrics = _required(result, "metrics", path)
    if not isinstance(provenance, dict):
        raise PtqError(f"{path}: key 'provenance' is not an object")
    if not isinstance(metrics, dict) or not metrics:
        raise PtqError(f"{path}: key 'metrics' is not a non-empty object")
    common = {key: _required(result, key, path) for key in (*RECIPE_KEYS, *MEASUREMENT_KEYS)}
    common |= {key: _required(provenance, key, path, "provenance.") for key in PROVENANCE_KEYS}
    common["source"] = str(path)
    return [
        {**common, "metric": name, "value": _metric_value(value, name, path)}
        for name, value in metrics.items()
    ]


def _read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Parse one result file, turning I/O and syntax errors into ``PtqError``."""
    try:
        result = read_json(path)
    except OSError as error:
        raise PtqError(f"{path}: cannot read result file ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise PtqError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from error
    if not isinstance(result, dict):
        raise PtqError(f"{path}: result file is not a JSON object")
    return result


def _required(mapping: dict[str, Any], key: str, path: str | os.PathLike, prefix: str = "") -> Any:
    """``mapping[key]``, or a ``PtqError`` naming the file and the (prefixed) key."""
    if key not in mapping:
        raise PtqError(f"{path}: missing required key '{prefix}{key}'")
    return mapping[key]


def _metric_value(value: Any, name: str, path: str | os.PathLike) -> float:
    """A metric as a float (``null`` becomes NaN); anything non-numeric is an error."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PtqError(f"{path}: metric 'metrics.{name}' is not a number: {value!r}")
    return float(value)


def _reject_duplicate_measurements(frame: pd.DataFrame) -> None:
    """Raise if two result files report the same (model, recipe, kind, dataset, metric)."""
    identity = list(IDENTITY_COLUMNS)
    duplicated = frame[frame.duplicated(identity, keep=False)]
    if duplicated.empty:
        return
    first = duplicated.iloc[0]
    clashing = duplicated[(duplicated[identity] == first[identity]).all(axis=1)]
    key = ", ".join(f"{column}={first[column]}" for column in identity)
    raise PtqError(f"duplicate result for {key} in: {', '.join(clashing['source'])}")


def _sorted_tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in the deterministic report order, with a fresh 0..n-1 index."""
    ordered = frame.sort_values(
        list(SORT_COLUMNS), ascending=list(SORT_ASCENDING), na_position="last", kind="mergesort"
    )
    return ordered.reset_index(drop=True)


def _model_table(model_rows: pd.DataFrame) -> str:
    """The Markdown table of one model: one row per recipe."""
    recipes = _recipe_descriptors(model_rows)
    table = pd.DataFrame(
        {
            "recipe": recipes["recipe"],
            "method": recipes["method"],
            "weight format": recipes["weight_format"].fillna("fp16"),
            "bits/weight": recipes["bits_per_weight"].map(lambda bits: _format_number(bits, 2)),
        }
    )
    perplexity = _metric_by_recipe(model_rows, PERPLEXITY_KIND, PERPLEXITY_METRIC)
    for dataset in perplexity.columns:
        table[dataset] = _column_for_recipes(perplexity[dataset], recipes["recipe"], 2)
    for metric in ZEROSHOT_METRICS:
        accuracy = _metric_by_recipe(model_rows, ZEROSHOT_KIND, metric)
        for task in accuracy.columns:
            table[f"{task} {metric}"] = _column_for_recipes(accuracy[task], recipes["recipe"], 3)
    quantize_time = _metric_by_recipe(model_rows, QUANTIZE_KIND, QUANTIZE_TIME_METRIC)
    if not quantize_time.empty:
        seconds = _single_calibration_column(quantize_time, model_rows["model"].iloc[0])
        table["quantize time (s)"] = _column_for_recipes(seconds, recipes["recipe"], 1)
    alignment = ["left"] * 3 + ["right"] * (len(table.columns) - 3)
    return table.to_markdown(index=False, disable_numparse=True, colalign=alignment)


def _recipe_descriptors(model_rows: pd.DataFrame) -> pd.DataFrame:
    """One row per recipe (method, format, bits), ordered by bits desc, bits/weight desc, name."""
    columns = ["recipe", "method", "weight_format", "weight_bits", "bits_per_weight"]
    recipes = model_rows[columns].drop_duplicates()
    inconsistent = recipes["recipe"][recipes["recipe"].duplicated()]
    if not inconsistent.empty:
        recipe = inconsistent.iloc[0]
        sources = model_rows.loc[model_rows["recipe"] == recipe, "source"].unique()
        raise PtqError(
            f"recipe '{recipe}' of model '{model_rows['model'].iloc[0]}' has inconsistent "
            f"method/format/bits across result files: {', '.join(sources)}"
        )
    ordered = recipes.sort_values(
        ["weight_bits", "bits_per_weight", "recipe"],
        ascending=[False, False, True],
        na_position="last",
        kind="mergesort",
    )
    return ordered.reset_index(drop=True)


def _metric_by_recipe(rows: pd.DataFrame, kind: str, metric: str) -> pd.DataFrame:
    """Values of one (kind, metric) as a recipe-by-dataset frame (datasets sorted)."""
    selected = rows[(rows["kind"] == kind) & (rows["metric"] == metric)]
    return selected.pivot(index="recipe", columns="dataset", values="value").sort_index(axis=1)


def _single_calibration_column(quantize_time: pd.DataFrame, model: str) -> pd.Series:
    """The quantize-time column; several calibration sets would need several columns."""
    if len(quantize_time.columns) > 1:
        datasets = ", ".join(quantize_time.columns)
        raise PtqError(f"model '{model}': quantize results for several calibration sets ({datasets})")
    return quantize_time.iloc[:, 0]


def _column_for_recipes(values: pd.Series, recipes: pd.Series, decimals: int) -> list[str]:
    """``values`` (indexed by recipe) formatted in the order of ``recipes``."""
    return [_format_number(values.get(recipe, math.nan), decimals) for recipe in recipes]


def _format_number(value: float, decimals: int) -> str:
    """``value`` with a fixed number of decimals, or the missing-cell mark."""
    if value is None or pd.isna(value):
        return MISSING_CELL
    return f"{value:.{decimals}f}"
