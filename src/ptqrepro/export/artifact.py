"""The quantized-model artifact: what a recipe changed, stored compactly.

A directory with ``quantized.safetensors`` and ``manifest.json``:

* ``<linear>.codes`` and ``<linear>.<parameter>`` for each of the format's group parameters
  (scale and zero point, or an MX block's shared exponent); integer codes of fewer than 8 bits
  packed to the format's bits each (``formats.packing``; the manifest's ``packed_codes`` gives each
  one's bits, shape and dtype), others (8-bit codes, MX floating-point elements) as their dtype;
* ``<linear>.lowrank_down.*`` and ``<linear>.lowrank_up.*``, the same for each factor of a
  linear's LQER term (``lowrank.QuantizedLowRank``);
* the float parameters a transform changed outside the linears (SmoothQuant's and AWQ's
  rescaled normalisation weights), under their own names;
* the manifest: recipe, description, the format of each linear and of each low-rank factor,
  the activation format, and ``base_model``: the ``model_fingerprint`` of the model it was made
  from, which ``check_fits`` compares with the model it is applied to.

It holds only what the recipe changed; the base model is read from its prepared directory.
``apply_artifact`` gives a loaded base model the dequantized weights and changed parameters and
installs (``install_quantized_inference``) the activation fake-quantization on every quantized
linear's input and each low-rank term's output added to its linear's output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from ptqrepro.errors import InputError, first_line
from ptqrepro.formats import QuantizedWeight, parse_format
from ptqrepro.formats.activation import quantize_activation
from ptqrepro.formats.packing import PACKABLE, pack_codes, unpack_codes
from ptqrepro.runtime.io import atomic_path
from ptqrepro.formats.lowrank import QuantizedLowRank

TENSORS = "quantized.safetensors"
MANIFEST = "manifest.json"


FACTORS = ("down", "up")


def _put(tensors: dict, packed: dict, name: str, weight: QuantizedWeight) -> None:
    """Store ``weight`` under ``name``: its codes packed to ``fmt.bits`` bits each where they are
    integers of fewer than 8 bits (``packed`` records how, for ``_take``), and its parameters."""
    codes = weight.codes.contiguous().cpu()
    if codes.dtype in PACKABLE and weight.fmt.bits < 8:
        packed[f"{name}.codes"] = {"bits": weight.fmt.bits, "shape": list(codes.shape), "dtype": str(codes.dtype).removeprefix("torch.")}
        codes = pack_codes(codes, weight.fmt.bits)
    tensors[f"{name}.codes"] = codes
    for key, value in weight.params.items():
        tensors[f"{name}.{key}"] = value.contiguous().cpu()


def _take(tensors: dict, packed: dict, name: str, fmt_name: str) -> QuantizedWeight:
    fmt = parse_format(fmt_name)
    codes = tensors[f"{name}.codes"]
    if f"{name}.codes" in packed:
        layout = packed[f"{name}.codes"]
        codes = unpack_codes(codes, layout["bits"], tuple(layout["shape"]), getattr(torch, layout["dtype"]))
    return QuantizedWeight(codes=codes, params={key: tensors[f"{name}.{key}"] for key in fmt.param_names}, fmt=fmt)


def save_artifact(
    out_dir: str | Path,
    quantized: dict[str, QuantizedWeight],
    float_parameters: dict[str, torch.Tensor],
    manifest: dict,
    corrections: dict[str, QuantizedLowRank] | None = None,
) -> None:
    corrections = corrections or {}
    tensors = {name: value.contiguous().cpu() for name, value in float_parameters.items()}
    packed = {}
    for name, weight in quantized.items():
        _put(tensors, packed, name, weight)
    for name, term in corrections.items():
        for factor in FACTORS:
            _put(tensors, packed, f"{name}.lowrank_{factor}", getattr(term, factor))
    manifest = {
        **manifest,
        "linears": {name: weight.fmt.name for name, weight in quantized.items()},
        "lowrank": {
            name: {factor: getattr(term, factor).fmt.name for factor in FACTORS} | {"rank": term.rank}
            for name, term in corrections.items()
        },
        "float_parameters": sorted(float_parameters),
        "packed_codes": packed,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass
class Artifact:
    quantized: dict[str, QuantizedWeight]
    corrections: dict[str, QuantizedLowRank]
    float_parameters: dict[str, torch.Tensor]
    manifest: dict


def load_artifact(artifact_dir: str | Path) -> Artifact:
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / MANIFEST).is_file():
        raise InputError(f"{artifact_dir} is not a quantized-model artifact (no {MANIFEST})")
    from safetensors import SafetensorError

    try:
        manifest = json.loads((artifact_dir / MANIFEST).read_text())
        tensors = load_file(str(artifact_dir / TENSORS))
        packed = manifest.get("packed_codes", {})
        return Artifact(
            quantized={name: _take(tensors, packed, name, fmt_name) for name, fmt_name in manifest["linears"].items()},
            corrections={
                name: QuantizedLowRank(**{f: _take(tensors, packed, f"{name}.lowrank_{f}", formats[f]) for f in FACTORS})
                for name, formats in manifest.get("lowrank", {}).items()
            },
            float_parameters={name: tensors[name] for name in manifest.get("float_parameters", [])},
            manifest=manifest,
        )
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        # a manifest that is not JSON or lacks a key, tensors missing, empty or corrupt
        raise InputError(f"{artifact_dir} is a broken quantized-model artifact: {type(error).__name__}: {first_line(error)}") from None


class ActivationQuantizer:
    """Dynamic fake quantization of linear inputs; linears fed the very same tensor (q/k/v,
    gate/up) reuse one result instead of quantizing it again."""

    def __init__(self, fmt) -> None:
        self.fmt = fmt
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, quantize_activation(x, self.fmt))
        return self._last[1]

    def install(self, linear: nn.Linear) -> RemovableHandle:
        return linear.register_forward_pre_hook(lambda _module, args: (self(args[0]), *args[1:]))


def install_low_rank(linear: nn.Linear, term: QuantizedLowRank, act) -> RemovableHandle:
    """Add ``Q_a(Q_a(x) A) B`` to the output of ``linear`` (whose input is already ``Q_a(x)``)."""
    return linear.register_forward_hook(lambda _module, args, output: output + term.output(args[0], act))


def install_quantized_inference(model: nn.Module, artifact: Artifact, device: str = "cpu") -> list[RemovableHandle]:
    """Hook what the artifact adds to its linears' computation into ``model``: the activation
    fake-quantization on every quantized linear's input, and each low-rank term's output (its
    factors kept on ``device``, where the model will compute, so no forward pass copies them).
    The weights are left as they are; returns the hooks' handles."""
    act = parse_format(artifact.manifest.get("act_format"))
    activations = ActivationQuantizer(act) if act is not None else None
    handles = []
    for name in artifact.quantized:
        linear = model.get_submodule(name)
        if activations is not None:
            handles.append(activations.install(linear))
        if name in artifact.corrections:
            handles.append(install_low_rank(linear, artifact.corrections[name].to(device), act))
    return handles


