"""Our recipes run by llm-compressor (vllm-project/llm-compressor, ``oneshot``), stored as our artifact.

Translation (``plan``), step by step, with the mirrored recipe's settings:

* ``rtn``: ``QuantizationModifier``; ``gptq``: ``GPTQModifier(block_size=blocksize,
  dampening_frac=percdamp, actorder="static" if act_order else None)``; ``smoothquant``:
  ``SmoothQuantModifier(smoothing_strength=alpha)``; ``awq``: ``AWQModifier(n_grid,
  duo_scaling=False)`` (the AWQ paper's activation-only scales; llm-compressor's default also uses
  the weights), followed by the quantizer's modifier;
* the weight format ``int<b>[-g<n>][-sym]`` becomes the scheme ``QuantizationArgs(num_bits=b,
  type="int", symmetric, strategy="group" | "channel", group_size=n, observer="minmax")``: the
  same min-max grid as ``formats.integer`` (an asymmetric grid's range includes 0; a symmetric
  one has scale ``max|w| / (2^(b-1) - 1/2)``); the activation format ``int<b>`` becomes dynamic
  per-token symmetric ``input_activations``, which only acts during llm-compressor's calibration
  (the evaluation applies the recipe's own activation quantizer, ``artifact``);
* every linear of the decoder layers is quantized, ``lm_head`` is not (as ours); the sequential
  pipeline calibrates each decoder layer on the outputs of the already quantized ones, in the
  model's float32, on our calibration token ids in their order.

What the toolkit cannot express (MX formats, MagR, LQER, coordinate descent, MagR's β, true
sequential GPTQ) is a ``PtqError`` at planning time; what it does differently is listed in
``PeerPlan.differences``: GPTQ group parameters are always fitted on the original weight before
the sweep (our ``groups: static``), its AWQ ranks scales by the block output's MSE (our ``loss:
block``) and has no clip search, its SmoothQuant measures each channel's activation range.

``quantize`` converts the result to our grid: llm-compressor keeps ``weight_scale`` and a signed
``weight_zero_point`` per (row, group) and, after GPTQ, the dequantized weight (after RTN or AWQ,
the float weight the observers saw), so the codes are ``clamp(round(w / scale) + zero, qmin,
qmax) - qmin`` and our zero point is ``zero - qmin``.
"""

from __future__ import annotations

import contextlib
import time
from unittest import mock

import torch
from torch import nn

from ptqrepro.errors import PtqError
from ptqrepro.formats import QuantizedWeight
from ptqrepro.formats.integer import IntFormat
from ptqrepro.models.adapters import architecture_of, decoder_linears
from ptqrepro.peers import UNQUANTIZED, PeerPlan, PeerResult
from ptqrepro.layerwise.pipeline import QuantizationResult
from ptqrepro.recipe.recipes import Recipe

def scheme_arguments(recipe: Recipe) -> dict:
    """The ``QuantizationScheme`` keyword arguments of the recipe's weight and activation formats."""
    fmt = recipe.weight
    if not isinstance(fmt, IntFormat):
        raise PtqError(f"llm-compressor: recipe {recipe.name!r}: weight format {fmt.name} has no llm-compressor "
                       "equivalent here (integer grids only)")
    if fmt.shrink != 1:
        raise PtqError(f"llm-compressor: recipe {recipe.name!r}: MagR's shrunk grid ({fmt.name}) has no llm-compressor equivalent")
    weights = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "observer": "minmax",
               "strategy": "group" if fmt.group_size else "channel"}
    if fmt.group_size:
        weights["group_size"] = fmt.group_size
    arguments = {"targets": ["Linear"], "weights": weights}
    act = recipe.act
    if act is not None:
        if not isinstance(act, IntFormat) or act.group_size:
            raise PtqError(f"llm-compressor: recipe {recipe.name!r}: activation format {act.name} has no "
                           "llm-compressor equivalent here (per-token integer only)")
        arguments["input_activations"] = {"num_bits": act.bits, "type": "int", "symmetric": True,
                                          "strategy": "token", "dynamic": True}
    return arguments


