"""The quantized-model artifact: what a recipe changed, stored compactly.

A directory with ``quantized.safetensors`` and ``manifest.json``:

* ``<linear>.codes`` (the format's code dtype) and ``<linear>.<parameter>`` for each of the
  format's group parameters (scale and zero point, or an MX block's shared exponent);
* the float parameters a transform changed outside the linears (SmoothQuant's and AWQ's
  rescaled normalisation weights), under their own names;
* the manifest: recipe, description, the format of each linear, and the activation format.

It holds only what the recipe changed; the base model is read from its prepared directory.
``apply_artifact`` writes the dequantized weights and changed parameters into a loaded base
model and installs the activation fake-quantization on every quantized linear's input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptqrepro.errors import PtqError
from ptqrepro.formats import QuantizedWeight, parse_format
from ptqrepro.formats.activation import quantize_activation
from ptqrepro.io import atomic_path

TENSORS = "quantized.safetensors"
MANIFEST = "manifest.json"


def save_artifact(
    out_dir: str | Path, quantized: dict[str, QuantizedWeight], float_parameters: dict[str, torch.Tensor], manifest: dict
) -> None:
    tensors = {name: value.contiguous().cpu() for name, value in float_parameters.items()}
    for name, weight in quantized.items():
        tensors[f"{name}.codes"] = weight.codes.contiguous().cpu()
        for key, value in weight.params.items():
            tensors[f"{name}.{key}"] = value.contiguous().cpu()
    manifest = {
        **manifest,
        "linears": {name: weight.fmt.name for name, weight in quantized.items()},
        "float_parameters": sorted(float_parameters),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_artifact(artifact_dir: str | Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict]:
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / MANIFEST).is_file():
        raise PtqError(f"{artifact_dir} is not a quantized-model artifact (no {MANIFEST})")
    manifest = json.loads((artifact_dir / MANIFEST).read_text())
    tensors = load_file(str(artifact_dir / TENSORS))
    quantized = {}
    for name, fmt_name in manifest["linears"].items():
        fmt = parse_format(fmt_name)
        quantized[name] = QuantizedWeight(
            codes=tensors[f"{name}.codes"],
            params={key: tensors[f"{name}.{key}"] for key in fmt.param_names},
            fmt=fmt,
        )
    float_parameters = {name: tensors[name] for name in manifest.get("float_parameters", [])}
    return quantized, float_parameters, manifest


def install_activation_quantization(linear: nn.Linear, fmt) -> None:
    """Fake-quantize the input of ``linear`` dynamically on every forward pass."""
    linear.register_forward_pre_hook(lambda _module, args: (quantize_activation(args[0], fmt), *args[1:]))


@torch.no_grad()
def apply_artifact(model: nn.Module, artifact_dir: str | Path) -> dict:
    """Turn a loaded base model into the quantized model the artifact describes."""
    quantized, float_parameters, manifest = load_artifact(artifact_dir)
    act = parse_format(manifest.get("act_format"))
    for name, weight in quantized.items():
        linear = model.get_submodule(name)
        linear.weight.data.copy_(weight.dequantize().to(linear.weight.dtype))
        if act is not None:
            install_activation_quantization(linear, act)
    for name, value in float_parameters.items():
        model.get_parameter(name).data.copy_(value)
    return manifest
