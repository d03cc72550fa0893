"""Results tables: every result file's metrics as tidy rows (one per calibration seed), their
per-window losses, and one summary row per measurement with its interval.

Written by ``write_tables`` into one folder:

- ``replicates.csv``: one row per result file and metric (``COLUMNS``), the calibration seed and
  the machine (``hardware``) included: what each job measured, with its provenance.
- ``windows.csv``: each perplexity result's per-window mean NLL, and where the result has them the
  mean KL divergence from the float model and share of top-1 flips (``WINDOW_COLUMNS``,
  ``eval.divergence``), from which every interval here and in the claims is recomputed without a model.
- ``all.csv``: one row per (model, recipe, kind, dataset, metric) over the seeds
  (``SUMMARY_COLUMNS``): perplexity ``exp(mean NLL over seeds and windows)`` with its bootstrap
  interval (``report.uncertainty``), ``kld`` and ``flips`` their mean over seeds and windows with the
  same bootstrap's interval; zero-shot accuracies the mean over seeds, ± z·lm-eval's
  stderr; other metrics the mean over seeds. ``seed_low``/``seed_high`` are the smallest and
  largest per-seed values.
- zero-shot averages (``with_averages``): where the config names them (``eval.zeroshot.averages``),
  one more ``all.csv`` row per (model, recipe) that has every task of an average: the mean of the
  tasks' reported accuracies, as a zero-shot result whose dataset is the average's name.
- ``all.md``: a recipe-by-dataset table per model, ``value ±half-width``, the spread over seeds
  where a recipe has several, and how the intervals were made.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ptqrepro.errors import InputError, PtqError, first_line
from ptqrepro.runtime.io import atomic_path, read_json
from ptqrepro.report.result_format import (
    MEASUREMENT_KEYS,
    PERPLEXITY_KIND,
    PROVENANCE_KEYS,
    QUANTIZE_KIND,
    RECIPE_KEYS,
    REVISION_KEYS,
    UNCALIBRATED,
    WINDOW_KEYS,
    ZEROSHOT_KIND,
)
from ptqrepro.report.uncertainty import BootstrapSettings, Interval, exp_or_inf, mean_interval, normal_quantile

COLUMNS = (
    *RECIPE_KEYS,
    "seed",
    "calibration_dtype",
    *MEASUREMENT_KEYS,
    "metric",
    "value",
    *PROVENANCE_KEYS,
    *REVISION_KEYS,
    "hardware",
    "source",
)
"""Columns of the per-seed frame (``replicates.csv``), in order. ``seed`` and ``calibration_dtype``
say how the model was calibrated (empty for a recipe that reads no calibration data, and for
results written before they were recorded), ``hardware`` is the machine's one-line label."""

SUMMARY_COLUMNS = (
    *RECIPE_KEYS,
    *MEASUREMENT_KEYS,
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "seeds",
    "calibration_dtype",
    "seed_low",
    "seed_high",
    "windows",
    *PROVENANCE_KEYS,
    *REVISION_KEYS,
    "hardware",
    "source",
)
"""Columns of the summary (``all.csv``): one row per measurement over its seeds. ``seeds`` lists
them ("0 1 2"), ``windows`` counts a perplexity's test windows; provenance is the first seed's,
``source`` every file, space-separated; a revision column lists every revision its seeds used."""

WINDOW_COLUMNS = ("model", "recipe", "seed", "dataset", "window", "nll", "kld", "flips", "windows_sha256", "source")
"""Columns of ``windows.csv``: one row per perplexity result and test window (``kld`` and ``flips``
empty for a result without them)."""

SORT_COLUMNS = ("model", "weight_bits", "recipe", "kind", "dataset", "metric")
SORT_ASCENDING = (True, False, True, True, True, True)

IDENTITY_COLUMNS = ("model", "recipe", "seed", "kind", "dataset", "metric")
"""A measurement of one seed is identified by these; two files giving the same one are ambiguous."""

MISSING_CELL = "—"
PERPLEXITY_METRIC = "ppl"
NLL_METRIC = "nll"
KLD_METRIC, FLIPS_METRIC = "kld", "flips"
QUANTIZE_TIME_METRIC = "quantize_time_s"
ZEROSHOT_METRICS = ("acc", "acc_norm")
STDERR_SUFFIX = "_stderr"


