"""The report's figures: perplexity and zero-shot accuracy against weight bits, LQER/L2QER
perplexity against the rank k, and wall time and peak memory per job, from the tidy results
frame; DWR's search curves and MagR's per-channel max|W| from a quantize job's result JSON.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` API and saved through the
non-interactive Agg/PDF canvases: no pyplot state, no display, nothing left open.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ptqrepro.errors import PtqError
from ptqrepro.runtime.io import atomic_path
from ptqrepro.report.result_format import PERPLEXITY_KIND, QUANTIZE_KIND, ZEROSHOT_KIND
from ptqrepro.report.tables import PERPLEXITY_METRIC

LQER_RANK_METRIC = "lqer_rank"
"""The quantize job's metric that names an LQER/L2QER recipe's rank k."""
LOW_RANK_SUFFIXES = ("+lqer", "+l2qer")

BASELINE_METHOD = "fp16"
LOG_SCALE_RATIO = 10.0
"""Use a log y axis when the largest perplexity in a panel exceeds this multiple of the smallest."""

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINE_STYLES = ("-", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
"""Series styles; plain dashes are kept for the fp16 baseline."""

PANEL_SIZE_IN = (5.0, 3.8)
LEGEND_WIDTH_IN = 3.5
"""Room for the legend, which sits to the right of each panel so that it never hides a point."""
MAX_PANEL_COLUMNS = 2
SAVE_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}
"""Drop version strings and timestamps so identical inputs give identical bytes."""


def plot_ppl_vs_bits(
    frame: pd.DataFrame, out_stem: str | os.PathLike, dataset: str | None = None
) -> list[Path]:
    """Plot perplexity against weight bits; write ``<out_stem>.png`` and ``<out_stem>.pdf``.

    One panel per (model, dataset), or per model for the given ``dataset``. Returns the two paths.
    """
    return _plot_metric_vs_bits(frame, out_stem, PERPLEXITY_KIND, PERPLEXITY_METRIC, "perplexity", dataset)


def plot_accuracy_vs_bits(frame: pd.DataFrame, out_stem: str | os.PathLike) -> list[Path]:
    """Zero-shot accuracy (lm-eval's ``acc``) against weight bits, one panel per (model, task)."""
    return _plot_metric_vs_bits(frame, out_stem, ZEROSHOT_KIND, "acc", "accuracy")


def _plot_metric_vs_bits(
    frame: pd.DataFrame, out_stem: str | os.PathLike, kind: str, metric: str, ylabel: str, dataset: str | None = None
) -> list[Path]:
    rows = _metric_rows(frame, kind, metric, dataset)
    series_labels = sorted(_series_label(rows[~_is_baseline(rows)]).unique())
    figure = _figure_for(rows, series_labels, ylabel)
    return _save(figure, out_stem)


def use_log_scale(values: Iterable[float]) -> bool:
    """True when the positive finite ``values`` span more than ``LOG_SCALE_RATIO``."""
    usable = [value for value in values if math.isfinite(value) and value > 0]
    return bool(usable) and max(usable) / min(usable) > LOG_SCALE_RATIO


def _metric_rows(frame: pd.DataFrame, kind: str, metric: str, dataset: str | None = None) -> pd.DataFrame:
    """The rows of ``kind`` and ``metric`` (of ``dataset``, if given), or a ``PtqError`` when there are none."""
    selected = frame[(frame["kind"] == kind) & (frame["metric"] == metric)]
    if dataset is not None:
        selected = selected[selected["dataset"] == dataset]
    if selected.empty:
        where = f" for dataset '{dataset}'" if dataset is not None else ""
        raise PtqError(f"plots: no '{metric}' {kind} results{where}")
    return selected


def _is_baseline(rows: pd.DataFrame) -> pd.Series:
    """Which rows are the unquantized fp16 reference."""
    return rows["method"] == BASELINE_METHOD


def _series_label(rows: pd.DataFrame) -> pd.Series:
    """The legend label of each row: ``"{method} {weight_scheme}"``."""
    return rows["method"].astype(str) + " " + rows["weight_scheme"].astype(str)


def _panel_axes(count: int, panel_size: tuple[float, float] = PANEL_SIZE_IN) -> tuple[Figure, list[Axes]]:
    """A figure with room for ``count`` panels (at most ``MAX_PANEL_COLUMNS`` per row) and a
    legend right of each; the unused axes are hidden."""
    columns = min(count, MAX_PANEL_COLUMNS)
    rows = math.ceil(count / columns)
    width, height = panel_size
    figure = Figure(figsize=(width * columns + LEGEND_WIDTH_IN, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, list(axes[:count])


def _figure_for(rows: pd.DataFrame, series_labels: list[str], ylabel: str) -> Figure:
    """A figure with one panel per (model, dataset), in sorted order."""
    panels = list(rows.groupby(["model", "dataset"], sort=True))
    figure, axes = _panel_axes(len(panels))
    for ax, ((model, dataset), panel_rows) in zip(axes, panels):
        _draw_panel(ax, panel_rows, series_labels, ylabel)
        ax.set_title(f"{model} — {dataset}")
    return figure


def _draw_panel(ax: Axes, rows: pd.DataFrame, series_labels: list[str], ylabel: str) -> None:
    """Quantized series as lines with markers and their intervals as error bars (where the table
    has ``ci_low``/``ci_high``), the fp16 baseline as a dashed horizontal line."""
    is_baseline = _is_baseline(rows)
    quantized = rows[~is_baseline]
    labels = _series_label(quantized)
    for label in sorted(labels.unique()):
        points = quantized[labels == label].sort_values(["weight_bits", "recipe"])
        style = _series_style(series_labels.index(label))
        ax.plot(points["weight_bits"], points["value"], label=label, **style)
        if {"ci_low", "ci_high"} <= set(points.columns) and points["ci_low"].notna().any():
            below = (points["value"] - points["ci_low"]).clip(lower=0).fillna(0)
            above = (points["ci_high"] - points["value"]).clip(lower=0).fillna(0)
            ax.errorbar(points["weight_bits"], points["value"], yerr=[below, above], fmt="none",
                        ecolor=style.get("color", "black"), elinewidth=0.8, capsize=2)
    for position, value in enumerate(rows.loc[is_baseline, "value"]):
        label = "fp16 baseline" if position == 0 else None
        ax.axhline(value, color="black", linestyle="--", linewidth=1.2, label=label)
    tick_source = quantized if not quantized.empty else rows
    ax.set_xticks(sorted(int(bits) for bits in tick_source["weight_bits"].unique()))
    _finish_panel(ax, rows["value"], "weight bits", ylabel)


def _finish_panel(ax: Axes, values: Iterable[float], xlabel: str, ylabel: str) -> None:
    """Axis labels, a log y axis where ``values`` span a wide range (``use_log_scale``), a grid,
    and the legend right of the panel."""
    log_scale = use_log_scale(values)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} (log scale)" if log_scale else ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))


def lqer_rank_curves(frame: pd.DataFrame) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """Perplexity against the rank k: ``{(model, dataset): {"<method> <scheme>": {k: ppl}}}`` for
    every LQER/L2QER recipe (the quantize job's ``lqer_rank``); k = 0 is the recipe's base
    quantizer alone on the same scheme (for ``rtn+l2qer`` on MXINT4 W4A8, ``rtn`` on MXINT4 W4A8),
    where that recipe was run."""
    ppl = _metric_rows(frame, PERPLEXITY_KIND, PERPLEXITY_METRIC)
    ranks = _metric_rows(frame, QUANTIZE_KIND, LQER_RANK_METRIC)[["model", "recipe", "value"]]
    low_rank = ppl.merge(ranks.rename(columns={"value": "rank"}), on=["model", "recipe"])
    curves: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for (model, dataset), rows in low_rank.groupby(["model", "dataset"], sort=True):
        panel = curves.setdefault((model, dataset), {})
        for label, series in rows.groupby(_series_label(rows), sort=True):
            points = {int(k): float(v) for k, v in zip(series["rank"], series["value"])}
            base = ppl[(ppl["model"] == model) & (ppl["dataset"] == dataset)
                       & (ppl["method"] == _base_method(series["method"].iloc[0]))
                       & (ppl["weight_scheme"] == series["weight_scheme"].iloc[0])]
            if not base.empty:
                points[0] = float(base["value"].iloc[0])
            panel[label] = dict(sorted(points.items()))
    return curves


def plot_lqer_ranks(frame: pd.DataFrame, out_stem: str | os.PathLike) -> list[Path]:
    """``lqer_rank_curves`` drawn, one panel per (model, dataset), one line per method and weight
    scheme; ranks are spaced evenly (k = 8 and 256 are both common)."""
    curves = lqer_rank_curves(frame)
    series_labels = sorted({label for panel in curves.values() for label in panel})
    figure, axes = _panel_axes(len(curves))
    for ax, ((model, dataset), panel) in zip(axes, curves.items()):
        positions = {k: i for i, k in enumerate(sorted({k for points in panel.values() for k in points}))}
        for label, points in panel.items():
            ax.plot([positions[k] for k in points], list(points.values()), label=label,
                    **_series_style(series_labels.index(label)))
        ax.set_xticks(range(len(positions)), [str(k) for k in positions])
        ax.set_title(f"{model} — {dataset}")
        _finish_panel(ax, [value for points in panel.values() for value in points.values()],
                      "rank k (0: the base quantizer alone)", "perplexity")
    return _save(figure, out_stem)


def _base_method(method: str) -> str:
    """``rtn+l2qer`` -> ``rtn``: the method without its low-rank refinement."""
    for suffix in LOW_RANK_SUFFIXES:
        if method.endswith(suffix):
            return method[: -len(suffix)]
    return method


def job_costs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per result file (the job that wrote it) of the per-seed table (replicates.csv):
    ``job`` (model, recipe, calibration seed, kind and, for an evaluation, its dataset or task), ``kind``, ``wall_time_s``, ``peak_rss_mb``; longest first."""
    jobs = frame.drop_duplicates("source").copy()
    if jobs.empty:
        raise PtqError("plots: no results to show the jobs of")
    evaluated = jobs["dataset"].where(jobs["kind"] != QUANTIZE_KIND)
    seeds = jobs["seed"] if "seed" in jobs else pd.Series(None, index=jobs.index)
    jobs["job"] = (jobs["model"] + " " + jobs["recipe"]
                   + seeds.map(lambda seed: f" s{int(seed)}" if pd.notna(seed) else "") + " · " + jobs["kind"]
                   + evaluated.map(lambda name: f" · {name}" if isinstance(name, str) else ""))
    columns = ["job", "kind", "wall_time_s", "peak_rss_mb"]
    return jobs.sort_values(["wall_time_s", "job"], ascending=[False, True])[columns].reset_index(drop=True)


def plot_job_costs(frame: pd.DataFrame, out_stem: str | os.PathLike) -> list[Path]:
    """``job_costs`` as two bar charts, wall time and peak resident memory, the kind of job by shade."""
    jobs = job_costs(frame).iloc[::-1]  # barh draws bottom-up: longest on top
    kinds = sorted(jobs["kind"].unique())
    shades = {kind: str(0.15 + 0.6 * index / max(1, len(kinds) - 1)) for index, kind in enumerate(kinds)}
    figure = Figure(figsize=(11.0, max(3.0, 0.16 * len(jobs) + 1.0)), layout="constrained")
    time_ax, memory_ax = figure.subplots(1, 2, sharey=True)
    colours = [shades[kind] for kind in jobs["kind"]]
    time_ax.barh(jobs["job"], jobs["wall_time_s"], color=colours)
    memory_ax.barh(jobs["job"], jobs["peak_rss_mb"], color=colours)
    time_ax.set_xlabel("wall time (s)")
    memory_ax.set_xlabel("peak resident memory (MiB)")
    time_ax.tick_params(axis="y", labelsize=6)
    for kind in kinds:
        memory_ax.barh([], [], color=shades[kind], label=kind)
    memory_ax.legend(fontsize="small", loc="lower right")
    time_ax.set_title(f"{len(jobs)} jobs, {jobs['wall_time_s'].sum() / 60:.1f} min of wall time in all", fontsize=9)
    return _save(figure, out_stem)


def plot_magr_row_maxima(result: dict, out_stem: str | os.PathLike) -> list[Path]:
    """MagR's effect on per-output-channel max|W| (a quantize job's result JSON with ``magr``
    records): left, the quantiles over channels before (solid) and after (dashed) for the first,
    middle and last layer's linear with the largest weight; right, per layer, the median channel's
    max|W| after MagR relative to before, one line per linear."""
    records = [record for record in result.get("layers", []) if "magr_row_max_quantiles_before" in record]
    if not records:
        raise PtqError(f"recipe {result.get('recipe')!r}: the result has no MagR records")
    layers = sorted({record["layer"] for record in records})
    linears = sorted({record["linear"] for record in records})
    figure = Figure(figsize=(2 * PANEL_SIZE_IN[0] + LEGEND_WIDTH_IN, PANEL_SIZE_IN[1]), layout="constrained")
    quantile_ax, ratio_ax = figure.subplots(1, 2)
    shown = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    for index, layer in enumerate(shown):
        record = max((r for r in records if r["layer"] == layer), key=lambda r: r["magr_max_abs_before"])
        before, after = record["magr_row_max_quantiles_before"], record["magr_row_max_quantiles_after"]
        levels = [100 * i / (len(before) - 1) for i in range(len(before))]
        style = _series_style(index)
        quantile_ax.plot(levels, before, label=f"layer {layer} {record['linear']} before", **style)
        quantile_ax.plot(levels, after, label="after", **{**style, "linestyle": "--", "marker": None})
    quantile_ax.set_yscale("log")
    quantile_ax.set_xlabel("output channels, percentile by max|W|")
    quantile_ax.set_ylabel("max|W| of the channel (log scale)")
    quantile_ax.legend(fontsize="x-small")
    for index, linear in enumerate(linears):
        points = sorted((r["layer"], _median_ratio(r)) for r in records if r["linear"] == linear)
        ratio_ax.plot([p[0] for p in points], [p[1] for p in points], label=linear, **_series_style(index))
    ratio_ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ratio_ax.set_xlabel("decoder layer")
    ratio_ax.set_ylabel("median channel max|W|, after / before")
    ratio_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle(f"{result['model']}: {result['recipe']}", fontsize=10)
    for ax in (quantile_ax, ratio_ax):
        ax.grid(True, which="major", alpha=0.3)
    return _save(figure, out_stem)


def _median_ratio(record: dict) -> float:
    before, after = record["magr_row_max_quantiles_before"], record["magr_row_max_quantiles_after"]
    middle = len(before) // 2
    return after[middle] / before[middle]


def _series_style(index: int) -> dict[str, object]:
    """Marker, line style and colour of the ``index``-th series (distinct in grayscale too)."""
    return {
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
        "color": f"C{index % 10}",
        "markersize": 6,
        "linewidth": 1.6,
    }


def _save(figure: Figure, out_stem: str | os.PathLike) -> list[Path]:
    """Save ``figure`` as ``<out_stem>.png`` and ``<out_stem>.pdf``, each atomically; return both paths."""
    paths = []
    for extension in ("png", "pdf"):
        path = Path(f"{out_stem}.{extension}")
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=extension, dpi=150, metadata=SAVE_METADATA[extension])
        paths.append(path)
    return paths


def plot_dwr_curves(result: dict, out_stem: str | os.PathLike) -> list[Path]:
    """DWR's search (a ``dwr`` job's result JSON): left, every block's curve k -> calibration
    perplexity relative to keeping the block as it is (k = 0), the chosen k marked; right, the
    chosen k per block. Writes ``<out_stem>.png`` and ``<out_stem>.pdf``."""
    blocks = result.get("dwr")
    if not blocks:
        raise PtqError(f"recipe {result.get('recipe')!r}: the result has no DWR search (key 'dwr')")
    ranks = sorted({int(k) for block in blocks for k in block["curve"]})
    position = {rank: index for index, rank in enumerate(ranks)}
    figure = Figure(figsize=(2 * PANEL_SIZE_IN[0], PANEL_SIZE_IN[1]), layout="constrained")
    curves, chosen = figure.subplots(1, 2)
    for block in blocks:
        curve = {int(k): v for k, v in block["curve"].items()}
        xs = [position[k] for k in sorted(curve)]
        ys = [curve[k] / curve[0] for k in sorted(curve)]
        curves.plot(xs, ys, color="0.6", linewidth=0.8, marker=".", markersize=3)
        if block["chosen_rank"]:
            k = block["chosen_rank"]
            curves.plot([position[k]], [curve[k] / curve[0]], "k^", markersize=6)
    curves.axhline(1.0, color="k", linestyle="--", linewidth=1)
    curves.set_xticks(range(len(ranks)), [str(k) for k in ranks])
    curves.set_xlabel("rank k of the reconstruction")
    curves.set_ylabel("calibration ppl / ppl at k = 0")
    curves.set_title(f"{result['model']}: {result['recipe']}, one line per block (▲ chosen)", fontsize=9)
    layers = [block["layer"] for block in blocks]
    chosen.bar(layers, [block["chosen_rank"] for block in blocks], color="0.3")
    chosen.set_xlabel("decoder block")
    chosen.set_ylabel("chosen k (0: unchanged)")
    metrics = result.get("metrics", {})
    if "calibration_ppl_before" in metrics:
        chosen.set_title(f"calibration ppl {metrics['calibration_ppl_before']:.2f} → "
                         f"{metrics['calibration_ppl_after']:.2f}", fontsize=9)
    return _save(figure, out_stem)
