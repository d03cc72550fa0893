"""Perplexity-versus-bits figures from the tidy results frame.

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
from ptqrepro.io import atomic_path
from ptqrepro.report.tables import PERPLEXITY_KIND, PERPLEXITY_METRIC

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
    ppl = _perplexity_rows(frame, dataset)
    series_labels = sorted(_series_label(ppl[~_is_baseline(ppl)]).unique())
    figure = _figure_for(ppl, series_labels)
    return [_save(figure, Path(f"{out_stem}.{extension}")) for extension in ("png", "pdf")]


def use_log_scale(values: Iterable[float]) -> bool:
    """True when the positive finite ``values`` span more than ``LOG_SCALE_RATIO``."""
    usable = [value for value in values if math.isfinite(value) and value > 0]
    return bool(usable) and max(usable) / min(usable) > LOG_SCALE_RATIO


def _perplexity_rows(frame: pd.DataFrame, dataset: str | None) -> pd.DataFrame:
    """The perplexity rows to plot, or a ``PtqError`` when there are none."""
    selected = frame[(frame["kind"] == PERPLEXITY_KIND) & (frame["metric"] == PERPLEXITY_METRIC)]
    if dataset is not None:
        selected = selected[selected["dataset"] == dataset]
    if selected.empty:
        where = f" for dataset '{dataset}'" if dataset is not None else ""
        raise PtqError(f"plot_ppl_vs_bits: no '{PERPLEXITY_METRIC}' perplexity results{where}")
    return selected


def _is_baseline(rows: pd.DataFrame) -> pd.Series:
    """Which rows are the unquantized fp16 reference."""
    return rows["method"] == BASELINE_METHOD


def _series_label(rows: pd.DataFrame) -> pd.Series:
    """The legend label of each row: ``"{method} {weight_scheme}"``."""
    return rows["method"].astype(str) + " " + rows["weight_scheme"].astype(str)


def _figure_for(ppl: pd.DataFrame, series_labels: list[str]) -> Figure:
    """A figure with one panel per (model, dataset), in sorted order."""
    panels = list(ppl.groupby(["model", "dataset"], sort=True))
    columns = min(len(panels), MAX_PANEL_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    width, height = PANEL_SIZE_IN
    figure = Figure(figsize=(width * columns + LEGEND_WIDTH_IN, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, ((model, dataset), panel_rows) in zip(axes, panels):
        _draw_panel(ax, panel_rows, series_labels)
        ax.set_title(f"{model} — {dataset}")
    for unused in axes[len(panels):]:
        unused.set_visible(False)
    return figure


def _draw_panel(ax: Axes, rows: pd.DataFrame, series_labels: list[str]) -> None:
    """Quantized series as lines with markers, the fp16 baseline as a dashed horizontal line."""
    is_baseline = _is_baseline(rows)
    quantized = rows[~is_baseline]
    labels = _series_label(quantized)
    for label in sorted(labels.unique()):
        points = quantized[labels == label].sort_values(["weight_bits", "recipe"])
        style = _series_style(series_labels.index(label))
        ax.plot(points["weight_bits"], points["value"], label=label, **style)
    for position, value in enumerate(rows.loc[is_baseline, "value"]):
        label = "fp16 baseline" if position == 0 else None
        ax.axhline(value, color="black", linestyle="--", linewidth=1.2, label=label)
    tick_source = quantized if not quantized.empty else rows
    ax.set_xticks(sorted(int(bits) for bits in tick_source["weight_bits"].unique()))
    log_scale = use_log_scale(rows["value"])
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("perplexity (log scale)" if log_scale else "perplexity")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))


def _series_style(index: int) -> dict[str, object]:
    """Marker, line style and colour of the ``index``-th series (distinct in grayscale too)."""
    return {
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
        "color": f"C{index % 10}",
        "markersize": 6,
        "linewidth": 1.6,
    }


def _save(figure: Figure, path: Path) -> Path:
    """Save ``figure`` to ``path`` atomically; the format follows the extension."""
    extension = path.suffix.lstrip(".")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=extension, dpi=150, metadata=SAVE_METADATA[extension])
    return path


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
    return [_save(figure, Path(f"{out_stem}.{extension}")) for extension in ("png", "pdf")]
