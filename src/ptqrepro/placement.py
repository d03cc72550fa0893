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
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import nn

from ptqrepro.errors import PtqError

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


def fetch(module: nn.Module, device: str, copy: bool = True) -> None:
    """Put every parameter and buffer of ``module`` on ``device``, floating ones in at least float32
    (float16 and bfloat16 become float32; float64 stays): as a copy, so that the tensors it had
    are never written (a memory-mapped weight stays clean), or with ``copy=False`` as the same
    tensor where it already is so (to be only read)."""
    for tensor in _tensors(module):
        dtype = torch.promote_types(tensor.dtype, torch.float32) if tensor.is_floating_point() else tensor.dtype
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


@contextlib.contextmanager
def borrowed(modules: list[nn.Module], device: str):
    """Inside the block, ``modules`` compute on ``device`` in at least float32 (``fetch`` without a
    copy where a tensor already is so: they must only be read meanwhile); afterwards each
    parameter and buffer is its original tensor again, with nothing copied back."""
    originals = [(tensor, tensor.data) for module in modules for tensor in _tensors(module)]
    try:
        for module in modules:
            fetch(module, device, copy=False)
        yield
    finally:
        for tensor, data in originals:
            tensor.data = data
