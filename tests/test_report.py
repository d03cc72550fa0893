"""Tables and plots built from a small hand-written set of result JSONs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from ptqrepro.errors import PtqError
from ptqrepro.report.plots import (
    job_costs,
    lqer_rank_curves,
    plot_accuracy_vs_bits,
    plot_dwr_curves,
    plot_job_costs,
    plot_lqer_ranks,
    plot_magr_row_maxima,
    plot_ppl_vs_bits,
    use_log_scale,
)
from ptqrepro.report.tables import (
    COLUMNS,
    SUMMARY_COLUMNS,
    WINDOW_COLUMNS,
    gather_results,
    render_markdown,
    summarize,
    write_tables,
)
from ptqrepro.report.uncertainty import BootstrapSettings

MODEL = "smollm2-135m"
# recipe -> (method, weight_format, weight_scheme, weight_bits, bits_per_weight, ppl on wiki-mini)
RECIPES = {
    "fp16": ("fp16", None, "fp16", 16, 16.0, 20.25),
    "rtn@int8": ("rtn", "int8", "int", 8, 8.0, 20.31),
    "rtn@int4": ("rtn", "int4", "int", 4, 4.0, 41.7),
    "rtn@int3": ("rtn", "int3", "int", 3, 3.0, 9876.5),
    "rtn@int4-g64": ("rtn", "int4-g64", "int-g64", 4, 4.5, 29.3),
    "rtn@int3-g64": ("rtn", "int3-g64", "int-g64", 3, 3.5, 88.04),
}
SECOND_DATASET_PPL = {"fp16": 15.5, "rtn@int4": 30.126}
QUANTIZE_TIME_S = 30.14
SETTINGS = BootstrapSettings(samples=500)
SPREAD = (-0.3, 0.3, -0.1, 0.1, -0.2, 0.2)
"""Per-window NLLs around log(ppl): mean exactly log(ppl), spread as real test windows."""


def window_nll(ppl: float) -> list[float]:
    return [math.log(ppl) + offset for offset in SPREAD]


def result(recipe, kind="perplexity", dataset="wiki-mini", metrics=None):
    """One result JSON as the pipeline writes it."""
    method, weight_format, scheme, bits, bpw, ppl = RECIPES[recipe]
    metrics = metrics if metrics is not None else {"ppl": ppl, "nll": math.log(ppl)}
    per_window = {"window_nll": window_nll(metrics.get("ppl", ppl))} if kind == "perplexity" else {}
    return {
        "kind": kind,
        "model": MODEL,
        "recipe": recipe,
        "method": method,
        "weight_format": weight_format,
        "weight_scheme": scheme,
        "weight_bits": bits,
        "bits_per_weight": bpw,
        "act_format": None,
        "dataset": dataset,
        "metrics": metrics,
        "protocol": {"seqlen": 512, "windows": len(SPREAD), "total_windows": 117, "dtype": "bfloat16",
                     "windows_sha256": f"windows-of-{dataset}"},
        **per_window,
        "calibration_seed": 0,
        "provenance": {
            "config_hash": f"hash-{recipe}",
            "git_commit": "0123abc",
            "packages": {"torch": "2.13.0"},
            "device": "cpu",
            "wall_time_s": 12.3,
            "peak_rss_mb": 1234.5,
            "peak_cuda_mb": None,
            "created": "2026-11-23T14:00:00+00:00",
        },
    }


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def result_files(tmp_path) -> list[Path]:
    """Perplexity for every recipe, a second dataset for two, and one quantize result."""
    files = [write(tmp_path / f"ppl-{recipe}.json", result(recipe)) for recipe in RECIPES]
    files += [
        write(
            tmp_path / f"ppl2-{recipe}.json",
            result(recipe, dataset="c4-mini", metrics={"ppl": ppl}),
        )
        for recipe, ppl in SECOND_DATASET_PPL.items()
    ]
    quantize_metrics = {"quantize_time_s": QUANTIZE_TIME_S, "mean_output_rel_error": 0.05}
    quantize = result("rtn@int4-g64", kind="quantize", dataset="calib-mini", metrics=quantize_metrics)
    quantize["layers"] = [{"name": "model.layers.0.mlp.up_proj", "rel_error": 0.04}]
    files.append(write(tmp_path / "quantize-rtn@int4-g64.json", quantize))
    return files


def summary(files) -> pd.DataFrame:
    return summarize(gather_results(files), SETTINGS)


def tables_of(files, out_dir) -> dict:
    results = gather_results(files)
    return write_tables(results, summarize(results, SETTINGS), out_dir, SETTINGS)


def markdown_rows(markdown: str) -> dict[str, dict[str, str]]:
    """Body rows of the Markdown table(s), keyed by recipe then column header."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    body = [line for line in lines[1:] if not set(line) <= set("|:- ")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in body]
    return {row["recipe"]: row for row in rows}


