"""Where the layer-by-layer jobs keep their tensors (issue 6: the model never needs to fit on the
accelerator).

* The model stays on the CPU as ``models.sources.load_model`` loaded it: memory-mapped from its
  safetensors file, so a weight occupies memory only while it is read.
* The module being worked on (one decoder layer; the embedding while layer 0's inputs are captured;
  the final norm and head while DWR scores a candidate) gets a copy of its parameters and buffers
  on the device, in float32 where they were float16 or bfloat16 (``fetch``). The loaded tensors
  are never written, so memory-mapped pages stay clean file pages that the kernel may drop,
  rather than private copies that stay resident.
* Afterwards the module either gets its original tensors back (``borrowed``: it was only read),
  keeps its result on the CPU in its loaded dtype (``store``), or drops its tensors (``release``:
  a job that writes its results elsewhere no longer needs the layer).
* The calibration activations between layers stay on the device or on the CPU (``OFFLOADS``):
  with ``cpu`` each batch is copied to the device for one layer's forward pass and its output
  copied back, one copy each way per batch and layer.
* An evaluation (``PLACEMENTS``) either moves the whole model to the device, or keeps it on the CPU
  and lends each decoder layer to the device for its part of every forward pass (``streamed``):
  the device then holds the embedding, the final norm and head, one layer and the batch's
  activations, whatever the model's size, at the price of copying every layer to the device once
  per forward pass (a batch).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import nn

from ptqrepro.errors import PtqError
from ptqrepro.models.adapters import architecture_of, decoder_layers, modules_after_layers, modules_before_layers

OFFLOADS = ("device", "cpu")
"""Where calibration activations are kept: on the compute device, or on the CPU."""


def check_offload(offload: str) -> str:
    """``offload`` itself when it is one of ``OFFLOADS``, else a PtqError naming the choices."""
    if offload not in OFFLOADS:
        raise PtqError(f"unknown offload {offload!r}: expected {' or '.join(OFFLOADS)}")
    return offload


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of ``module`` (shared ones once)."""
    return itertools.chain(module.parameters(), module.buffers())


def fetch(module: nn.Module, device: str, copy: bool = True, widen: bool = True) -> None:
    """Put every parameter and buffer of ``module`` on ``device``, with ``widen`` floating ones in at
    least float32 (float16 and bfloat16 become float32; float64 stays): as a copy, so that the
    tensors it had are never written (a memory-mapped weight stays clean), or with ``copy=False``
    as the same tensor where it already is so (to be only read)."""
    for tensor in _tensors(module):
        dtype = torch.promote_types(tensor.dtype, torch.float32) if widen and tensor.is_floating_point() else tensor.dtype
        tensor.data = tensor.data.to(device=device, dtype=dtype, copy=copy)


def store(module: nn.Module, dtype: torch.dtype) -> None:
    """Move ``module``'s floating parameters to the CPU as ``dtype``, its other parameters and its
    buffers to the CPU as they are (no copy where a tensor already is so)."""
    for parameter in module.parameters():
        parameter.data = parameter.data.to(device="cpu", dtype=dtype if parameter.is_floating_point() else None)
    for buffer in module.buffers():
        buffer.data = buffer.data.to(device="cpu")


