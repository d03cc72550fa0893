"""The model never needs to fit on the device (issue 6): it stays on the CPU as loaded, memory-mapped
and never written; one decoder layer at a time gets a float32 copy on the device; the calibration
activations stay on the device or on the CPU; the results are the same whichever way."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from ptqrepro.export.artifact import Artifact
from ptqrepro.errors import PtqError
from ptqrepro.models.adapters import LLAMA
from ptqrepro.models.sources import ModelSource, load_model, prepare_model
from ptqrepro.layerwise.pipeline import capture_layer_inputs, quantize_model
from ptqrepro.layerwise.placement import borrowed, fetch
from ptqrepro.layerwise.reconstruction import search_model
from ptqrepro.recipe.recipes import DwrSettings, recipe_from_config

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPTQ = {"steps": ["smoothquant", "gptq"], "weight": "int4-g16"}


def calibration(n=6, seqlen=24, seed=0, vocab=96):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def same_result(a, b) -> bool:
    """Same codes, format parameters, changed float parameters and per-linear records."""
    return (
        a.quantized.keys() == b.quantized.keys()
        and all(torch.equal(a.quantized[n].codes, b.quantized[n].codes)
                and all(torch.equal(v, b.quantized[n].params[k]) for k, v in a.quantized[n].params.items())
                for n in a.quantized)
        and a.float_parameters.keys() == b.float_parameters.keys()
        and all(torch.equal(v, b.float_parameters[k]) for k, v in a.float_parameters.items())
        and a.records == b.records
    )


def prepared_model(folder: Path, corpus: Path, dtype: torch.dtype) -> tuple[Path, int]:
    """A tiny LLaMA saved in ``dtype`` with its tokenizer, prepared as a hub source; its vocabulary size."""
    tokenizer = tiny_tokenizer(corpus)
    tiny_llama(len(tokenizer), layers=3).to(dtype).save_pretrained(folder / "checkpoint")
    tokenizer.save_pretrained(folder / "checkpoint")
    prepare_model(ModelSource.from_config("tiny", {"hub": str(folder / "checkpoint")}), folder / "prepared")
    return folder / "prepared", len(tokenizer)


def private_dirty_kb(path: Path) -> int:
    """Private dirty memory (kB) of this process's mappings of ``path``: pages written since mapped."""
    target, total, inside = str(path.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.split(maxsplit=5)[-1] == target
        elif inside and line.startswith("Private_Dirty:"):
            total += int(line.split()[1])
    return total


def test_a_bfloat16_checkpoint_quantizes_exactly_as_its_float32_load(tmp_path, tiny_corpus):
    """Loaded lazily in its own dtype, each layer is computed on a float32 copy: the same codes and
    records, bit for bit, as the whole model converted to float32 at load time."""
    folder, vocab = prepared_model(tmp_path, tiny_corpus, torch.bfloat16)
    data = calibration(vocab=vocab)
    results = {}
    for dtype in ("auto", "float32"):
        model, _ = load_model(folder, dtype)
        assert model.model.layers[0].mlp.up_proj.weight.dtype == (torch.bfloat16 if dtype == "auto" else torch.float32)
        results[dtype] = quantize_model(model, recipe_from_config("g", GPTQ), data, batch_size=2)
        assert model.model.layers[0].mlp.up_proj.weight.dtype == model.model.embed_tokens.weight.dtype
    assert same_result(results["auto"], results["float32"])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_quantizing_never_writes_the_memory_mapped_model(tmp_path, tiny_corpus):
    """The loaded weights are only read (no page of the mapped file becomes a private copy); with
    ``release_layers`` every finished layer is freed, and the result is the same as keeping them."""
    folder, vocab = prepared_model(tmp_path, tiny_corpus, torch.float32)
    weights = tmp_path / "checkpoint" / "model.safetensors"
    descriptor = os.open(weights, os.O_RDONLY)
    os.fsync(descriptor)  # freshly written pages count as dirty until written back
    os.close(descriptor)
    data = calibration(vocab=vocab)
    model, _ = load_model(folder, "auto")
    assert private_dirty_kb(weights) == 0
    kept = quantize_model(copy.deepcopy(model), recipe_from_config("g", GPTQ), data, batch_size=2)
    released = quantize_model(model, recipe_from_config("g", GPTQ), data, batch_size=2, release_layers=True)
    assert same_result(released, kept)
    assert private_dirty_kb(weights) == 0
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    assert model.model.embed_tokens.weight.device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_where_the_activations_are_kept_changes_no_result(device):
    """Quantization and DWR's search give the same result with the activations on the device or on
    the CPU; with ``cpu`` the captured hidden states are on the CPU. DWR's search only reads the model
    and leaves no hook on it."""
    base = tiny_llama(vocab_size=96, layers=3)
    data = calibration()
    results = {offload: quantize_model(copy.deepcopy(base), recipe_from_config("g", GPTQ), data, device=device,
                                       batch_size=2, offload=offload) for offload in ("device", "cpu")}
    assert same_result(results["device"], results["cpu"])
    inputs = capture_layer_inputs(base, LLAMA, data, device, batch_size=2, offload="cpu")
    assert all(hidden.device.type == "cpu" for hidden in inputs.hidden)

    base_result = quantize_model(copy.deepcopy(base), recipe_from_config("r", {"steps": ["rtn"], "weight": "int3"}), data)
    artifact = Artifact(base_result.quantized, {}, {}, {"recipe": "r"})
    before = copy.deepcopy(base.state_dict())
    searches = {offload: search_model(base, artifact, data, DwrSettings(ranks=(4, 16)), device=device, batch_size=2,
                                      offload=offload) for offload in ("device", "cpu")}
    assert all(torch.equal(value, before[name]) for name, value in base.state_dict().items())  # only read
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in base.modules())
    assert [b.curve for b in searches["device"].blocks] == [b.curve for b in searches["cpu"].blocks]
    assert searches["device"].final_ppl == searches["cpu"].final_ppl


