"""The peers table: each recipe of ours beside the same recipe run by a peer toolkit
(``ptqrepro.peers``), on the same model, calibration token ids and evaluation.

Per (model, mirrored recipe, dataset), one row for ptqrepro and one per peer recipe:

* ``ppl`` with its bootstrap interval over test windows and calibration seeds (``report.tables``);
* for a peer, ``change`` = ppl_peer / ppl_ours - 1 with the paired interval over the shared
  windows and seeds (``report.uncertainty.paired_difference``): a change whose interval excludes
  0 is more than the test windows' noise;
* the quantize job's wall time and peak resident memory (mean over seeds; the job loads the
  model, calibrates and writes the artifact: the same work for both);
* for a peer, how its grids agree with ours (``grid_agreement``, mean over seeds): the share of
  weights on the same grid point (same code and same group parameters), in all and in the first
  and last decoder layer, the share with the same code, and ``||Ŵ_peer - Ŵ_ours|| / ||Ŵ_ours||``
  over all quantized linears;
* what the peer does differently (``PeerPlan.differences``, and the dtype of its calibration
  forward passes where it is not ours: llm-compressor calibrates in float32).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd
import torch

from ptqrepro.export.artifact import Artifact
from ptqrepro.errors import PtqError
from ptqrepro.runtime.io import atomic_path
from ptqrepro.report.claims import paired_losses
from ptqrepro.report.result_format import PERPLEXITY_KIND
from ptqrepro.report.tables import PERPLEXITY_METRIC, Results, summarize
from ptqrepro.report.uncertainty import BootstrapSettings, paired_difference

PEER_COLUMNS = ("model", "recipe", "method", "weight_scheme", "implementation", "calibration_dtype", "dataset", "ppl",
                "ci_low", "ci_high",
                "change", "change_low", "change_high", "quantize_time_s", "peak_rss_mb", "same_grid_point",
                "same_grid_point_first_layer", "same_grid_point_last_layer", "same_code", "weight_rel_diff", "seeds", "windows", "differences")

OURS = "ptqrepro"

AGREEMENT_COLUMNS = ("model", "recipe", "seed", "same_grid_point", "same_grid_point_first_layer",
                     "same_grid_point_last_layer", "same_code", "weight_rel_diff")
"""What the peers table reads of each agreement result (``grid_agreement``), per seed."""

DECODER_LAYER = re.compile(r"^(.*\.\d+)\.")
"""A linear's decoder layer: its name up to the last ``.<index>.``."""

RELATIVE_TOLERANCE = 1e-6
"""Group parameters (float32) closer than this, relatively, count as the same."""