def release(module: nn.Module) -> None:
    """Free ``module``'s parameters and buffers (they become shapes without storage, on ``meta``):
    the module can no longer compute."""
    module.to("meta")


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (float32 for a module without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _lend(modules: list[nn.Module], device: str, copy: bool, widen: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``fetch`` each of ``modules``; returns what ``_give_back`` needs to undo it."""
    originals = [(tensor, tensor.data) for module in modules for tensor in _tensors(module)]
    for module in modules:
        fetch(module, device, copy=copy, widen=widen)
    return originals


def _give_back(originals: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every tensor of ``originals`` points at its original data again; nothing is copied back."""
    for tensor, data in originals:
        tensor.data = data


@contextlib.contextmanager
def borrowed(modules: list[nn.Module], device: str, widen: bool = True):
    """Inside the block, ``modules`` compute on ``device``, with ``widen`` in at least float32
    (``fetch`` without a copy where a tensor already is so: they must only be read meanwhile);
    afterwards each parameter and buffer is its original tensor again, with nothing copied back."""
    originals = []
    try:
        originals = _lend(modules, device, copy=False, widen=widen)
        yield
    finally:
        _give_back(originals)


PLACEMENTS = ("auto", "whole", "layers")
"""Where an evaluation keeps the model: ``whole`` on the device; ``layers`` on the CPU, each decoder
layer lent to the device in turn (``streamed``); ``auto``: ``whole`` where it fits (``choose_placement``)."""

WHOLE_MODEL_SHARE = 0.8
"""``auto`` puts the whole model on a GPU when its parameters and buffers take at most this share of
the GPU's free memory (the rest is left to a batch's activations and logits)."""


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (shared ones once)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in _tensors(model))


def choose_placement(placement: str, model: nn.Module, device: str) -> str:
    """``whole`` or ``layers``: ``placement`` itself, or for ``auto`` ``whole`` on the CPU (where
    nothing moves) and on a GPU whose free memory holds the model (``WHOLE_MODEL_SHARE``), else
    ``layers``. An unknown placement is a PtqError naming the choices."""
    if placement not in PLACEMENTS:
        raise PtqError(f"unknown placement {placement!r}: expected {', '.join(PLACEMENTS)}")
    if placement != "auto":
        return placement
    if not device.startswith("cuda"):
        return "whole"
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return "whole" if model_bytes(model) <= WHOLE_MODEL_SHARE * free else "layers"


@contextlib.contextmanager
def streamed(resident: list[nn.Module], layers: nn.ModuleList, device: str):
    """Inside the block, every forward pass computes on ``device`` holding one of ``layers`` there at
    a time: the ``resident`` modules (those before and after the layers) stay on the device for the
    whole block; each layer gets a copy of its tensors on the device, in their own dtypes, when its
    forward pass starts (a forward pre-hook) and its own tensors back when it ends (a forward hook).
    Afterwards every module has its original tensors; the loaded model is never written."""
    lent: dict[int, list] = {}

    def lend(layer: nn.Module, _args) -> None:
        lent[id(layer)] = _lend([layer], device, copy=True, widen=False)

    def give_back(layer: nn.Module, _args, _output) -> None:
        _give_back(lent.pop(id(layer)))

    hooks = []
    try:
        with borrowed(resident, device, widen=False):
            for layer in layers:
                hooks += [layer.register_forward_pre_hook(lend), layer.register_forward_hook(give_back)]
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for originals in lent.values():
            _give_back(originals)


@contextlib.contextmanager
def placed_for_evaluation(model: nn.Module, device: str, placement: str):
    """Inside the block, ``model`` computes its forward passes on ``device``, placed as
    ``choose_placement`` decides (the block gets ``whole`` or ``layers``): ``whole`` moves the model
    there (for good: an evaluation job ends with it); ``layers`` streams its decoder layers
    (``streamed``), after checking that the architecture's declared modules hold every tensor."""
    chosen = choose_placement(placement, model, device)
    if chosen == "whole":
        model.to(device)
        yield chosen
        return
    arch = architecture_of(model)
    resident = modules_before_layers(model, arch) + modules_after_layers(model, arch)
    layers = decoder_layers(model, arch)
    declared = {id(tensor) for module in [*resident, layers] for tensor in _tensors(module)}
    undeclared = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
                  if id(tensor) not in declared]
    if undeclared:
        raise PtqError(f"placement 'layers': {arch.family} declares no module holding {', '.join(undeclared[:3])}"
                       f"{' ...' if len(undeclared) > 3 else ''} (models/adapters.py, before_layers/after_layers)")
    with streamed(resident, layers, device):
        yield chosen
