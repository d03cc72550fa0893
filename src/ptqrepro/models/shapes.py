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
        return AutoConfig.from_pretrained(source.hub)
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