def test_an_unknown_offload_is_a_clear_error(model):
    with pytest.raises(PtqError, match="unknown offload 'gpu': expected device or cpu"):
        quantize_model(model, recipe_from_config("r", {"steps": ["rtn"], "weight": "int4"}), calibration(), offload="gpu")


def test_borrowed_modules_get_their_own_tensors_back(model):
    """``borrowed`` computes on float32 tensors and restores the very tensors the modules had;
    ``fetch`` copies, so writing to the fetched layer leaves the loaded tensors alone."""
    embedding = model.model.embed_tokens.to(torch.bfloat16)
    original = embedding.weight.data
    with borrowed([embedding], "cpu"):
        assert embedding.weight.dtype == torch.float32
    assert embedding.weight.data_ptr() == original.data_ptr() and embedding.weight.dtype == torch.bfloat16
    layer = model.model.layers[0]
    loaded = layer.mlp.up_proj.weight.data
    before = loaded.clone()
    fetch(layer, "cpu")
    layer.mlp.up_proj.weight.data.zero_()
    assert torch.equal(loaded, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_only_the_layer_at_work_visits_the_gpu():
    """With the activations on the CPU, after every layer the GPU holds none of the model, and
    after the job nothing at all; the model and the result end on the CPU."""
    model = tiny_llama(vocab_size=96, layers=3)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    recipe = recipe_from_config("g", GPTQ)
    quantize_model(copy.deepcopy(model), recipe, calibration(), device="cuda", batch_size=2)  # CUDA's workspaces
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    after_layer = []
    result = quantize_model(model, recipe, calibration(), device="cuda", batch_size=2, offload="cpu",
                            log=lambda message: after_layer.append(torch.cuda.memory_allocated()))
    assert len(after_layer) == 3 and all(allocated - baseline < layer_bytes / 4 for allocated in after_layer)
    assert torch.cuda.memory_allocated() - baseline < layer_bytes / 4
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"cpu"}
    assert {w.codes.device.type for w in result.quantized.values()} == {"cpu"}


def test_the_config_puts_the_offload_on_the_quantize_and_dwr_jobs(tmp_path, tiny_model_dir, tiny_corpus):
    """``calibration.offload`` reaches both kinds of job; the schema refuses an unknown place."""
    from test_dag import snakemake, tiny_config, write_config

    config = tiny_config(tiny_model_dir, tiny_corpus, recipes={
        "g": {"steps": ["gptq"], "weight": "int4"}, "g+dwr": {"base": "g", "dwr": {"ranks": [4]}}})
    config["calibration"]["offload"] = "cpu"
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n", "-p")
    assert run.returncode == 0, run.stderr[-2000:]
    commands = re.findall(r"ptqrepro (quantize|dwr) .*", run.stdout + run.stderr)
    assert sorted(set(commands)) == ["dwr", "quantize"]
    assert all("--offload cpu" in line for line in re.findall(r"ptqrepro (?:quantize|dwr) .*", run.stdout + run.stderr))
    config["calibration"]["offload"] = "gpu"
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0 and "'gpu' is not one of ['device', 'cpu']" in run.stdout + run.stderr


def artifact_model(tmp_path, spec: dict):
    """A tiny LLaMA carrying the artifact of ``spec`` (activation quantization and low-rank terms
    installed as hooks), and its base."""
    from ptqrepro.export.artifact import apply_artifact, save_artifact

    base = tiny_llama(vocab_size=96, layers=3)
    result = quantize_model(copy.deepcopy(base), recipe_from_config("r", spec), calibration(), batch_size=2)
    save_artifact(tmp_path / "a", result.quantized, result.float_parameters,
                  {"recipe": "r", "act_format": spec.get("act")}, result.corrections)
    model = copy.deepcopy(base)
    apply_artifact(model, tmp_path / "a")
    return model


LQER_W4A8 = {"steps": ["rtn", {"l2qer": {"rank": 4}}], "weight": "int4-g16", "act": "int8"}


