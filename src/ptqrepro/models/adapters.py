"""Each architecture family declares once where its layers are and how they connect.

Everything model-specific that the pipeline needs lives here; methods never see a model.

* ``linears``: the linear layers of one decoder layer, in execution order;
* ``sequential_groups``: the linears GPTQ's ``true_sequential`` quantizes together, in order;
* ``smooth_pairs``: (normalisation, linears it feeds): SmoothQuant folds 1/s into the norm;
* ``scale_pairs``: AWQ's scaling groups, the smooth pairs plus (linear, linears it feeds
  linearly), e.g. v_proj -> o_proj (only when their shapes match: not under grouped-query
  attention) and up_proj -> down_proj (the product act(gate) * up is linear in up);
* ``inspected``: (scaling source, module) for the AWQ scaling groups whose reference loss is the
  output of a module around the linears (llm-awq's ``module2inspect``: the attention block for
  q/k/v, the MLP for gate/up); the other groups' loss is the output of their linears;
* ``clip_skip``: linears AWQ's clip search leaves alone (q/k: their error is amplified by the
  attention softmax, which a per-linear output error does not see);
* ``before_layers`` / ``after_layers``: the modules that make layer 0's inputs, and those that
  turn the last layer's outputs into logits, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ptqrepro.errors import PtqError


@dataclass(frozen=True)
class Architecture:
    family: str
    layers: str
    before_layers: tuple[str, ...]
    after_layers: tuple[str, ...]
    linears: tuple[str, ...]
    sequential_groups: tuple[tuple[str, ...], ...]
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    linear_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    inspected: tuple[tuple[str, str], ...]
    clip_skip: tuple[str, ...]

    @property
    def scale_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return self.smooth_pairs + self.linear_pairs


LLAMA = Architecture(
    family="llama",
    layers="model.layers",
    before_layers=("model.embed_tokens", "model.rotary_emb"),
    after_layers=("model.norm", "lm_head"),
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    smooth_pairs=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    linear_pairs=(
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    inspected=(("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")),
    clip_skip=("self_attn.q_proj", "self_attn.k_proj"),
)

OPT = Architecture(
    family="opt",
    layers="model.decoder.layers",
    before_layers=tuple(
        f"model.decoder.{name}" for name in ("embed_tokens", "embed_positions", "project_in")
    ),
    after_layers=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    smooth_pairs=(
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    ),
    linear_pairs=(
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("fc1", ("fc2",)),
    ),
    inspected=(("self_attn_layer_norm", "self_attn"),),  # llm-awq inspects fc1 itself for final_layer_norm -> fc1
    clip_skip=("self_attn.q_proj", "self_attn.k_proj"),
)

ARCHITECTURES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "opt": OPT}


def architecture_of(model: nn.Module) -> Architecture:
    return architecture_for(getattr(model.config, "model_type", None))


def architecture_for(model_type: str | None) -> Architecture:
    """The adapter of a config's ``model_type``; an unsupported one is an error naming the known ones."""
    if model_type not in ARCHITECTURES:
        raise PtqError(
            f"unsupported model_type {model_type!r}: known {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.layers)


def layer_linears(layer: nn.Module, arch: Architecture) -> dict[str, nn.Linear]:
    return {name: layer.get_submodule(name) for name in arch.linears}


def decoder_linears(model: nn.Module, arch: Architecture) -> dict[str, nn.Linear]:
    """Every linear of the decoder layers by its name in the model (``<layers>.<index>.<linear>``),
    in execution order: the linears a recipe quantizes."""
    return {f"{arch.layers}.{index}.{name}": linear for index, layer in enumerate(decoder_layers(model, arch))
            for name, linear in layer_linears(layer, arch).items()}


def modules_before_layers(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The modules that produce layer 0's inputs (those an architecture variant lacks are skipped)."""
    return _present(model, arch.before_layers)


def modules_after_layers(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The modules from the last layer's outputs to the logits, in order (missing ones skipped)."""
    return _present(model, arch.after_layers)


def _present(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    modules = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if module is not None:
            modules.append(module)
    return modules
