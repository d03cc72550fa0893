"""`ptqrepro export`: quantized models that transformers loads, with our weights and our logits."""

from __future__ import annotations

import json
import shutil

import compressed_tensors
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file

from ptqrepro.export.artifact import apply_artifact, load_artifact
from ptqrepro.cli import main
from ptqrepro.models.sources import load_model
from conftest import prepare_tiny_run
from test_dag import REPO, SNAKEMAKE, tiny_config, write_config


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_corpus, tmp_path_factory):
    return prepare_tiny_run(tmp_path_factory.mktemp("export"), tiny_model_dir, tiny_corpus, nsamples=4, seqlen=32)


def quantize(prepared, recipe: str, spec: str):
    """The tiny model's artifact of ``recipe`` (made once per module)."""
    out = prepared / "quantized" / recipe
    if not out.exists():
        assert main(["quantize", "--model", str(prepared / "model"), "--calibration", str(prepared / "calib.pt"),
                     "--recipe", recipe, "--spec", spec, "--device", "cpu", "--batch-size", "2",
                     "--out", str(out), "--metrics", str(prepared / "metrics" / f"{recipe}.json")]) == 0
    return out


def export(prepared, artifact, fmt: str, out, *extra) -> int:
    return main(["export", "--model", str(prepared / "model"), "--quantized", str(artifact), "--format", fmt,
                 "--out", str(out), *extra])


def ours(prepared, artifact):
    """The quantized model as ptqrepro evaluates it."""
    model, _ = load_model(prepared / "model")
    apply_artifact(model, artifact)
    return model


def theirs(out_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out_dir).eval()


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("recipe, weight, strategy", [
    ("rtn@int4-g16", "int4-g16", "group"),
    ("gptq@int3", "int3", "channel"),
    ("rtn@int4-g16-sym", "int4-g16-sym", "group"),
])
def test_compressed_tensors_export_loads_in_transformers_with_our_weights(prepared, tmp_path, recipe, weight, strategy):
    """transformers (through compressed-tensors) loads the export; its decompressed weights are ours
    bit for bit, so are its logits; the packed tensors are what compressed-tensors' own compressor
    makes of the same weights, scales and zero points."""
    steps = "[gptq]" if recipe.startswith("gptq") else "[rtn]"
    artifact = quantize(prepared, recipe, f"{{steps: {steps}, weight: {weight}}}")
    assert export(prepared, artifact, "compressed-tensors", tmp_path / "out") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["ignore"] == ["lm_head"] and config["version"] == compressed_tensors.__version__
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    quantized = load_artifact(artifact).quantized
    fmt = next(iter(quantized.values())).fmt
    assert (scheme.targets, scheme.weights.num_bits, scheme.weights.strategy) == (["Linear"], fmt.bits, strategy)
    assert scheme.weights.symmetric == fmt.symmetric and scheme.weights.group_size == fmt.group_size

    stored = load_file(tmp_path / "out" / "model.safetensors")
    offset = 2 ** (fmt.bits - 1)
    for name, weight_ in quantized.items():
        assert f"{name}.weight" not in stored
        module = {"weight": weight_.dequantize(), "weight_scale": weight_.params["scale"]}
        if not fmt.symmetric:
            module["weight_zero_point"] = (weight_.params["zero"] - offset).to(torch.int8)
        reference = PackedQuantizationCompressor.compress(module, scheme)
        assert set(reference) == {key.removeprefix(f"{name}.") for key in stored if key.startswith(f"{name}.")}
        for key, value in reference.items():
            assert torch.equal(stored[f"{name}.{key}"], value), (name, key)

    loaded, reference_model = theirs(tmp_path / "out"), ours(prepared, artifact)
    assert torch.equal(logits(loaded), logits(reference_model))  # the forward pass decompresses the weights
    for name in quantized:
        assert torch.equal(loaded.get_submodule(name).weight, reference_model.get_submodule(name).weight), name