@dataclass(frozen=True)
class Results:
    """What the result files hold: ``replicates`` (``COLUMNS``) and ``windows`` (``WINDOW_COLUMNS``)."""

    replicates: pd.DataFrame
    windows: pd.DataFrame


def gather_results(paths: Iterable[str | os.PathLike]) -> Results:
    """Read result JSONs into the per-seed frame, sorted by ``SORT_COLUMNS``, and the per-window
    losses of the perplexity results.

    ``source`` holds each path as given. Raises ``PtqError`` for an empty list, an unreadable file,
    a missing key, a non-numeric metric, two files reporting the same measurement, or a perplexity
    result without its per-window losses (written before ptqrepro kept them).
    """
    paths = list(paths)
    if not paths:
        raise PtqError("gather_results: no result files given")
    rows, windows = [], []
    for path in paths:
        result = _read_result(path)
        rows += _rows_of_result(result, path)
        windows += _windows_of_result(result, path)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    _reject_duplicate_measurements(frame)
    return Results(_sorted_tidy(frame), pd.DataFrame(windows, columns=list(WINDOW_COLUMNS)))


@dataclass(frozen=True)
class RecipeLosses:
    """One recipe's per-window values on one dataset: ``nll`` [seeds, windows] (the mean NLL, or the
    column ``recipe_losses`` was asked for), its calibration
    ``seeds`` in increasing order (``[None]`` for a recipe without calibration data), and the
    ``fingerprint`` of the windows' tokens every seed scored."""

    seeds: list
    nll: np.ndarray
    fingerprint: str


def recipe_losses(windows: pd.DataFrame, model: str, recipe: str, dataset: str, column: str = NLL_METRIC) -> RecipeLosses:
    """A recipe's ``RecipeLosses`` of ``column`` (nll, kld or flips) from a windows table; every
    seed must have scored the same windows."""
    rows = windows[(windows["model"] == model) & (windows["recipe"] == recipe) & (windows["dataset"] == dataset)]
    if rows.empty:
        raise PtqError(f"no per-window losses of {recipe} on {dataset} ({model})")
    if rows["windows_sha256"].nunique() > 1:
        raise PtqError(f"{recipe} on {dataset} ({model}): its seeds scored different test windows "
                       f"({', '.join(sorted(rows['source'].unique()))})")
    if rows[column].isna().any():
        raise PtqError(f"{recipe} on {dataset} ({model}): some of its results have no per-window {column} "
                       "(evaluated without the float reference); evaluate them again")
    by_seed = {seed: group.sort_values("window")[column].to_numpy(float)
               for seed, group in rows.groupby("seed", sort=True, dropna=False)}
    return RecipeLosses(list(by_seed), np.stack(list(by_seed.values())), rows["windows_sha256"].iloc[0])


def summarize(results: Results, settings: BootstrapSettings) -> pd.DataFrame:
    """One row per measurement over its seeds (``SUMMARY_COLUMNS``), in the per-seed frame's order."""
    frame = results.replicates
    rows = []
    keys = ["model", "recipe", "kind", "dataset", "metric"]

    @functools.cache
    def nll_interval(model: str, recipe: str, dataset: str, column: str = NLL_METRIC) -> tuple[Interval, int]:
        """The mean of a per-window column's interval over seeds and windows, and the window count:
        once for both a perplexity result's ppl and nll rows."""
        nll = recipe_losses(results.windows, model, recipe, dataset, column).nll
        return mean_interval(nll, settings), nll.shape[1]

    for key, group in frame.groupby(keys, sort=False):
        row = group.iloc[0][[*RECIPE_KEYS, *MEASUREMENT_KEYS, "metric", "calibration_dtype", *PROVENANCE_KEYS,
                             "hardware"]].to_dict()
        values = group["value"].to_numpy(float)
        row |= {key: " ".join(sorted(group[key].dropna().unique())) or None for key in REVISION_KEYS}
        row |= {"seeds": " ".join(_seed_text(seed) for seed in group["seed"]),
                "seed_low": values.min(), "seed_high": values.max(),
                "source": " ".join(group["source"]), "windows": math.nan}
        row |= _summary_value(dict(zip(keys, key)), group, values, results, settings, nll_interval)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def average_metric(metrics: Iterable[str]) -> str:
    """The metric name of an average of tasks reporting ``metrics``: the common one (``acc``,
    ``acc_norm``), else the distinct ones joined by ``+`` (``acc+acc_norm``)."""
    return "+".join(sorted(set(metrics)))


