"""A model's shapes, read from its config (``config.json``, or a GGUF file's metadata), never its
weights: the (in, out) features of each linear of a decoder layer and the context length.

The linears are those the architecture's adapter names (``adapters.Architecture.linears``); their
shapes come from the model class itself, built with one decoder layer on the meta device (no
memory, no weights), so no shape formula is written twice. Every decoder layer of the supported
architectures has the same shapes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ptqrepro.models.adapters import architecture_for, decoder_layers, layer_linears
from ptqrepro.models.sources import MANIFEST, ModelSource, gguf_path


@dataclass(frozen=True)
class ModelShapes:
    model_type: str
    linears: dict[str, tuple[int, int]]
    """Each linear of a decoder layer (the adapter's name) -> (in_features, out_features)."""
    context: int | None
    """The longest sequence the model's positions cover (``max_position_embeddings``); None: unknown."""

    @property
    def inputs(self) -> dict[str, int]:
        """Each linear's in_features: the reduction dimension that groups and blocks split."""
        return {name: shape[0] for name, shape in self.linears.items()}


def read_model_config(source: ModelSource, prepared: str | Path | None = None):
    """The transformers config of ``source``: its ``config.json`` (a local directory, the hub cache,
    or the hub), or a GGUF source's metadata. Parsing a GGUF's metadata takes seconds (its tokenizer
    is there too), so where ``prepared`` is the folder ``prepare_model`` made from this very file,
    its ``config.json`` (the same config, saved) is read instead. A GGUF package that is not
    installed, or without the file, is a ``PtqError``; a hub config that cannot be had raises
    transformers' ``OSError``."""
    from transformers import AutoConfig

    if source.hub is not None:
        from ptqrepro.runtime.hub import hub_cache, offline

        return AutoConfig.from_pretrained(source.hub, cache_dir=hub_cache(), local_files_only=offline())
    path = gguf_path(source)
    manifest = Path(prepared or "") / MANIFEST
    if prepared is not None and manifest.is_file() and (Path(prepared) / "config.json").is_file():
        if json.loads(manifest.read_text()).get("gguf") == str(path):
            return AutoConfig.from_pretrained(prepared)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def shapes_of(config) -> ModelShapes:
    """The shapes of a model of ``config`` (an unsupported ``model_type`` is a ``PtqError``)."""
    from transformers import AutoModelForCausalLM

    arch = architecture_for(getattr(config, "model_type", None))
    one_layer = copy.deepcopy(config)
    one_layer.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one_layer)
    layer = decoder_layers(model, arch)[0]
    linears = {name: (linear.in_features, linear.out_features) for name, linear in layer_linears(layer, arch).items()}
    return ModelShapes(config.model_type, linears, getattr(config, "max_position_embeddings", None))


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per parameter of a checkpoint stored in each dtype (``config.json``'s ``torch_dtype``)."""

KNOWN_PARAMETERS = {
    "huggyllama/llama-7b": 6.74e9, "huggyllama/llama-13b": 13.02e9, "huggyllama/llama-30b": 32.53e9,
    "huggyllama/llama-65b": 65.29e9, "meta-llama/Llama-2-7b-hf": 6.74e9, "meta-llama/Llama-2-13b-hf": 13.02e9,
    "meta-llama/Llama-2-70b-hf": 68.98e9, "mistralai/Mistral-7B-v0.1": 7.24e9, "facebook/opt-125m": 0.125e9,
    "facebook/opt-1.3b": 1.32e9, "facebook/opt-2.7b": 2.65e9, "facebook/opt-6.7b": 6.66e9, "facebook/opt-13b": 12.85e9,
    "facebook/opt-30b": 29.97e9,
}
"""Parameters of the paper configs' hub models (float16 checkpoints), for sizing a download whose
``config.json`` cannot be read before it (``tests/test_preflight.py`` checks the LLaMA and OPT rows
against ``checkpoint_parameters`` of their architectures)."""


def checkpoint_parameters(config) -> int:
    """The parameters of a model of ``config``, its linears and embeddings (norms and biases, under
    0.1 %, left out): ``layers x sum(in x out of a decoder layer's linears) + vocab x hidden``,
    the embedding counted twice where the output head is not tied to it."""
    per_layer = sum(inputs * outputs for inputs, outputs in shapes_of(config).linears.values())
    embedding = config.vocab_size * config.hidden_size
    tied = getattr(config, "tie_word_embeddings", False)
    return config.num_hidden_layers * per_layer + embedding * (1 if tied else 2)


def checkpoint_bytes(config) -> int:
    """The size of a model's checkpoint: ``checkpoint_parameters`` x the bytes of its stored dtype
    (``torch_dtype``; half precision where it is not given)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return checkpoint_parameters(config) * DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 2)
