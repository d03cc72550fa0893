"""Each paper's tables laid out as the paper prints them, our value beside the paper's.

The papers' numbers come from ``config/reference/*.csv`` (one row per number, with the recipe of
the paper config that reproduces it); ours from the tidy results table. A cell reads
``paper / ours (ours − paper)``, or ``paper / —`` where we did not run it. Rows are the paper's
(setting, method) pairs, columns its (dataset, model) pairs.

On a run that shares no model with a paper (the embedded default), the paper's section shows ours
alone instead: our results for the paper's methods, rows (weight and activation format, method),
columns (dataset, model).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from ptqrepro.errors import InputError, PtqError, first_line
from ptqrepro.runtime.io import atomic_path
from ptqrepro.report.result_format import PERPLEXITY_KIND, ZEROSHOT_KIND
from ptqrepro.report.tables import PERPLEXITY_METRIC

REFERENCE_COLUMNS = ("paper", "table", "model", "method", "setting", "dataset", "metric", "value", "recipe", "source")
MISSING = "—"
PERCENT_SUFFIX = "_pct"


def our_metric(reference_metric: str) -> tuple[str | None, str | None, float]:
    """The (kind, metric, scale) of a reference metric in the results table: ``ppl`` is our
    perplexity; ``<m>_pct`` our zero-shot metric ``m`` in percent (``acc_pct``: lm-eval's ``acc``,
    ``acc_norm_pct``: its ``acc_norm``; on an average's dataset, the average ``tables.with_averages``
    made of the tasks' reported accuracies); anything else has no counterpart."""
    if reference_metric == "ppl":
        return PERPLEXITY_KIND, PERPLEXITY_METRIC, 1.0
    if reference_metric.endswith(PERCENT_SUFFIX):
        return ZEROSHOT_KIND, reference_metric[: -len(PERCENT_SUFFIX)], 100.0
    return None, None, 1.0


def load_reference(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """The reference CSVs in one frame (``value`` float, ``recipe`` '' where none)."""
    frames = []
    for path in paths:
        try:
            frame = pd.read_csv(path, keep_default_na=False, dtype=str)
        except OSError as error:
            raise InputError(f"{path}: cannot read reference table ({error.strerror})") from error
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not a reference table ({first_line(error)})") from None
        if list(frame.columns) != list(REFERENCE_COLUMNS):
            raise InputError(f"{path}: reference columns must be {', '.join(REFERENCE_COLUMNS)}, got {', '.join(frame.columns)}")
        frames.append(frame)
    if not frames:
        raise PtqError("load_reference: no reference files given")
    reference = pd.concat(frames, ignore_index=True)
    try:
        reference["value"] = pd.to_numeric(reference["value"].replace("NaN", math.nan), errors="raise")
    except ValueError as error:
        raise InputError(f"a reference table's value is not a number ({first_line(error)})") from None
    return reference


def with_ours(reference: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """``reference`` plus ``ours`` (our value of the same model, recipe, dataset and metric, NaN
    where not run) and ``difference`` (ours − paper)."""
    ours = []
    for row in reference.itertuples(index=False):
        kind, metric, scale = our_metric(row.metric)
        match = results[
            (results["model"] == row.model) & (results["recipe"] == row.recipe) & (results["dataset"] == row.dataset)
            & (results["kind"] == kind) & (results["metric"] == metric)
        ] if row.recipe else results.iloc[0:0]
        ours.append(float(match["value"].iloc[0]) * scale if len(match) else math.nan)
    compared = reference.assign(ours=ours)
    return compared.assign(difference=compared["ours"] - compared["value"])


def paper_sections(compared: pd.DataFrame, results: pd.DataFrame) -> dict[str, dict[str, pd.DataFrame]]:
    """``{paper: {title: table}}``: the paper's tables with ours beside them, or, when the run has
    none of the paper's models, one table of ours alone for the paper's methods."""
    sections = {}
    for paper, rows in compared.groupby("paper", sort=False):
        shared = set(rows["model"]) & set(results["model"])
        if shared:
            sections[paper] = {title: _side_by_side(table) for title, table in rows.groupby("table", sort=False)}
        else:
            sections[paper] = {f"ours alone (no model of the paper was run; its methods: "
                               f"{', '.join(sorted(set(rows['method'])))})": _ours_alone(set(rows["method"]), results)}
    return sections


def _side_by_side(rows: pd.DataFrame) -> pd.DataFrame:
    cells = rows.assign(cell=[_cell(paper, ours, diff) for paper, ours, diff in zip(rows["value"], rows["ours"], rows["difference"])])
    table = cells.pivot_table(index=["setting", "method"], columns=["dataset", "model"], values="cell", aggfunc="first", sort=False)
    return table.fillna("")


def _ours_alone(methods: set[str], results: pd.DataFrame) -> pd.DataFrame:
    """Our perplexities of the recipes made only of steps the paper's methods use (``rtn+lqer``
    belongs to LQER's table, whose methods include ``rtn`` and ``lqer``)."""
    steps = {step for method in methods | {"fp16"} for step in method.split("+")}
    chosen = results[(results["kind"] == PERPLEXITY_KIND) & (results["metric"] == PERPLEXITY_METRIC)
                     & results["method"].map(lambda method: set(method.split("+")) <= steps)]
    if chosen.empty:
        return pd.DataFrame()
    setting = chosen["weight_format"].fillna("fp16") + chosen["act_format"].map(lambda a: f" a={a}" if isinstance(a, str) else "")
    chosen = chosen.assign(setting=setting, cell=chosen["value"].map(_number))
    return chosen.pivot_table(index=["setting", "method"], columns=["dataset", "model"], values="cell", aggfunc="first").fillna("")


def _cell(paper: float, ours: float, difference: float) -> str:
    if math.isnan(ours):
        return f"{_number(paper)} / {MISSING}"
    return f"{_number(paper)} / {_number(ours)} ({difference:+.2f})"


def _number(value: float) -> str:
    if value is None or math.isnan(value):
        return "NaN"
    return f"{value:.3g}" if abs(value) >= 1000 else f"{value:.2f}"


def write_paper_tables(sections: dict[str, dict[str, pd.DataFrame]], out_dir: str | os.PathLike) -> list[Path]:
    """``out_dir/<paper>.md`` and ``out_dir/<paper>.tex`` per paper, written atomically."""
    out_dir = Path(out_dir)
    written = []
    for paper, tables in sections.items():
        stem = paper.lower().replace(" ", "-")
        markdown = [f"# {paper}: paper / ours (ours − paper)\n"]
        latex = [f"% {paper}: paper / ours (ours - paper); generated by ptqrepro"]
        for title, table in tables.items():
            markdown.append(f"## {title}\n\n{_markdown(table)}\n")
            latex.append(_latex(title, table))
        for suffix, text in (("md", "\n".join(markdown)), ("tex", "\n\n".join(latex) + "\n")):
            path = out_dir / f"{stem}.{suffix}"
            with atomic_path(path) as tmp:
                tmp.write_text(text)
            written.append(path)
    return written


def _flat(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["setting", "method"] + [" ".join(str(part) for part in column) for column in table.columns]
    body = [[str(index[0]), str(index[1]), *row] for index, row in zip(table.index, table.values.tolist())]
    return header, body


def _markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "No result of these methods in this run."
    header, body = _flat(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _latex(title: str, table: pd.DataFrame) -> str:
    if table.empty:
        return f"% {title}: no result of these methods in this run."
    header, body = _flat(table)
    escape = lambda text: text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_").replace("#", r"\#").replace("—", "--").replace("−", "-").replace("†", r"$\dagger$")
    lines = [f"% {escape(title)}", r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(escape(cell) for cell in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)