def test_csv_has_one_row_per_file_and_metric_in_column_order(result_files, tmp_path):
    written = tables_of(result_files, tmp_path / "tables")
    table = pd.read_csv(written["csv"])
    assert list(table.columns) == list(SUMMARY_COLUMNS)
    expected_rows = 2 * len(RECIPES) + len(SECOND_DATASET_PPL) + 2
    assert len(table) == expected_rows
    replicates = pd.read_csv(written["replicates"])
    assert list(replicates.columns) == list(COLUMNS) and len(replicates) == expected_rows
    windows = pd.read_csv(written["windows"])
    assert list(windows.columns) == list(WINDOW_COLUMNS)
    assert len(windows) == len(SPREAD) * (len(RECIPES) + len(SECOND_DATASET_PPL))
    assert not list((tmp_path / "tables").glob(".*")), "atomic write left a temporary behind"


def test_csv_values_round_trip(result_files, tmp_path):
    written = tables_of(result_files, tmp_path)
    table = pd.read_csv(written["csv"]).set_index(["recipe", "kind", "dataset", "metric"])
    for recipe, (_, weight_format, _, bits, bpw, ppl) in RECIPES.items():
        row = table.loc[(recipe, "perplexity", "wiki-mini", "ppl")]
        assert row["value"] == pytest.approx(ppl, rel=1e-12)
        assert row["ci_low"] < ppl < row["ci_high"] and row["windows"] == len(SPREAD)
        assert str(row["seeds"]) == "0" and row["seed_low"] == row["seed_high"] == pytest.approx(ppl)
        assert row["weight_bits"] == bits
        assert row["bits_per_weight"] == bpw
        assert row["config_hash"] == f"hash-{recipe}"
        assert row["source"] == str(result_files[list(RECIPES).index(recipe)])
        assert (pd.isna(row["weight_format"]) if weight_format is None
                else row["weight_format"] == weight_format)
    quantize = table.loc[("rtn@int4-g64", "quantize", "calib-mini", "quantize_time_s")]
    assert quantize["value"] == QUANTIZE_TIME_S


def test_rows_are_sorted_by_model_bits_desc_recipe_kind_dataset_metric(result_files):
    frame = gather_results(reversed(result_files)).replicates
    keys = list(zip(frame["weight_bits"], frame["recipe"], frame["kind"], frame["dataset"], frame["metric"]))
    assert keys == sorted(keys, key=lambda key: (-key[0], *key[1:]))
    assert list(frame["recipe"].unique()) == [
        "fp16", "rtn@int8", "rtn@int4", "rtn@int4-g64", "rtn@int3", "rtn@int3-g64",
    ]
    assert list(frame.index) == list(range(len(frame)))


def test_markdown_has_one_row_per_recipe_with_ppl_in_dataset_columns(result_files, tmp_path):
    written = tables_of(result_files, tmp_path)
    markdown = written["md"].read_text()
    rows = markdown_rows(markdown)
    assert list(rows) == [
        "fp16", "rtn@int8", "rtn@int4-g64", "rtn@int4", "rtn@int3-g64", "rtn@int3",
    ]
    assert rows["rtn@int3"]["wiki-mini"].startswith("9876.50 ±")
    assert rows["rtn@int4"]["c4-mini"].startswith("30.13 ±")
    assert "wiki-mini over seeds" not in rows["fp16"]  # one seed each
    assert "percentile bootstrap over the 6 test windows" in markdown and "500 replicates" in markdown
    assert rows["rtn@int8"]["c4-mini"] == "—"
    assert rows["fp16"]["weight format"] == "fp16"
    assert rows["rtn@int4-g64"]["bits/weight"] == "4.50"
    assert rows["rtn@int4-g64"]["quantize time (s)"] == "30.1"
    assert rows["rtn@int4"]["quantize time (s)"] == "—"
    assert "generated from 9 result files." in markdown


