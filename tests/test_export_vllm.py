"""Exports for vLLM: `export --target vllm-cpu` (refusals, W8A8), the versions an export records and
their check on load, `vllm-check`'s agreement record, and, where vLLM's own environment is given
($PTQ_VLLM_PYTHON), vLLM serving two exported schemes with our per-window NLLs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import compressed_tensors
import pytest
import torch
from safetensors.torch import load_file

from ptqrepro.export.artifact import load_artifact
from ptqrepro.cli import main
from ptqrepro.errors import PtqError
from ptqrepro.export.vllm_check import VLLM_PYTHON_ENV, agreement, root_cause, vllm_check
from ptqrepro.export.vllm_score import ExportVersionError, version_warnings, window_nll
from conftest import prepare_tiny_run, tiny_tokenizer
from test_export import export, prepared, quantize  # noqa: F401 (the module's fixture)

W8A8 = ("sq+rtn@int8-sym_a=int8", "{steps: [smoothquant, rtn], weight: int8-sym, act: int8}")


@pytest.mark.parametrize("recipe, spec, message", [
    ("rtn@int8", "{steps: [rtn], weight: int8}",
     "its weight-only kernel computes 4-bit codes only (int4, int4-g<n>, int4-g<n>-sym), not int8; quantize at "
     "int4-g64, or at W8A8 (weight int8-sym, act int8)"),
    ("gptq@int3", "{steps: [gptq], weight: int3}", "4-bit codes only"),
    ("sq+rtn@int8_a=int8", "{steps: [smoothquant, rtn], weight: int8, act: int8}",
     "its W8A8 kernel takes int8 symmetric per-channel weights (weight int8-sym), not int8"),
])
def test_what_vllm_cpu_cannot_compute_is_refused_at_export(prepared, tmp_path, capsys, recipe, spec, message):
    """--target vllm-cpu refuses, in one line naming the scheme vLLM's CPU build serves, what would
    load in transformers but fail in vLLM; nothing is written."""
    artifact = quantize(prepared, recipe, spec)
    capsys.readouterr()
    assert export(prepared, artifact, "compressed-tensors", tmp_path / "out", "--target", "vllm-cpu") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"vLLM's CPU build cannot serve {recipe}: " in err and message in err
    assert not (tmp_path / "out").exists()


def test_w8a8_for_vllm_keeps_its_activation_quantization(prepared, tmp_path):
    """SmoothQuant W8A8 with symmetric int8 weights exports for vLLM as compressed-tensors'
    int-quantized scheme with dynamic per-token int8 inputs: the int8 codes are ours shifted by
    128, the scales ours; the export records the versions it was written with."""
    artifact = quantize(prepared, *W8A8)
    assert export(prepared, artifact, "compressed-tensors", tmp_path / "out", "--target", "vllm-cpu") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == group["format"] == "int-quantized"
    inputs = group["input_activations"]
    assert (inputs["num_bits"], inputs["strategy"], inputs["dynamic"], inputs["symmetric"]) == (8, "token", True, True)
    assert (group["weights"]["strategy"], group["weights"]["symmetric"]) == ("channel", True)
    stored = load_file(tmp_path / "out" / "model.safetensors")
    for name, weight in load_artifact(artifact).quantized.items():
        assert stored[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(stored[f"{name}.weight"].to(torch.int16), weight.codes.to(torch.int16) - 128)
        assert torch.equal(stored[f"{name}.weight_scale"], weight.params["scale"])
    record = json.loads((tmp_path / "out" / "ptqrepro-export.json").read_text())
    assert record["target"] == "vllm-cpu" and record["dropped"] == []
    assert record["versions"]["compressed-tensors"] == compressed_tensors.__version__
    assert set(record["versions"]) == {"compressed-tensors", "transformers", "torch"}


def _export_dir(tmp_path: Path, bits: int, written: dict | None) -> Path:
    folder = tmp_path / f"export-{bits}"
    folder.mkdir()
    groups = {"group_0": {"weights": {"num_bits": bits}}}
    (folder / "config.json").write_text(json.dumps(
        {"quantization_config": {"format": "pack-quantized", "config_groups": groups}}))
    if written is not None:
        (folder / "ptqrepro-export.json").write_text(json.dumps({"versions": written}))
    return folder


def test_versions_are_checked_on_load(tmp_path):
    """The same versions pass silently; another compressed-tensors or transformers is one warning
    line each; 3-bit codes packed on one side of compressed-tensors 0.18 and read on the other are
    an error (the layout changed); an export without recorded versions says so."""
    written = {"compressed-tensors": "0.19.0", "transformers": "5.17.0", "torch": "2.13.0+cpu"}
    four, three = _export_dir(tmp_path, 4, written), _export_dir(tmp_path, 3, written)
    assert version_warnings(str(four), written) == []
    served = {"compressed-tensors": "0.17.0", "transformers": "5.19.0"}
    assert version_warnings(str(four), served) == [
        f"{four} was written with compressed-tensors 0.19.0, read here with 0.17.0",
        f"{four} was written with transformers 5.17.0, read here with 5.19.0",
    ]
    with pytest.raises(ExportVersionError, match=r"packs \[3\]-bit codes with compressed-tensors 0.19.0, read here with 0.17.0"):
        version_warnings(str(three), served)
    assert len(version_warnings(str(three), {**served, "compressed-tensors": "0.20.1"})) == 2
    assert "records no versions" in version_warnings(str(_export_dir(tmp_path, 2, {})), served)[0]


def test_window_nll_and_agreement_from_prompt_logprobs():
    """A window's NLL is the mean of -log p over every position after the first (vLLM gives none
    for the first); the agreement is vLLM's minus ours, window by window."""
    class Logprob:
        def __init__(self, value):
            self.logprob = value

    prompt_logprobs = [None, {7: Logprob(-1.0), 3: Logprob(-0.5)}, {9: Logprob(-2.0)}]
    assert window_nll(prompt_logprobs, [5, 7, 9]) == pytest.approx(1.5)
    record = agreement([1.0, 2.0], [1.25, 1.5])
    assert record["max_abs_difference"] == 0.5 and record["mean_difference"] == pytest.approx(-0.125)


