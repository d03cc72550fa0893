"""The same config run twice gives the same results, bit for bit, on the CPU, whatever the state of
the global random generators; and every result records the seeds that made it."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ptqrepro.cli import main

TIMING = {"provenance": ("wall_time_s", "created", "peak_rss_mb"), "metrics": ("quantize_time_s",)}
"""What may differ between two runs of one job: when it ran, how long it took, how much memory."""


def without_timing(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    for block, keys in TIMING.items():
        for key in keys:
            result.get(block, {}).pop(key, None)
    for block in result.get("dwr", []):
        block.pop("seconds")
    return result


def run_config(root, prepared) -> dict:
    """Calibration windows, GPTQ, DWR's random-space search on it and the perplexity of both, into ``root``."""
    calibration = str(root / "calib.pt")
    jobs = [
        ["calibrate", "--model", str(prepared / "model"), "--corpus", str(prepared / "corpus"), "--nsamples", "4",
         "--seqlen", "32", "--seed", "7", "--out", calibration],
        ["quantize", "--model", str(prepared / "model"), "--calibration", calibration, "--recipe", "gptq@int4-g16",
         "--spec", "{steps: [gptq], weight: int4-g16}", "--device", "cpu", "--batch-size", "2",
         "--out", str(root / "gptq"), "--metrics", str(root / "gptq.json")],
        ["dwr", "--model", str(prepared / "model"), "--base", str(root / "gptq"), "--calibration", calibration,
         "--recipe", "gptq+dwr", "--spec", "{base: gptq@int4-g16, dwr: {space: random, ranks: [4, 16], seed: 3}}",
         "--device", "cpu", "--batch-size", "2", "--out", str(root / "dwr"), "--metrics", str(root / "dwr.json")],
        *[["eval-ppl", "--model", str(prepared / "model"), "--quantized", str(root / name), "--corpus",
           str(prepared / "corpus"), "--seqlen", "32", "--max-windows", "4", "--seed", "5", "--device", "cpu",
           "--out", str(root / f"{name}-ppl.json")] for name in ("gptq", "dwr")],
    ]
    for job in jobs:
        assert main(job) == 0, job[0]
    return {name: json.loads((root / f"{name}.json").read_text()) for name in ("gptq", "dwr", "gptq-ppl", "dwr-ppl")}


def test_the_same_config_twice_gives_the_same_artifacts_and_metrics(tiny_model_dir, tiny_corpus, tmp_path):
    prepared = tmp_path / "prepared"
    assert main(["prepare-model", "--name", "tiny", "--spec", json.dumps({"hub": str(tiny_model_dir)}),
                 "--out", str(prepared / "model")]) == 0
    assert main(["prepare-corpus", "--name", "tiny", "--spec", f"{{source: local, path: {tiny_corpus}}}",
                 "--out", str(prepared / "corpus")]) == 0
    runs = []
    for index, root in enumerate((tmp_path / "first", tmp_path / "second")):
        random.seed(1000 + index)  # no result may depend on the global generators
        torch.manual_seed(1000 + index)
        runs.append(run_config(root, prepared))
    first, second = tmp_path / "first", tmp_path / "second"
    assert torch.equal(torch.load(first / "calib.pt")["input_ids"], torch.load(second / "calib.pt")["input_ids"])
    for name in ("gptq", "dwr"):
        for file in ("quantized.safetensors", "manifest.json"):
            assert (first / name / file).read_bytes() == (second / name / file).read_bytes(), (name, file)
    for name in runs[0]:
        assert without_timing(runs[0][name]) == without_timing(runs[1][name]), name
    gptq, dwr, ppl = runs[0]["gptq"], runs[0]["dwr"], runs[0]["gptq-ppl"]
    assert gptq["settings"]["seed"] == 7 and dwr["settings"]["seed"] == 7 and dwr["settings"]["dwr_seed"] == 3
    assert ppl["protocol"]["seed"] == 5 and runs[0]["dwr-ppl"]["protocol"]["seed"] == 5
    assert gptq["calibration_seed"] == dwr["calibration_seed"] == ppl["calibration_seed"] == 7
    assert len(ppl["window_nll"]) == ppl["protocol"]["windows"] == 4
    assert sum(ppl["window_nll"]) / 4 == pytest.approx(ppl["metrics"]["nll"])
    assert ppl["metrics"]["ppl"] > 1 and dwr["metrics"]["calibration_ppl_after"] <= dwr["metrics"]["calibration_ppl_before"]