def test_markdown_without_quantize_results_has_no_time_column(result_files):
    perplexity_only = [path for path in result_files if not path.name.startswith("quantize")]
    rows = markdown_rows(render_markdown(summary(perplexity_only), SETTINGS))
    assert "quantize time (s)" not in rows["fp16"]


def test_missing_key_error_names_file_and_key(result_files, tmp_path):
    broken = result("rtn@int4")
    del broken["weight_bits"]
    bad = write(tmp_path / "broken.json", broken)
    with pytest.raises(PtqError, match=r"broken\.json.*'weight_bits'"):
        gather_results([*result_files, bad])


def test_missing_provenance_key_error_names_nested_key(tmp_path):
    broken = result("rtn@int4")
    del broken["provenance"]["config_hash"]
    with pytest.raises(PtqError, match=r"broken\.json.*'provenance\.config_hash'"):
        gather_results([write(tmp_path / "broken.json", broken)])


def test_empty_input_and_duplicate_measurements_are_errors(tmp_path):
    with pytest.raises(PtqError):
        gather_results([])
    first = write(tmp_path / "a.json", result("rtn@int4"))
    second = write(tmp_path / "b.json", result("rtn@int4"))
    with pytest.raises(PtqError, match=r"a\.json, .*b\.json"):
        gather_results([first, second])


def test_plot_writes_readable_png_and_pdf(result_files, tmp_path):
    paths = plot_ppl_vs_bits(summary(result_files), tmp_path / "figs" / "ppl_vs_bits")
    png, pdf = paths
    assert (png.name, pdf.name) == ("ppl_vs_bits.png", "ppl_vs_bits.pdf")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    height, width, _ = matplotlib.image.imread(png).shape
    assert width >= 1000 and height >= 400  # two panels side by side
    assert pdf.read_bytes().startswith(b"%PDF")


def test_plot_is_deterministic_and_filters_dataset(result_files, tmp_path):
    frame = summary(result_files)
    first = plot_ppl_vs_bits(frame, tmp_path / "a", dataset="c4-mini")
    second = plot_ppl_vs_bits(frame, tmp_path / "b", dataset="c4-mini")
    for one, other in zip(first, second):
        assert one.read_bytes() == other.read_bytes()
    with pytest.raises(PtqError, match="no-such-set"):
        plot_ppl_vs_bits(frame, tmp_path / "c", dataset="no-such-set")


def test_log_scale_only_for_a_wide_range():
    assert use_log_scale([20.25, 41.7, 9876.5])
    assert not use_log_scale([20.25, 29.3, 88.04])
    assert not use_log_scale([20.0, 200.0])  # exactly 10x stays linear
    assert not use_log_scale([])


def dwr_result(chosen=(0, 32, 0)):
    blocks = []
    for layer, rank in enumerate(chosen):
        curve = {"0": 100.0 - layer, "16": 104.0, "32": 99.0 - layer if rank == 32 else 101.0, "64": 120.0}
        blocks.append({"layer": layer, "chosen_rank": rank, "curve": curve, "seconds": 1.0})
    return {"model": MODEL, "recipe": "gptq+dwr@int3", "dwr": blocks,
            "metrics": {"calibration_ppl_before": 100.0, "calibration_ppl_after": 97.0}}


def test_dwr_curves_are_drawn_for_every_block(tmp_path):
    paths = plot_dwr_curves(dwr_result(), tmp_path / "dwr")
    assert [path.suffix for path in paths] == [".png", ".pdf"]
    image = matplotlib.image.imread(paths[0])
    assert image.shape[1] > image.shape[0] and image[..., :3].std() > 0.05  # two panels, not blank
    with pytest.raises(PtqError, match="has no DWR search"):
        plot_dwr_curves({"recipe": "gptq@int3", "metrics": {}}, tmp_path / "none")