@pytest.mark.parametrize("device", DEVICES)
def test_a_streamed_evaluation_scores_as_the_whole_model(tmp_path, device):
    """``layers`` placement (activation quantization and low-rank terms included) gives the whole
    model's losses bit for bit; inside a forward pass exactly the running layer holds copies of its
    tensors, and afterwards every module has its own tensors back."""
    from ptqrepro.eval.perplexity import window_losses
    from ptqrepro.layerwise.placement import placed_for_evaluation

    model = artifact_model(tmp_path, LQER_W4A8)
    windows = calibration(n=4, seed=1)
    layers = model.model.layers
    loaded = [layer.self_attn.q_proj.weight.data for layer in layers]
    lent_while_running = []

    def record(index):
        def hook(_module, _args):
            lent_while_running.append((index, [layer.self_attn.q_proj.weight.data_ptr() != loaded[i].data_ptr()
                                               for i, layer in enumerate(layers)]))
        return hook

    for index, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(record(index))
    with placed_for_evaluation(model, device, "layers") as placement:
        assert placement == "layers"
        streamed_losses = window_losses(model, windows, 2, device)
        assert all(layer.self_attn.q_proj.weight.data_ptr() == loaded[i].data_ptr() for i, layer in enumerate(layers))
    assert lent_while_running == [(i, [j == i for j in range(3)]) for _ in range(2) for i in range(3)]
    assert {t.device.type for t in model.parameters()} | {t.device.type for t in model.buffers()} == {"cpu"}
    with placed_for_evaluation(model, device, "whole") as placement:
        assert placement == "whole"
        assert torch.equal(window_losses(model, windows, 2, device), streamed_losses)


def test_auto_placement_and_bad_placements(model):
    """``auto`` keeps the whole model on a CPU; an unknown placement, and a model with a tensor
    outside the modules its architecture declares, are clear errors."""
    from ptqrepro.layerwise.placement import choose_placement, placed_for_evaluation

    assert choose_placement("auto", model, "cpu") == "whole"
    with pytest.raises(PtqError, match="unknown placement 'gpu': expected auto, whole, layers"):
        choose_placement("gpu", model, "cpu")
    model.model.register_buffer("scale", torch.ones(1))
    with pytest.raises(PtqError, match="llama declares no module holding model.scale"):
        with placed_for_evaluation(model, "cpu", "layers"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_streamed_evaluation_holds_one_layer_on_the_gpu(tmp_path):
    """With ``layers`` the GPU's peak during a forward pass stays below the model's layers; ``auto``
    picks ``whole`` for a model that fits."""
    from ptqrepro.eval.perplexity import window_losses
    from ptqrepro.layerwise.placement import model_bytes, placed_for_evaluation

    model = tiny_llama(vocab_size=96, layers=8)
    layers_bytes = model_bytes(model.model.layers)
    window_losses(copy.deepcopy(model).to("cuda"), calibration(n=2), 2, "cuda")  # CUDA's workspaces, out of the peak
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with placed_for_evaluation(model, "cuda", "layers"):
        window_losses(model, calibration(n=2), 2, "cuda")
    assert torch.cuda.max_memory_allocated() - baseline < layers_bytes / 2
    assert torch.cuda.memory_allocated() - baseline == 0
    with placed_for_evaluation(model, "cuda", "auto") as placement:
        assert placement == "whole"


def test_an_evaluation_loads_the_model_in_its_dtype(tmp_path, tiny_corpus):
    """The evaluated model's parameters are in the evaluation dtype and its buffers (the rotary
    frequencies) float32, as ``from_pretrained`` builds them; converting a float32 load afterwards
    would round the frequencies to bfloat16 as well."""
    import argparse

    from ptqrepro.export.artifact import save_artifact
    from ptqrepro.cli import _model_to_evaluate

    folder, _ = prepared_model(tmp_path, tiny_corpus, torch.float32)
    save_artifact(tmp_path / "a", {}, {}, {"recipe": "fp16"})
    args = argparse.Namespace(model=folder, quantized=tmp_path / "a", device="cpu", dtype="bfloat16", placement="auto")
    with _model_to_evaluate(args) as (model, _tokenizer, _manifest, device, dtype, placement):
        assert (device, dtype, placement) == ("cpu", "bfloat16", "whole")
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_the_config_puts_the_placement_on_the_evaluations(tmp_path, tiny_model_dir, tiny_corpus):
    """``eval.placement`` reaches the perplexity and zero-shot jobs; the schema refuses an unknown one."""
    from test_dag import snakemake, tiny_config, write_config

    config = tiny_config(tiny_model_dir, tiny_corpus, recipes={"r": {"steps": ["rtn"], "weight": "int4"}})
    config["eval"]["placement"] = "layers"
    config["eval"]["zeroshot"] = {"tasks": ["ptq_lastword"], "corpus": "tiny", "items": 4, "max_length": 256}
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n", "-p")
    assert run.returncode == 0, run.stderr[-2000:]
    commands = re.findall(r"ptqrepro (?:eval-ppl|eval-zeroshot) .*", run.stdout + run.stderr)
    assert {line.split()[1] for line in commands} == {"eval-ppl", "eval-zeroshot"}
    assert all("--placement layers" in line for line in commands)
    config["eval"]["placement"] = "gpu"
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0 and "'gpu' is not one of ['auto', 'whole', 'layers']" in run.stdout + run.stderr