BASE_MODEL = "base_model"
"""The manifest's key for the ``model_fingerprint`` of the model an artifact was made from."""


def model_fingerprint(model: nn.Module) -> dict:
    """What an artifact records of the model it was made from: the model type, its decoder layers
    and a hash of every parameter's name and shape. Not of the values: that would read every weight
    of a 70B model once more; a model of other shapes is what an artifact cannot be applied to."""
    shapes = sorted((name, list(parameter.shape)) for name, parameter in model.named_parameters())
    return {"model_type": getattr(model.config, "model_type", None),
            "layers": getattr(model.config, "num_hidden_layers", None),
            "shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]}


def check_fits(model: nn.Module, artifact: Artifact, artifact_dir: str | Path, model_dir: str | Path) -> None:
    """An ``InputError`` naming both where ``artifact`` was made from another model than ``model``:
    its recorded ``base_model`` differs (an artifact without one: a linear or parameter it names is
    missing or of another shape)."""
    made_from = artifact.manifest.get(BASE_MODEL)
    here = model_fingerprint(model)

    def described(fingerprint: dict) -> str:
        return f"{fingerprint['model_type']}, {fingerprint['layers']} layers, shapes {fingerprint['shapes_sha256']}"

    mismatch = made_from is not None and made_from != here
    named = {name: parameter for name, parameter in model.named_parameters()}
    for name, weight in artifact.quantized.items():
        expected = named.get(f"{name}.weight")
        mismatch = mismatch or expected is None or list(expected.shape) != list(weight.codes.shape)
    for name, value in artifact.float_parameters.items():
        mismatch = mismatch or name not in named or named[name].shape != value.shape
    if mismatch:
        origin = f" ({described(made_from)})" if made_from else ""
        raise InputError(f"{artifact_dir} was made from model {artifact.manifest.get('model')!r}{origin}, not from "
                         f"{model_dir} ({described(here)}): quantize that model again")


@torch.no_grad()
def apply_artifact(model: nn.Module, artifact_dir: str | Path, device: str = "cpu", model_dir: str | Path = "the model") -> dict:
    """Turn a loaded base model into the quantized model the artifact describes: each quantized
    linear gets its dequantized weight (a new tensor in the weight's dtype: the loaded one is not
    written), each changed parameter its value, and ``install_quantized_inference`` its hooks. An
    artifact of another model (``check_fits``) is an ``InputError``."""
    artifact = load_artifact(artifact_dir)
    check_fits(model, artifact, artifact_dir, model_dir)
    for name, weight in artifact.quantized.items():
        linear = model.get_submodule(name)
        linear.weight.data = weight.dequantize().to(linear.weight.dtype)
    apply_float_parameters(model, artifact)
    install_quantized_inference(model, artifact, device)
    return artifact.manifest


@torch.no_grad()
def apply_float_parameters(model: nn.Module, artifact: Artifact) -> None:
    """Give the model the float parameters the recipe changed (new tensors in each parameter's dtype)."""
    for name, value in artifact.float_parameters.items():
        parameter = model.get_parameter(name)
        parameter.data = value.to(parameter.dtype)