def plan(recipe: Recipe) -> PeerPlan:
    """The llm-compressor modifiers that run ``recipe`` (module docstring), or a PtqError naming
    what cannot be expressed."""
    scheme = {"config_groups": {"group_0": scheme_arguments(recipe)}, "ignore": UNQUANTIZED}
    modifiers, differences = [], []
    for step in recipe.steps:
        if step.name == "smoothquant":
            modifiers.append(("SmoothQuantModifier", {"smoothing_strength": step.alpha}))
            differences.append("SmoothQuant: s = (max x - min x)^α / (2 max|w|)^(1-α) per channel "
                               "(ours and the reference: max|x|^α / max|w|^(1-α))")
        elif step.name == "awq":
            modifiers.append(("AWQModifier", {"n_grid": step.n_grid, "duo_scaling": False}))
            if step.loss != "block":
                differences.append("AWQ: scales ranked by the inspected block's output MSE (ours: loss linears)")
            if step.clip:
                differences.append("AWQ: no clip search in llm-compressor (ours searches clipping thresholds)")
        elif step.name == "rtn":
            modifiers.append(("QuantizationModifier", scheme))
        elif step.name == "gptq":
            if step.true_sequential:
                raise PtqError(f"llm-compressor: recipe {recipe.name!r}: true-sequential GPTQ has no llm-compressor equivalent")
            modifiers.append(("GPTQModifier", {**scheme, "block_size": step.blocksize, "dampening_frac": step.percdamp,
                                               "actorder": "static" if step.act_order else None}))
            if recipe.weight.group_size and step.group_mode != "static":
                differences.append("GPTQ: group parameters fitted on the original weight before the sweep "
                                   f"(ours: groups {step.group_mode}, on the weight the sweep has updated)")
        else:
            raise PtqError(f"llm-compressor: recipe {recipe.name!r}: step {step.name!r} has no llm-compressor equivalent "
                           "(rtn, gptq, awq and smoothquant have)")
    return PeerPlan(steps=modifiers, differences=differences)


def _modifier(name: str, arguments: dict):
    from llmcompressor import modifiers
    from llmcompressor.modifiers import quantization, transform

    for namespace in (modifiers, quantization, transform):
        if hasattr(namespace, name):
            return getattr(namespace, name)(**arguments)
    raise PtqError(f"llm-compressor has no modifier {name}")


def quantize(model: nn.Module, recipe: Recipe, input_ids: torch.Tensor) -> PeerResult:
    """Run ``recipe`` through ``oneshot`` on ``model`` (loaded from a directory with its
    config.json, in float32) with the calibration windows ``input_ids`` [n, seqlen]; returns our
    codes of every decoder-layer linear and the other parameters it changed (smoothed norms)."""
    from llmcompressor import oneshot

    steps = plan(recipe)
    linears = decoder_linears(model, architecture_of(model))
    # the parameters outside the quantized linears, to find those a transform changed (smoothed norms)
    before = {name: value.detach().clone() for name, value in model.named_parameters()
              if name.rsplit(".", 1)[0] not in linears}
    batches = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in input_ids]
    started = time.perf_counter()
    with _without_pinned_memory():
        oneshot(
            model=model, processor=_NoProcessor(), dataset=torch.utils.data.DataLoader(batches, batch_size=None),
            recipe=[_modifier(name, arguments) for name, arguments in steps.steps],
            num_calibration_samples=len(batches), max_seq_length=input_ids.shape[1],
            shuffle_calibration_samples=False, pipeline="sequential",
        )
    seconds = time.perf_counter() - started
    with torch.no_grad():
        quantized = {name: quantized_weight(linear, recipe.weight) for name, linear in linears.items()}
        float_parameters = {
            name: value.detach().clone() for name, value in model.named_parameters()
            if name in before and not torch.equal(value, before[name])
        }
    return PeerResult(QuantizationResult(quantized=quantized, float_parameters=float_parameters), steps.differences, seconds)


@contextlib.contextmanager
def _without_pinned_memory():
    """Without an accelerator, make llm-compressor's pinning of cached activations a no-op: its AWQ
    pins them for faster host-to-device copies, which a CPU-only torch refuses ("Cannot access
    accelerator device"); the values are the same either way."""
    if torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    with mock.patch.object(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None):
        yield


class _NoProcessor:
    """Stands in for a tokenizer: the calibration data is token ids already."""


def quantized_weight(linear: nn.Module, fmt: IntFormat) -> QuantizedWeight:
    """A quantized llm-compressor linear on our grid (module docstring)."""
    if not hasattr(linear, "weight_scale"):
        raise PtqError("llm-compressor left a linear without weight_scale: it was not quantized")
    weight = linear.weight.detach().float()
    scale = linear.weight_scale.detach().float()
    qmin = -(2 ** (fmt.bits - 1))
    zero = linear.weight_zero_point.detach().float() if hasattr(linear, "weight_zero_point") else torch.zeros_like(scale)
    zero = zero.expand_as(scale)
    length = weight.shape[1] // scale.shape[1]
    codes = torch.round(weight / scale.repeat_interleave(length, dim=1)) + zero.repeat_interleave(length, dim=1)
    codes = codes.clamp(qmin, -qmin - 1) - qmin
    return QuantizedWeight(codes=codes.to(fmt.code_dtype), params={"scale": scale, "zero": zero - qmin}, fmt=fmt)