def with_averages(summary: pd.DataFrame, averages: dict[str, dict[str, str]]) -> pd.DataFrame:
    """``summary`` plus, per (model, recipe) scored on every task of an average (``{name: {task:
    metric}}``), one zero-shot row: dataset the average's name, metric ``average_metric`` of its
    tasks, value the unweighted mean of the tasks' values (as LQER's workbook and MagR's Table 4
    average their tasks); its interval half-width is sqrt(sum h_i^2) / n over the tasks' half-widths
    h_i (independent tasks; none where a task has none). Provenance is the first task's, its cost
    (wall time, memory) left empty; ``source`` lists every task's files."""
    rows = []
    zeroshot = summary[summary["kind"] == ZEROSHOT_KIND]
    for name, members in averages.items():
        for (model, recipe), group in zeroshot.groupby(["model", "recipe"], sort=False):
            chosen = [group[(group["dataset"] == task) & (group["metric"] == metric)] for task, metric in members.items()]
            if any(len(rows_of_task) != 1 for rows_of_task in chosen):
                continue
            tasks = pd.concat(chosen)
            value = float(tasks["value"].mean())
            halves = np.maximum(tasks["ci_high"] - tasks["value"], tasks["value"] - tasks["ci_low"]).to_numpy(float)
            half = math.sqrt(float((halves ** 2).sum())) / len(halves)
            row = tasks.iloc[0].to_dict() | {
                "dataset": name, "metric": average_metric(members.values()), "value": value,
                "ci_low": value - half, "ci_high": value + half, "seed_low": value, "seed_high": value,
                "wall_time_s": math.nan, "peak_rss_mb": math.nan, "source": " ".join(tasks["source"]),
            }
            rows.append(row)
    if not rows:
        return summary
    return pd.concat([summary, pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))], ignore_index=True)


def write_tables(results: Results, summary: pd.DataFrame, out_dir: str | os.PathLike,
                 settings: BootstrapSettings) -> dict[str, Path]:
    """Write ``all.csv``, ``all.md``, ``replicates.csv`` and ``windows.csv`` into ``out_dir``,
    each atomically. Returns their paths by name."""
    out_dir = Path(out_dir)
    written = {"csv": out_dir / "all.csv", "md": out_dir / "all.md", "replicates": out_dir / "replicates.csv",
               "windows": out_dir / "windows.csv"}
    for name, frame in (("csv", summary), ("replicates", results.replicates), ("windows", results.windows)):
        with atomic_path(written[name]) as tmp:
            frame.to_csv(tmp, index=False, lineterminator="\n")
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(render_markdown(summary, settings))
    return written


def render_markdown(frame: pd.DataFrame, settings: BootstrapSettings) -> str:
    """One Markdown section per model: a recipe-by-dataset table of the summary and its notes."""
    sections = ["# Results\n"]
    for model, model_rows in frame.groupby("model", sort=True):
        sections.append(f"## {model}\n\n{_model_table(model_rows)}\n")
        files = len({source for sources in model_rows["source"] for source in sources.split()})
        sections.append("Perplexity (lower is better), KL divergence from the float model in nats per token and share "
                        "of top-1 flips (lower is better; ptqrepro.eval.divergence), zero-shot accuracy (higher is "
                        "better); draws: the calibration seeds a recipe ran at (— where it reads no calibration data); "
                        f"generated from {files} result files.\n")
        sections.append(_uncertainty_note(model_rows, settings))
        sections.append(_revision_note(model_rows))
    return "\n".join(sections)