def low_rank_frame(tmp_path) -> pd.DataFrame:
    """Plain RTN MXINT4 W4A8 (k = 0), LQER and L2QER at k = 8 and 32, a quantize job with each rank."""
    ppl = {("rtn", None): 33.1, ("rtn+lqer", 8): 31.3, ("rtn+lqer", 32): 29.0, ("rtn+l2qer", 8): 27.1, ("rtn+l2qer", 32): 24.9}
    files = []
    for (method, rank), value in ppl.items():
        recipe = f"{method}-k{rank}" if rank else method
        entry = {**result("rtn@int4"), "recipe": recipe, "method": method, "weight_format": "mxint4",
                 "weight_scheme": "mx a=mxint8", "metrics": {"ppl": value}, "window_nll": window_nll(value)}
        files.append(write(tmp_path / f"ppl-{recipe}.json", entry))
        if rank:
            quantize = {**entry, "kind": "quantize", "dataset": "calib", "metrics": {"lqer_rank": rank, "quantize_time_s": 9.0}}
            files.append(write(tmp_path / f"quantize-{recipe}.json", quantize))
    return summary(files)


def test_lqer_curves_start_at_the_base_quantizer(tmp_path):
    curves = lqer_rank_curves(low_rank_frame(tmp_path))
    assert curves == {(MODEL, "wiki-mini"): {
        "rtn+l2qer mx a=mxint8": {0: pytest.approx(33.1), 8: pytest.approx(27.1), 32: pytest.approx(24.9)},
        "rtn+lqer mx a=mxint8": {0: pytest.approx(33.1), 8: pytest.approx(31.3), 32: pytest.approx(29.0)},
    }}
    paths = plot_lqer_ranks(low_rank_frame(tmp_path), tmp_path / "lqer")
    assert matplotlib.image.imread(paths[0])[..., :3].std() > 0.05


def test_lqer_curves_need_a_rank(result_files, tmp_path):
    with pytest.raises(PtqError, match="no 'lqer_rank' quantize results"):
        plot_lqer_ranks(summary(result_files), tmp_path / "none")


def test_accuracy_is_plotted_against_bits_per_task(tmp_path):
    files = [
        write(tmp_path / f"zs-{recipe}-{task}.json",
              result(recipe, kind="zeroshot", dataset=task, metrics={"acc": acc, "acc_norm": acc + 0.1}))
        for recipe, acc in {"fp16": 0.32, "rtn@int4": 0.2, "rtn@int3": 0.05}.items()
        for task in ("ptq_lastword", "ptq_nextsentence")
    ]
    paths = plot_accuracy_vs_bits(summary(files), tmp_path / "acc")
    height, width, _ = matplotlib.image.imread(paths[0]).shape
    assert width >= 1000  # one panel per task, side by side
    with pytest.raises(PtqError, match="no 'acc' zeroshot results"):
        plot_accuracy_vs_bits(summary([write(tmp_path / "p.json", result("fp16"))]), tmp_path / "x")


def test_job_costs_have_one_bar_per_result_file(result_files, tmp_path):
    frame = gather_results(result_files).replicates
    jobs = job_costs(frame)
    assert len(jobs) == len(result_files)
    assert list(jobs["wall_time_s"]) == sorted(jobs["wall_time_s"], reverse=True)
    assert f"{MODEL} rtn@int4-g64 s0 · quantize" in set(jobs["job"])  # a quantize job names no dataset
    assert f"{MODEL} rtn@int4 s0 · perplexity · c4-mini" in set(jobs["job"])
    paths = plot_job_costs(frame, tmp_path / "jobs")
    assert paths[1].read_bytes().startswith(b"%PDF")


def test_magr_plot_needs_magr_records(tmp_path):
    layers = [
        {"layer": layer, "linear": linear, "magr_max_abs_before": 1.0 + layer,
         "magr_row_max_quantiles_before": [0.1 * (i + 1) for i in range(11)],
         "magr_row_max_quantiles_after": [0.09 * (i + 1) for i in range(11)]}
        for layer in range(4) for linear in ("self_attn.q_proj", "mlp.down_proj")
    ]
    magr = {"model": MODEL, "recipe": "magr+gptq@int3", "layers": layers}
    paths = plot_magr_row_maxima(magr, tmp_path / "magr")
    assert matplotlib.image.imread(paths[0])[..., :3].std() > 0.05
    with pytest.raises(PtqError, match="has no MagR records"):
        plot_magr_row_maxima({"recipe": "gptq@int3", "layers": [{"layer": 0}]}, tmp_path / "none")


