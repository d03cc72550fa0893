"""benchmarks/gpu_check.py without a GPU: it refuses to run unless allowed, and allowed it compares
the CPU with itself, where every difference must be zero."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
RECIPES = ["sq+rtn@int8_a=int8", "l2qer-k8@mxint4_a=mxint8", "gptq+dwr@int3"]
"""A transform, a low-rank refinement with MX weights and activations, and DWR's search (which
brings its GPTQ base along)."""


@pytest.fixture()
def gpu_check(monkeypatch, tmp_path):
    """The script as a module, in a process that sees no GPU; the Hugging Face variables it sets
    are restored afterwards."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for variable in ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, str(tmp_path / "hf"))
    return module


def test_without_cuda_it_stops_with_one_line(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "CUDA is not available" in error and "--allow-cpu-only" in error
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_cpu_against_cpu_is_identical(gpu_check, tmp_path, capsys):
    code = gpu_check.main(["--out", str(tmp_path / "out"), "--allow-cpu-only", "--size", "smoke", "--models", "opt",
                           "--threads", "1", "--recipes", *RECIPES])
    output = capsys.readouterr()
    assert code == 0, output.err
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["second_device"] == "cpu"
    assert report["environment"]["tf32_matmul"] is False
    rows = {row["recipe"]: row for row in report["rows"]}
    assert set(rows) == {*RECIPES, "gptq@int3"}
    for row in rows.values():
        assert row["model"] == "opt"
        assert row["same_grid_share"] == 1.0
        assert row["max_abs_weight_diff"] == 0.0 and row["max_abs_weight"] > 0
        assert row["ppl_cpu"] > 1 and row["ppl_rel_diff_whole"] == 0.0 and row["ppl_rel_diff_layers"] == 0.0
        assert row["within_tolerance"] is True
    assert rows["l2qer-k8@mxint4_a=mxint8"]["max_abs_lowrank_diff"] == 0.0
    assert rows["sq+rtn@int8_a=int8"]["max_abs_float_parameter_diff"] == 0.0
    assert rows["gptq+dwr@int3"]["dwr_ranks_cpu"] == rows["gptq+dwr@int3"]["dwr_ranks_second"]
    assert len(rows["gptq+dwr@int3"]["dwr_ranks_cpu"]) == report["settings"]["layers"]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table in output.out
    assert sum(line.startswith("| opt |") for line in table.splitlines()) == len(rows)


def test_a_difference_is_outside_the_cpu_bounds_and_a_few_flipped_codes_inside_the_cuda_ones(gpu_check):
    identical = {"same_grid_share": 1.0, "max_abs_weight_diff": 0.0, "ppl_rel_diff_whole": 0.0, "ppl_rel_diff_layers": 0.0,
                 "max_abs_lowrank_diff": None, "max_abs_float_parameter_diff": 0.0, "dwr_ranks_cpu": [4, 8],
                 "dwr_ranks_second": [4, 8]}
    assert gpu_check.within(identical, gpu_check.EXACT)
    flipped = {**identical, "same_grid_share": 0.97, "max_abs_weight_diff": 0.05, "ppl_rel_diff_layers": 2e-3}
    assert not gpu_check.within(flipped, gpu_check.EXACT)
    assert not gpu_check.within({**identical, "dwr_ranks_second": [4, 16]}, gpu_check.EXACT)
    assert gpu_check.within(flipped, gpu_check.TOLERANCES["calibrated"])
    assert not gpu_check.within(flipped, gpu_check.TOLERANCES["data-free"])
    kinds = [row.kind for row in gpu_check.selected_rows(["rtn@int4-g32", "gptq+dwr@int3"])]
    assert kinds == ["data-free", "calibrated", "search"]