def _revision_note(model_rows: pd.DataFrame) -> str:
    """A warning where the results of one model, compared in its table, were computed from different
    hub revisions of the model, or of one dataset (an upstream change between runs); else nothing."""
    lines = []
    spans = [("model", model_rows)] + [(f"dataset {dataset}", rows) for dataset, rows in model_rows.groupby("dataset", sort=True)]
    column = {"model": "model_revision"}
    for what, rows in spans:
        key = column.get(what, "dataset_revision")
        used = {revision: sorted(set(rows.loc[rows[key].fillna("").str.contains(revision, regex=False), "recipe"]))
                for revisions in rows[key].dropna() for revision in revisions.split()}
        if len(used) > 1:
            listed = "; ".join(f"{revision[:12]} ({', '.join(recipes)})" for revision, recipes in sorted(used.items()))
            lines.append(f"**Different revisions of the {what}** in this table: {listed}. Its values are not comparable "
                         "across them: run them again on one revision (`model_revision`, `dataset_revision` in all.csv).\n")
    return "\n".join(lines)


def _summary_value(key: dict, group: pd.DataFrame, values: np.ndarray, results: Results,
                   settings: BootstrapSettings, nll_interval) -> dict:
    """``value``, ``ci_low``, ``ci_high`` (and ``windows``) of one measurement over its seeds;
    ``nll_interval(model, recipe, dataset)`` gives a perplexity's mean-NLL interval."""
    if key["kind"] == PERPLEXITY_KIND and key["metric"] in (PERPLEXITY_METRIC, *WINDOW_KEYS):
        column = NLL_METRIC if key["metric"] == PERPLEXITY_METRIC else key["metric"]
        interval, windows = nll_interval(key["model"], key["recipe"], key["dataset"], column)
        if key["metric"] == PERPLEXITY_METRIC:
            interval = interval.map(exp_or_inf)
        return {"value": interval.value, "ci_low": interval.low, "ci_high": interval.high, "windows": windows}
    value = float(values.mean())
    stderr = results.replicates[
        (results.replicates["source"].isin(group["source"])) & (results.replicates["metric"] == key["metric"] + STDERR_SUFFIX)
    ]["value"]
    if key["kind"] == ZEROSHOT_KIND and not stderr.empty and len(stderr) == len(group):
        # one seed: lm-eval's stderr; several: each seed's item noise averaged, sqrt(sum se^2) / S
        half = normal_quantile(settings.level) * math.sqrt(float((stderr.to_numpy(float) ** 2).sum())) / len(group)
        return {"value": value, "ci_low": value - half, "ci_high": value + half}
    return {"value": value, "ci_low": math.nan, "ci_high": math.nan}


def _seed_text(seed) -> str:
    return MISSING_CELL if seed is None or pd.isna(seed) else str(int(seed))


def _uncertainty_note(model_rows: pd.DataFrame, settings: BootstrapSettings) -> str:
    """How the ± were made, and on what machines."""
    windows = model_rows["windows"].dropna()
    counts = ", ".join(str(int(count)) for count in sorted(windows.unique()))
    machines = "; ".join(sorted(str(label) for label in model_rows["hardware"].dropna().unique())) or MISSING_CELL
    return (
        f"± is the larger distance from the value to its {settings.level:.0%} interval (the exact bounds are "
        f"ci_low/ci_high in all.csv): for perplexity a percentile bootstrap over the {counts or MISSING_CELL} test "
        f"windows, and over the calibration seeds where a recipe has several ({settings.samples} replicates, "
        f"seed {settings.seed}); for zero-shot accuracy ±{normal_quantile(settings.level):.2f} × lm-eval's stderr. "
        "Where a recipe ran at several calibration seeds, its value is over all of them and the seeds column "
        "gives the smallest and largest per-seed value. Comparisons between recipes are paired "
        "(claims.md): far tighter than these intervals.\n\n"
        f"Computed on: {machines}. Results in bfloat16 (`dtype: auto` on CPUs with native bf16 and on GPUs) "
        "differ between machines whose kernels round differently, and GPTQ's error feedback amplifies that "
        "at 3 bits and below; compare such numbers only within a machine.\n"
    )