def grid_agreement(ours: Artifact, peer: Artifact) -> dict:
    """How two artifacts' quantized linears agree, over every linear both hold: ``same_grid_point``,
    the share of weights with the same code whose group's parameters agree (``RELATIVE_TOLERANCE``);
    ``same_code``, the share with the same code; ``weight_rel_diff``, ``||Ŵ_peer - Ŵ_ours||_F /
    ||Ŵ_ours||_F`` of the dequantized weights; ``same_grid_point_by_layer``, the first share per
    decoder layer (the linears named ``<layers>.<index>.<linear>``), in order: where both
    calibrate each layer on the outputs of the quantized ones before it, the first layer sees
    identical inputs and later layers inputs that differ by float rounding, which GPTQ amplifies."""
    names = [name for name in ours.quantized if name in peer.quantized]
    if not names:
        raise PtqError("grid agreement: the two artifacts share no quantized linear")
    weights = same_point = same_code = 0
    difference = norm = 0.0
    by_layer: dict[str, list[int]] = {}
    for name in names:
        a, b = ours.quantized[name], peer.quantized[name]
        if a.codes.shape != b.codes.shape or a.groups != b.groups:
            raise PtqError(f"grid agreement: {name} has shape {tuple(a.codes.shape)} with {a.groups} groups in one "
                           f"artifact and {tuple(b.codes.shape)} with {b.groups} in the other")
        codes_equal = a.codes == b.codes
        params_equal = torch.ones_like(a.params[next(iter(a.params))], dtype=torch.bool)
        for key in a.params:
            params_equal &= torch.isclose(a.params[key], b.params[key], rtol=RELATIVE_TOLERANCE, atol=0)
        per_weight = params_equal.repeat_interleave(a.codes.shape[1] // a.groups, dim=1)
        on_point = int((codes_equal & per_weight).sum())
        weights += a.codes.numel()
        same_code += int(codes_equal.sum())
        same_point += on_point
        layer = by_layer.setdefault(_decoder_layer(name), [0, 0])
        layer[0] += on_point
        layer[1] += a.codes.numel()
        dequantized = a.dequantize()
        difference += float((b.dequantize() - dequantized).square().sum())
        norm += float(dequantized.square().sum())
    return {"linears": len(names), "weights": weights, "same_grid_point": same_point / weights,
            "same_code": same_code / weights, "weight_rel_diff": math.sqrt(difference / norm),
            "same_grid_point_by_layer": [same / count for same, count in by_layer.values()]}


def _decoder_layer(linear: str) -> str:
    """The decoder layer a linear's name belongs to (``DECODER_LAYER``), or the name itself."""
    match = DECODER_LAYER.match(linear)
    return match.group(1) if match else linear


def peers_table(results: Results, quantize_results: list[dict], agreements: list[dict],
                settings: BootstrapSettings) -> pd.DataFrame:
    """The peers table (``PEER_COLUMNS``) from the gathered perplexity results of the peer recipes
    and the recipes they mirror, the quantize jobs' result JSONs and the agreement JSONs."""
    summary = summarize(results, settings)
    ppl = summary[(summary["kind"] == PERPLEXITY_KIND) & (summary["metric"] == PERPLEXITY_METRIC)]
    jobs = pd.DataFrame([_job_row(result) for result in quantize_results])
    agreement = pd.DataFrame([
        {**{key: entry.get(key) for key in ("model", "recipe", "seed", "same_grid_point", "same_code", "weight_rel_diff")},
         "same_grid_point_first_layer": (entry.get("same_grid_point_by_layer") or [math.nan])[0],
         "same_grid_point_last_layer": (entry.get("same_grid_point_by_layer") or [math.nan])[-1]}
        for entry in agreements], columns=list(AGREEMENT_COLUMNS))
    peers = jobs[jobs["mirrors"].notna()][["model", "recipe", "mirrors"]].drop_duplicates()
    rows = []
    for (model, mirrored), group in peers.groupby(["model", "mirrors"], sort=False):
        for dataset in sorted(ppl[(ppl["model"] == model) & (ppl["recipe"] == mirrored)]["dataset"].unique()):
            ours = _row(ppl, jobs, model, mirrored, dataset)
            rows.append(ours)
            for recipe in group["recipe"]:
                row = _row(ppl, jobs, model, recipe, dataset)
                if row["calibration_dtype"] != ours["calibration_dtype"]:
                    row["differences"] = "; ".join(filter(None, [
                        f"calibration forward passes in {row['calibration_dtype']} (ours: {ours['calibration_dtype']})",
                        row["differences"]]))
                row |= _change(results, model, recipe, mirrored, dataset, settings)
                row |= agreement[(agreement["model"] == model) & (agreement["recipe"] == recipe)][
                    list(AGREEMENT_COLUMNS[3:])].mean().to_dict()
                rows.append(row)
    return pd.DataFrame(rows, columns=list(PEER_COLUMNS))


def _job_row(result: dict) -> dict:
    provenance = result.get("provenance") or {}
    toolkit = result.get("toolkit")
    return {"model": result["model"], "recipe": result["recipe"], "method": result["method"],
            "weight_scheme": result["weight_scheme"], "mirrors": result.get("mirrors"),
            "implementation": f"{toolkit} {result.get('toolkit_version')}" if toolkit else
            f"{OURS} {(provenance.get('packages') or {}).get('ptqrepro')}",
            "calibration_dtype": result.get("calibration_dtype"),
            "quantize_time_s": provenance.get("wall_time_s"), "peak_rss_mb": provenance.get("peak_rss_mb"),
            "differences": "; ".join(result.get("differences") or [])}


def _row(ppl: pd.DataFrame, jobs: pd.DataFrame, model: str, recipe: str, dataset: str) -> dict:
    selected = ppl[(ppl["model"] == model) & (ppl["recipe"] == recipe) & (ppl["dataset"] == dataset)]
    if selected.empty:
        raise PtqError(f"peers table: no perplexity of {recipe} on {dataset} ({model})")
    job = jobs[(jobs["model"] == model) & (jobs["recipe"] == recipe)]
    if job.empty:
        raise PtqError(f"peers table: no quantize result of {recipe} ({model})")
    measured = selected.iloc[0]
    first = job.iloc[0]
    return {"model": model, "recipe": recipe, "method": first["method"], "weight_scheme": first["weight_scheme"],
            "implementation": first["implementation"], "calibration_dtype": first["calibration_dtype"],
            "dataset": dataset, "ppl": measured["value"],
            "ci_low": measured["ci_low"], "ci_high": measured["ci_high"],
            "quantize_time_s": job["quantize_time_s"].mean(), "peak_rss_mb": job["peak_rss_mb"].mean(),
            "seeds": measured["seeds"], "windows": measured["windows"], "differences": first["differences"]}


def _change(results: Results, model: str, recipe: str, mirrored: str, dataset: str,
            settings: BootstrapSettings) -> dict:
    """ppl_peer / ppl_ours - 1 with its paired interval over the shared windows and seeds."""
    nll_peer, nll_ours = paired_losses(results.windows, model, dataset, recipe, mirrored)
    change = paired_difference(nll_peer, nll_ours, settings)
    return {"change": math.expm1(change.value), "change_low": math.expm1(change.low),
            "change_high": math.expm1(change.high)}


def write_peers_table(table: pd.DataFrame, out_dir: str | os.PathLike, settings: BootstrapSettings) -> dict[str, Path]:
    """``peers.csv`` and ``peers.md`` in ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    written = {"csv": out_dir / "peers.csv", "md": out_dir / "peers.md"}
    with atomic_path(written["csv"]) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    with atomic_path(written["md"]) as tmp:
        tmp.write_text(render_peers_markdown(table, settings))
    return written


def render_peers_markdown(table: pd.DataFrame, settings: BootstrapSettings) -> str:
    shown = pd.DataFrame({
        "model": table["model"], "recipe": table["recipe"], "implementation": table["implementation"],
        "calibrated in": table["calibration_dtype"].fillna("—"), "dataset": table["dataset"],
        "perplexity": [f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in table[["ppl", "ci_low", "ci_high"]].itertuples(index=False)],
        "vs ours": [_percent(c, lo, hi) for c, lo, hi in table[["change", "change_low", "change_high"]].itertuples(index=False)],
        "quantize s": table["quantize_time_s"].map(lambda v: f"{v:.0f}"),
        "peak RSS MB": table["peak_rss_mb"].map(lambda v: f"{v:.0f}"),
        "same grid point": table["same_grid_point"].map(lambda v: "" if pd.isna(v) else f"{100 * v:.1f} %"),
        "first / last layer": [_layer_shares(first, last) for first, last in
                               table[["same_grid_point_first_layer", "same_grid_point_last_layer"]].itertuples(index=False)],
        "same code": table["same_code"].map(lambda v: "" if pd.isna(v) else f"{100 * v:.1f} %"),
        "‖Ŵ−Ŵ_ours‖/‖Ŵ_ours‖": table["weight_rel_diff"].map(lambda v: "" if pd.isna(v) else f"{v:.2e}"),
        "seeds": table["seeds"],
    })
    differences = sorted({d for text in table["differences"].dropna() for d in str(text).split("; ") if d})
    notes = "\n".join(f"- {d}" for d in differences) or "- none"
    return (f"# Peers: the same recipes by other toolkits\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n\n"
            f"Perplexity: exp(mean NLL) over the test windows and calibration seeds, {settings.level:.0%} bootstrap "
            f"interval ({settings.samples} replicates, seed {settings.seed}). \"vs ours\": ppl / ppl_ours − 1, paired "
            "over the same windows and seeds; * where its interval excludes 0. Quantize: the job's wall time and peak "
            "resident memory (load, calibrate, quantize, write), mean over seeds, on the machine of the run.\n\n"
            f"How the peers differ from ours:\n{notes}\n")


def _layer_shares(first: float, last: float) -> str:
    return "" if pd.isna(first) else f"{100 * first:.1f} / {100 * last:.1f} %"


def _percent(change: float, low: float, high: float) -> str:
    if pd.isna(change):
        return ""
    return f"{100 * change:+.2f} % [{100 * low:+.2f}, {100 * high:+.2f}]" + (" *" if low > 0 or high < 0 else "")
