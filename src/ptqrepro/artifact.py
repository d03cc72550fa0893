"""The quantized-model artifact: integer codes and grid parameters of every quantized linear.

A directory with ``quantized.safetensors`` (``<linear>.codes`` as uint8, ``<linear>.scale`` and
``<linear>.zero`` as float32) and ``manifest.json`` (recipe, base model, the format of each
linear). It holds only what the recipe changed; the base model is read from its prepared
directory. ``apply_artifact`` writes the dequantized weights into a loaded base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptqrepro.errors import PtqError
from ptqrepro.formats import QuantizedWeight, parse_format
from ptqrepro.io import atomic_path

TENSORS = "quantized.safetensors"
MANIFEST = "manifest.json"


def save_artifact(out_dir: str | Path, quantized: dict[str, QuantizedWeight], manifest: dict) -> None:
    tensors = {}
    for name, weight in quantized.items():
        tensors[f"{name}.codes"] = weight.codes.contiguous().cpu()
        tensors[f"{name}.scale"] = weight.scale.contiguous().cpu()
        tensors[f"{name}.zero"] = weight.zero.contiguous().cpu()
    manifest = {**manifest, "linears": {name: weight.fmt.name for name, weight in quantized.items()}}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_artifact(artifact_dir: str | Path) -> tuple[dict[str, QuantizedWeight], dict]:
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / MANIFEST).is_file():
        raise PtqError(f"{artifact_dir} is not a quantized-model artifact (no {MANIFEST})")
    manifest = json.loads((artifact_dir / MANIFEST).read_text())
    tensors = load_file(str(artifact_dir / TENSORS))
    quantized = {
        name: QuantizedWeight(
            codes=tensors[f"{name}.codes"],
            scale=tensors[f"{name}.scale"],
            zero=tensors[f"{name}.zero"],
            fmt=parse_format(fmt),
        )
        for name, fmt in manifest["linears"].items()
    }
    return quantized, manifest


@torch.no_grad()
def apply_artifact(model: nn.Module, artifact_dir: str | Path) -> dict:
    """Overwrite the quantized linears of ``model`` with their dequantized weights."""
    quantized, manifest = load_artifact(artifact_dir)
    for name, weight in quantized.items():
        linear = model.get_submodule(name)
        linear.weight.data.copy_(weight.dequantize().to(linear.weight.dtype))
    return manifest
