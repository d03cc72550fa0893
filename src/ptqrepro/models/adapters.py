"""Each architecture family declares once where its decoder layers and linear layers are.

Everything model-specific that the pipeline needs lives here; methods never see a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ptqrepro.errors import PtqError


@dataclass(frozen=True)
class Architecture:
    family: str
    layers: str  # dotted path of the decoder-layer ModuleList inside the CausalLM
    before_layers: tuple[str, ...]  # modules that produce the first layer's inputs
    linears: tuple[str, ...]  # linear layers inside one decoder layer, in execution order


LLAMA = Architecture(
    family="llama",
    layers="model.layers",
    before_layers=("model.embed_tokens", "model.rotary_emb"),
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
)

ARCHITECTURES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PtqError(
            f"unsupported model_type {model_type!r}: known {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.layers)


def layer_linears(layer: nn.Module, arch: Architecture) -> dict[str, nn.Linear]:
    return {name: layer.get_submodule(name) for name in arch.linears}