def test_a_perplexity_result_without_per_window_losses_is_refused_with_what_to_do(tmp_path):
    old = result("rtn@int4")
    del old["window_nll"]
    with pytest.raises(PtqError, match=r"old\.json: perplexity result without per-window losses.*forcerun eval_ppl"):
        gather_results([write(tmp_path / "old.json", old)])


def test_replicates_over_calibration_seeds_reach_the_tables(result_files, tmp_path):
    seeds = {seed: {**result("rtn@int3"), "calibration_seed": seed, "metrics": {"ppl": ppl}, "window_nll": window_nll(ppl)}
             for seed, ppl in ((0, 9876.5), (1, 5000.0), (2, 7000.0))}
    files = [path for path in result_files if "rtn@int3.json" not in path.name]
    files += [write(tmp_path / f"ppl-rtn@int3-s{seed}.json", entry) for seed, entry in seeds.items()]
    written = tables_of(files, tmp_path / "tables")
    row = pd.read_csv(written["csv"]).set_index(["recipe", "dataset", "metric"]).loc[("rtn@int3", "wiki-mini", "ppl")]
    assert row["seeds"] == "0 1 2" and len(row["source"].split()) == 3
    assert row["value"] == pytest.approx((9876.5 * 5000.0 * 7000.0) ** (1 / 3))  # exp of the mean NLL over seeds
    assert (row["seed_low"], row["seed_high"]) == pytest.approx((5000.0, 9876.5))
    assert row["ci_low"] < 5000.0 and row["ci_high"] > 9876.5  # the seeds' spread is in the interval
    replicates = pd.read_csv(written["replicates"])
    assert sorted(replicates.loc[(replicates["recipe"] == "rtn@int3") & (replicates["metric"] == "ppl"), "seed"]) == [0, 1, 2]
    rows = markdown_rows(written["md"].read_text())
    assert rows["rtn@int3"]["wiki-mini over seeds"] == "3 seeds: 5000.00–9876.50"
    assert rows["fp16"]["wiki-mini over seeds"] == "—"


def test_seeds_that_scored_different_windows_are_not_pooled(tmp_path):
    first = {**result("rtn@int3"), "calibration_seed": 0}
    second = {**result("rtn@int3"), "calibration_seed": 1}
    second["protocol"] = {**second["protocol"], "windows_sha256": "other-windows"}
    files = [write(tmp_path / "s0.json", first), write(tmp_path / "s1.json", second)]
    with pytest.raises(PtqError, match="scored different test windows"):
        summary(files)


def test_zero_shot_intervals_come_from_lm_evals_stderr(tmp_path):
    metrics = {"acc": 0.4, "acc_stderr": 0.05, "acc_norm": 0.5, "acc_norm_stderr": 0.02}
    frame = summary([write(tmp_path / "zs.json", result("fp16", kind="zeroshot", dataset="ptq_lastword", metrics=metrics))])
    acc = frame.set_index("metric").loc["acc"]
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx((0.4 - 1.959964 * 0.05, 0.4 + 1.959964 * 0.05))
    assert "±0.098" in render_markdown(frame, SETTINGS)


def test_hardware_is_a_column_and_named_in_the_notes(result_files, tmp_path):
    labelled = result("fp16")
    labelled["provenance"]["hardware"] = {"label": "Test CPU (AVX512, bf16 AMX)"}
    files = [path for path in result_files if path.name != "ppl-fp16.json"] + [write(tmp_path / "fp16.json", labelled)]
    written = tables_of(files, tmp_path / "tables")
    assert "Test CPU (AVX512, bf16 AMX)" in set(pd.read_csv(written["csv"])["hardware"].dropna())
    assert "Computed on: Test CPU (AVX512, bf16 AMX)." in written["md"].read_text()