@pytest.mark.parametrize("recipe, spec", [
    ("rtn@mxint4", "{steps: [rtn], weight: mxint4}"),
    ("lqer-k4@int4", "{steps: [rtn, {lqer: {rank: 4}}], weight: int4}"),
])
def test_dequantized_export_of_what_compressed_tensors_cannot_hold(prepared, tmp_path, capsys, recipe, spec):
    """MX weights and LQER terms are refused as compressed-tensors (one line naming them and the
    dequantized export, nothing written); the dequantized export loads as a plain model and computes
    as ours (LQER's term folded into the weights: equal to float rounding)."""
    artifact = quantize(prepared, recipe, spec)
    capsys.readouterr()
    assert export(prepared, artifact, "compressed-tensors", tmp_path / "ct") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format dequantized" in err and not (tmp_path / "ct").exists()
    assert ("weight format mxint4 is not an integer grid" if "mx" in recipe else "LQER's low-rank terms (14 linears") in err

    assert export(prepared, artifact, "dequantized", tmp_path / "out") == 0
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    torch.testing.assert_close(logits(theirs(tmp_path / "out")), logits(ours(prepared, artifact)), rtol=1e-5, atol=1e-5)


def test_activation_quantization_is_refused_unless_dropped_and_then_recorded(prepared, tmp_path, capsys):
    """SmoothQuant W8A8: neither format holds its activation quantization, so both refuse it; with
    --drop-activation-quantization both export the weights and the rescaled norms, which compute as
    the artifact does without its activation quantization, and say what they left out."""
    artifact = quantize(prepared, "sq+rtn@int8_a=int8", "{steps: [smoothquant, rtn], weight: int8, act: int8}")
    without_act = tmp_path / "without-act"
    shutil.copytree(artifact, without_act)
    manifest = json.loads((without_act / "manifest.json").read_text())
    assert manifest["float_parameters"]  # the smoothed norms
    (without_act / "manifest.json").write_text(json.dumps({**manifest, "act_format": None}))
    expected = logits(ours(prepared, without_act))
    for fmt in ("compressed-tensors", "dequantized"):
        capsys.readouterr()
        assert export(prepared, artifact, fmt, tmp_path / fmt) == 2
        err = capsys.readouterr().err
        assert f"cannot export sq+rtn@int8_a=int8 as {fmt}: its activation quantization (int8)" in err
        assert "--drop-activation-quantization" in err and not (tmp_path / fmt).exists()
        assert export(prepared, artifact, fmt, tmp_path / fmt, "--drop-activation-quantization") == 0
        assert "without its activation quantization int8" in capsys.readouterr().out
        record = json.loads((tmp_path / fmt / "ptqrepro-export.json").read_text())
        assert record["dropped"] == ["activation quantization int8"] and record["recipe"] == "sq+rtn@int8_a=int8"
        torch.testing.assert_close(logits(theirs(tmp_path / fmt)), expected, rtol=1e-5, atol=1e-5)


def test_a_beta_grid_with_zero_points_beyond_its_codes_is_refused(prepared, tmp_path, capsys):
    """MagR's β shrinks the step but not the zero point, which then lies above the top code where a
    group's maximum is small against its minimum; compressed-tensors packs zero points in b bits."""
    artifact = quantize(prepared, "rtn@int3-beta0.5", "{steps: [rtn], weight: int3-beta0.5}")
    assert any((w.params["zero"] > w.fmt.maxq).any() for w in load_artifact(artifact).quantized.values())
    capsys.readouterr()
    assert export(prepared, artifact, "compressed-tensors", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "zero points of model.layers." in err and "lie outside int3-beta0.5's codes 0..7" in err
    assert "--format dequantized" in err and not (tmp_path / "out").exists()


def test_the_export_rule_is_asked_for_by_path_only(tmp_path, tiny_model_dir, tiny_corpus):
    """results/export/{model}/{recipe}/s{seed}/{format} is made from that seed's artifact, by
    `ptqrepro export`; the default target does not ask for it."""
    import subprocess

    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus, {"rtn@int4-g16": {"steps": ["rtn"], "weight": "int4-g16"}}))
    target = "results/export/tiny/rtn@int4-g16/s0/compressed-tensors"
    dry = [*SNAKEMAKE, "--directory", str(tmp_path), "-n", "-p"]
    run = subprocess.run([*dry, target], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ("ptqrepro export --model results/models/tiny --quantized results/quantized/tiny/rtn@int4-g16/s0"
            f" --format compressed-tensors --out {target}") in run.stdout
    everything = subprocess.run(dry, capture_output=True, text=True, cwd=REPO)
    assert everything.returncode == 0 and "rule export" not in everything.stdout