def _rows_of_result(result: dict[str, Any], path: str | os.PathLike) -> list[dict[str, Any]]:
    """The tidy rows (one per metric) of one result file."""
    provenance = _required(result, "provenance", path)
    metrics = _required(result, "metrics", path)
    if not isinstance(provenance, dict):
        raise PtqError(f"{path}: key 'provenance' is not an object")
    if not isinstance(metrics, dict) or not metrics:
        raise PtqError(f"{path}: key 'metrics' is not a non-empty object")
    common = {key: _required(result, key, path) for key in (*RECIPE_KEYS, *MEASUREMENT_KEYS)}
    common |= {key: _required(provenance, key, path, "provenance.") for key in PROVENANCE_KEYS}
    common["seed"] = result.get("calibration_seed")
    common["calibration_dtype"] = result.get("calibration_dtype")
    common |= {key: provenance.get(key) for key in REVISION_KEYS}
    common["hardware"] = (provenance.get("hardware") or {}).get("label")
    common["source"] = str(path)
    return [
        {**common, "metric": name, "value": _metric_value(value, name, path)}
        for name, value in metrics.items()
    ]


def _windows_of_result(result: dict[str, Any], path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-window rows of a perplexity result (none for other kinds)."""
    if result.get("kind") != PERPLEXITY_KIND:
        return []
    losses = result.get(WINDOW_KEYS[NLL_METRIC])
    fingerprint = (result.get("protocol") or {}).get("windows_sha256")
    if not isinstance(losses, list) or not losses or fingerprint is None:
        raise PtqError(f"{path}: perplexity result without per-window losses ('window_nll' and "
                       "'protocol.windows_sha256'; written by an older ptqrepro): no interval can be computed "
                       "from it. Evaluate it again: delete the file, or `snakemake --forcerun eval_ppl`")
    if any(isinstance(loss, bool) or not isinstance(loss, numbers.Real) for loss in losses):
        raise PtqError(f"{path}: 'window_nll' holds a value that is not a number")
    columns = {NLL_METRIC: losses}
    for column, key in WINDOW_KEYS.items():
        values = result.get(key)
        if column != NLL_METRIC and values is not None:
            if (not isinstance(values, list) or len(values) != len(losses)
                    or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values)):
                raise PtqError(f"{path}: '{key}' is not one number per window of 'window_nll'")
            columns[column] = values
    common = {"model": result["model"], "recipe": result["recipe"], "seed": result.get("calibration_seed"),
              "dataset": result["dataset"], "windows_sha256": fingerprint, "source": str(path)}
    return [{**common, "window": index, **{column: float(values[index]) for column, values in columns.items()}}
            for index in range(len(losses))]


def _read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Parse one result file, turning I/O and syntax errors into ``PtqError``."""
    try:
        result = read_json(path)
    except OSError as error:
        raise InputError(f"{path}: cannot read result file ({error.strerror})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({first_line(error)})") from error
    if not isinstance(result, dict):
        raise InputError(f"{path}: result file is not a JSON object")
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
    dtypes = model_rows.dropna(subset=["calibration_dtype"]).drop_duplicates("recipe").set_index("recipe")["calibration_dtype"]
    if dtypes.nunique() > 1:  # the recipes were calibrated in different dtypes: say which
        table["calibrated in"] = [dtypes.get(recipe, MISSING_CELL) for recipe in recipes["recipe"]]
    perplexity = _metric_by_recipe(model_rows, PERPLEXITY_KIND, PERPLEXITY_METRIC)
    for dataset in perplexity.columns:
        table[dataset] = _cells_with_intervals(model_rows, PERPLEXITY_KIND, PERPLEXITY_METRIC, dataset, recipes["recipe"], 2)
        selected = _selected(model_rows, PERPLEXITY_KIND, PERPLEXITY_METRIC, dataset)
        if (selected["seeds"].str.split().str.len() > 1).any():
            table[f"{dataset} over seeds"] = [_seed_spread(selected, recipe) for recipe in recipes["recipe"]]
        for metric, label, decimals in ((KLD_METRIC, "KLD", 4), (FLIPS_METRIC, "flips", 3)):
            if not _selected(model_rows, PERPLEXITY_KIND, metric, dataset).empty:
                table[f"{dataset} {label}"] = _cells_with_intervals(model_rows, PERPLEXITY_KIND, metric, dataset,
                                                                    recipes["recipe"], decimals)
    if not perplexity.empty:
        table.insert(4, "draws", [calibration_draws(model_rows, recipe) for recipe in recipes["recipe"]])
    for metric in ZEROSHOT_METRICS:
        accuracy = _metric_by_recipe(model_rows, ZEROSHOT_KIND, metric)
        for task in accuracy.columns:
            table[f"{task} {metric}"] = _cells_with_intervals(model_rows, ZEROSHOT_KIND, metric, task, recipes["recipe"], 3)
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


def _selected(rows: pd.DataFrame, kind: str, metric: str, dataset: str) -> pd.DataFrame:
    """The summary rows of one (kind, metric, dataset), indexed by recipe."""
    chosen = (rows["kind"] == kind) & (rows["metric"] == metric) & (rows["dataset"] == dataset)
    return rows[chosen].set_index("recipe")


def _cells_with_intervals(rows: pd.DataFrame, kind: str, metric: str, dataset: str, recipes: pd.Series,
                          decimals: int) -> list[str]:
    """``value ±h`` per recipe, h the larger distance from the value to its interval's bounds."""
    selected = _selected(rows, kind, metric, dataset)
    cells = []
    for recipe in recipes:
        if recipe not in selected.index:
            cells.append(MISSING_CELL)
            continue
        row = selected.loc[recipe]
        cell = _format_number(row["value"], decimals)
        half = max(row["ci_high"] - row["value"], row["value"] - row["ci_low"])
        cells.append(cell if pd.isna(half) or cell == MISSING_CELL else f"{cell} ±{_significant(half)}")
    return cells


def _significant(half_width: float) -> str:
    """A half-width with two significant digits (at most 3 decimals)."""
    if half_width == 0:
        return "0"
    if not math.isfinite(half_width):
        return "inf"
    decimals = min(3, max(0, 1 - math.floor(math.log10(half_width))))
    return f"{half_width:.{decimals}f}"


def calibration_draws(rows: pd.DataFrame, recipe: str) -> str:
    """How many calibration draws (seeds) a recipe's perplexities rest on, as text: the
    missing-cell mark for a recipe that reads no calibration data."""
    seeds = rows.loc[(rows["recipe"] == recipe) & (rows["kind"] == PERPLEXITY_KIND), "seeds"]
    counts = {len([seed for seed in text.split() if seed != MISSING_CELL]) for text in seeds}
    return MISSING_CELL if not counts or counts == {0} else str(min(counts))


def _seed_spread(selected: pd.DataFrame, recipe: str) -> str:
    """``n: low–high`` over a recipe's calibration seeds, or the missing-cell mark for one seed."""
    if recipe not in selected.index or len(selected.loc[recipe, "seeds"].split()) < 2:
        return MISSING_CELL
    row = selected.loc[recipe]
    return f"{len(row['seeds'].split())} seeds: {_format_number(row['seed_low'], 2)}–{_format_number(row['seed_high'], 2)}"


def _metric_by_recipe(rows: pd.DataFrame, kind: str, metric: str) -> pd.DataFrame:
    """Values of one (kind, metric) as a recipe-by-dataset frame (datasets sorted)."""
    selected = rows[(rows["kind"] == kind) & (rows["metric"] == metric)]
    return selected.pivot(index="recipe", columns="dataset", values="value").sort_index(axis=1)


def _single_calibration_column(quantize_time: pd.DataFrame, model: str) -> pd.Series:
    """The quantize-time column; several calibration sets would need several columns. The recipes
    that read no calibration data (dataset ``UNCALIBRATED``) join the one set's column."""
    calibrated = [dataset for dataset in quantize_time.columns if dataset != UNCALIBRATED]
    if len(calibrated) > 1:
        datasets = ", ".join(calibrated)
        raise PtqError(f"model '{model}': quantize results for several calibration sets ({datasets})")
    return quantize_time.bfill(axis=1).iloc[:, 0]


def _column_for_recipes(values: pd.Series, recipes: pd.Series, decimals: int) -> list[str]:
    """``values`` (indexed by recipe) formatted in the order of ``recipes``."""
    return [_format_number(values.get(recipe, math.nan), decimals) for recipe in recipes]


def _format_number(value: float, decimals: int) -> str:
    """``value`` with a fixed number of decimals, or the missing-cell mark."""
    if value is None or pd.isna(value):
        return MISSING_CELL
    return f"{value:.{decimals}f}"