def test_recipes_calibrated_in_different_dtypes_say_which(result_files, tmp_path):
    markdown = tables_of(result_files, tmp_path / "one")["md"].read_text()
    assert "calibrated in" not in markdown  # no result says how it was calibrated
    mixed = {**result("rtn@int3"), "calibration_dtype": "float32"}
    other = {**result("rtn@int4"), "calibration_dtype": "bfloat16"}
    files = [path for path in result_files if path.name not in ("ppl-rtn@int3.json", "ppl-rtn@int4.json")]
    files += [write(tmp_path / "a.json", mixed), write(tmp_path / "b.json", other)]
    rows = markdown_rows(tables_of(files, tmp_path / "two")["md"].read_text())
    assert (rows["rtn@int3"]["calibrated in"], rows["rtn@int4"]["calibrated in"], rows["fp16"]["calibrated in"]) == (
        "float32", "bfloat16", "—")


def test_revisions_reach_all_csv_and_all_md_warns_where_they_differ(tmp_path):
    """Each result's model and dataset revisions are columns of all.csv (every revision a
    measurement's seeds used); all.md says which recipes of a model used which revision where its
    table mixes them, and nothing where they agree."""
    def with_revisions(recipe, model_revision, dataset_revision="d" * 40):
        data = result(recipe)
        data["provenance"] |= {"model_revision": model_revision, "dataset_revision": dataset_revision,
                               "tokenizer_class": "LlamaTokenizerFast"}
        return write(tmp_path / f"{recipe}.json", data)

    agreeing = [with_revisions(recipe, "a" * 40) for recipe in ("fp16", "rtn@int4-g64")]
    written = tables_of(agreeing, tmp_path / "same")
    table = pd.read_csv(written["csv"])
    assert set(table["model_revision"]) == {"a" * 40} and set(table["tokenizer_class"]) == {"LlamaTokenizerFast"}
    assert "Different revisions" not in written["md"].read_text()
    mixed = [with_revisions("fp16", "a" * 40), with_revisions("rtn@int4-g64", "b" * 40, "e" * 40)]
    markdown = tables_of(mixed, tmp_path / "mixed")["md"].read_text()
    assert f"**Different revisions of the model** in this table: {'a' * 12} (fp16); {'b' * 12} (rtn@int4-g64)" in markdown
    assert f"**Different revisions of the dataset wiki-mini** in this table: {'d' * 12} (fp16); {'e' * 12} (rtn@int4-g64)" in markdown


def test_kl_divergence_and_flips_reach_the_tables_with_intervals(result_files, tmp_path):
    kld, flips = [0.01, 0.03, 0.02, 0.02, 0.04, 0.0], [0.1, 0.2, 0.1, 0.3, 0.2, 0.1]
    seeds = {seed: {**result("rtn@int3"), "calibration_seed": seed, "window_kld": [v * (1 + seed) for v in kld],
                    "window_flips": flips, "metrics": {"ppl": 9876.5, "kld": 0.02 * (1 + seed), "flips": 1 / 6}}
             for seed in (0, 1, 2)}
    files = [path for path in result_files if "rtn@int3.json" not in path.name]
    files += [write(tmp_path / f"ppl-rtn@int3-s{seed}.json", entry) for seed, entry in seeds.items()]
    written = tables_of(files, tmp_path / "tables")
    windows = pd.read_csv(written["windows"])
    assert windows.loc[windows["recipe"] == "rtn@int3", "kld"].sum() == pytest.approx(sum(kld) * 6)
    assert windows.loc[windows["recipe"] == "fp16", ["kld", "flips"]].isna().all().all()
    table = pd.read_csv(written["csv"]).set_index(["recipe", "dataset", "metric"])
    row = table.loc[("rtn@int3", "wiki-mini", "kld")]
    assert row["value"] == pytest.approx(0.04) and row["ci_low"] < 0.04 < row["ci_high"]  # mean over seeds and windows
    assert table.loc[("rtn@int3", "wiki-mini", "flips"), "value"] == pytest.approx(1 / 6)
    rows = markdown_rows(written["md"].read_text())
    assert rows["rtn@int3"]["wiki-mini KLD"].startswith("0.0400 ±") and rows["rtn@int3"]["wiki-mini flips"].startswith("0.167 ±")
    assert rows["fp16"]["wiki-mini KLD"] == "—"
    assert rows["rtn@int3"]["draws"] == "3" and rows["rtn@int4"]["draws"] == "1"
    broken = {**seeds[0], "window_kld": kld[:3]}
    with pytest.raises(PtqError, match="'window_kld' is not one number per window"):
        gather_results([write(tmp_path / "broken.json", broken)])