def test_vllm_check_names_what_is_missing(tmp_path, monkeypatch):
    """No vLLM python, or a result in another dtype than vLLM's, is a one-line error before vLLM
    starts; a failed vLLM run is reported by its first exception, not its shutdown noise."""
    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    with pytest.raises(PtqError, match=f"--vllm-python or {VLLM_PYTHON_ENV}"):
        vllm_check(tmp_path, tmp_path / "r.json", tmp_path, None, 2, "bfloat16")
    (tmp_path / "r.json").write_text(json.dumps({"kind": "perplexity", "window_nll": [1.0],
                                                 "protocol": {"dtype": "float32"}}))
    with pytest.raises(PtqError, match=r"evaluated in float32, vLLM would run in bfloat16"):
        vllm_check(tmp_path, tmp_path / "r.json", tmp_path, "/bin/true", 2, "bfloat16")
    output = ("(Worker pid=1) ERROR 12-05 00:55:08 [multiproc_executor.py:953] ValueError: Failed to find a kernel\n"
              "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n"
              "(MainProcess pid=2) WARNING [shutdown] force killing\n")
    assert root_cause(output) == "ValueError: Failed to find a kernel"


def _vllm_sized_llama(folder: Path, corpus: Path) -> Path:
    """A random 2-layer LLaMA that vLLM's CPU kernels take (head size 64, every linear a multiple
    of 32), with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(corpus)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


VLLM_PYTHON = os.environ.get(VLLM_PYTHON_ENV)
NLL_TOLERANCE = {"bfloat16": 0.01, "float32": 5e-4}
"""Largest |vLLM - ours| of a window's mean NLL (nats) that counts as agreement, per dtype: about ten
times what vllm-cpu 0.32 gave on this model (8.2e-4 for rtn@int4-g32 in bfloat16, 4.4e-5 for W8A8
in float32)."""


@pytest.mark.slow
@pytest.mark.skipif(not (VLLM_PYTHON and Path(VLLM_PYTHON).is_file()),
                    reason=f"vLLM not installed: set {VLLM_PYTHON_ENV} to the python of an environment with vllm-cpu")
@pytest.mark.parametrize("recipe, spec, dtype", [
    ("rtn@int4-g32", "{steps: [rtn], weight: int4-g32}", "bfloat16"),
    (*W8A8, "float32"),
])
def test_vllm_serves_the_export_with_our_window_nlls(tmp_path_factory, tiny_corpus, recipe, spec, dtype):
    """vLLM (CPU build, its own environment) loads the export and scores the windows eval-ppl
    scored with each window's NLL within NLL_TOLERANCE of ours: 4-bit weights with zero points
    (CPUWNA16LinearKernel, bfloat16 only) and W8A8 with per-token int8 activations (float32)."""
    root = tmp_path_factory.mktemp("vllm")
    run = prepare_tiny_run(root, _vllm_sized_llama(root / "llama", tiny_corpus), tiny_corpus, nsamples=4, seqlen=64)
    artifact = quantize(run, recipe, spec)
    result = root / "ppl.json"
    assert main(["eval-ppl", "--model", str(run / "model"), "--quantized", str(artifact), "--corpus",
                 str(run / "corpus"), "--seqlen", "64", "--max-windows", "4", "--dtype", dtype, "--device", "cpu",
                 "--out", str(result)]) == 0
    assert export(run, artifact, "compressed-tensors", root / "out", "--target", "vllm-cpu") == 0
    assert main(["vllm-check", "--exported", str(root / "out"), "--result", str(result), "--corpus",
                 str(run / "corpus"), "--dtype", dtype, "--out", str(root / "check.md")]) == 0
    record = json.loads((root / "check.json").read_text())
    assert record["windows"] == 4 and "vllm-cpu" in record["versions"]
    assert record["max_abs_difference"] < NLL_TOLERANCE[dtype], record


@pytest.mark.slow
def test_export_vllm_is_off_unless_configured(tmp_path, tiny_model_dir, tiny_corpus):
    """`snakemake export_vllm` exports each configured recipe for vLLM's CPU build, evaluates it in
    vLLM's dtype and checks it there; without `export_vllm.recipes` it runs nothing, and the
    default target never asks for any of it."""
    import subprocess

    from test_dag import REPO, SNAKEMAKE, tiny_config, write_config

    config = tiny_config(tiny_model_dir, tiny_corpus, {"rtn@int4-g16": {"steps": ["rtn"], "weight": "int4-g16"}})
    write_config(tmp_path, config)
    dry = [*SNAKEMAKE, "--directory", str(tmp_path), "-n", "-p"]
    unconfigured = subprocess.run([*dry, "export_vllm"], capture_output=True, text=True, cwd=REPO)
    assert unconfigured.returncode == 0 and "rule vllm_check" not in unconfigured.stdout
    everything = subprocess.run(dry, capture_output=True, text=True, cwd=REPO)
    assert everything.returncode == 0
    assert not any(f"rule {rule}:" in everything.stdout for rule in ("export_for_vllm", "eval_ppl_vllm_dtype", "vllm_check"))

    write_config(tmp_path, {**config, "export_vllm": {"recipes": ["rtn@int4-g16"], "python": "/opt/vllm/bin/python",
                                                      "windows": 2}})
    run = subprocess.run([*dry, "export_vllm"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    exported = "results/export/tiny/rtn@int4-g16/s0/vllm-cpu"
    assert (f"--format compressed-tensors --target vllm-cpu --out {exported}") in run.stdout
    assert "--dtype bfloat16 --device cpu" in run.stdout  # our evaluation in vLLM's dtype
    assert (f"ptqrepro vllm-check --exported {exported} --result results/export/tiny/rtn@int4-g16/s0/"
            "vllm-reference-ppl-tiny.json --corpus results/corpora/tiny --vllm-python /opt/vllm/bin/python "
            "--windows 2 --dtype bfloat16") in run.stdout
