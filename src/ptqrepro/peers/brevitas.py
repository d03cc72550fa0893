"""Our recipes run by Brevitas (Xilinx/brevitas: the quantizers of its LLM example and its GPTQ and
MagR), stored as our artifact.

The steps are those of ``brevitas_examples.llm.main`` with the flags a user would pass for the
mirrored recipe (``plan``), called on our model and calibration windows instead of hub data:

* ``magr``: ``apply_magr(alpha, num_steps=iterations, block_name=<the decoder layers>)`` on the
  float model, before quantization (``--magr``): decoder layer by decoder layer, each on the
  outputs of the layers before it after their MagR (``main.py`` passes no block name, which hooks
  every linear of the model at once: the same order, but all Hessians in memory together);
* the weight format ``int<b>[-g<n>][-sym][-beta<β>]`` becomes the quantizers of
  ``generate_quantizers(weight_bit_width=b, weight_param_method="stats", weight_scale_precision=
  "float_scale", weight_quant_type="asym" | "sym", weight_quant_granularity="per_group" |
  "per_channel", weight_group_size=n, quantize_weight_zero_point=True)`` on every decoder-layer
  linear (``layerwise_quantize``, ``lm_head`` left in float as ours): the asymmetric min-max grid
  of ``formats.integer`` with an integer zero point; MagR's shrunk grid is the quantizer's
  ``scaling_affine_rescaling_init=β`` (scale ``β (max - min) / (2^b - 1)``, zero point
  ``round(-min / scale)``, as ours); scales and zero points are fitted by one forward pass,
  before GPTQ, as ``main.py`` does;
* ``gptq``: ``apply_gptq(act_order, block_name=<the decoder layers>)`` (``--gptq
  --gpxq-block-name``): each decoder layer on the outputs of the already quantized ones.

What Brevitas cannot express (activation quantization here, AWQ, SmoothQuant, LQER, MX formats,
GPTQ damping other than its fixed 1 %, per-group MagR) is a ``PtqError`` at planning time; what it
does differently is listed in ``PeerPlan.differences``: its GPTQ quantizes one linear at a time
(true-sequential), on group parameters fitted before the sweep (our ``groups: static``); its MagR
runs on the whole float model before any quantization and scales ``α`` per layer (see
``magr_differences``); its symmetric grid has scale ``max|w| / 2^(b-1)``.

``quantize`` converts the result to our grid: each linear's ``quant_weight()`` holds the integer
codes, the scale and the zero point (per row, or per row and group) that Brevitas computes with;
asymmetric codes are ours as they are, signed symmetric ones are shifted by ``2^(b-1)``.
"""

from __future__ import annotations

import contextlib
import os
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

GPTQ_DAMPING = 0.01
"""Brevitas's GPTQ adds 1 % of the mean Hessian diagonal, a constant of ``GPTQ.single_layer_update``."""


def quantizer_arguments(recipe: Recipe) -> dict:
    """The ``generate_quantizers`` keyword arguments of the recipe's weight format (module docstring)."""
    fmt = recipe.weight
    if not isinstance(fmt, IntFormat):
        raise PtqError(f"brevitas: recipe {recipe.name!r}: weight format {fmt.name} has no Brevitas equivalent "
                       "here (integer grids only)")
    if recipe.act is not None:
        raise PtqError(f"brevitas: recipe {recipe.name!r}: activation quantization ({recipe.act.name}) is not "
                       "translated to Brevitas (weight-only recipes)")
    arguments = {
        "weight_bit_width": fmt.bits, "weight_param_method": "stats", "weight_scale_precision": "float_scale",
        "weight_quant_type": "sym" if fmt.symmetric else "asym",
        "weight_quant_granularity": "per_group" if fmt.group_size else "per_channel",
        "weight_group_size": fmt.group_size or 128, "quantize_weight_zero_point": True,
        # no input quantizer; generate_quantizers reads these two all the same
        "input_scale_precision": "float_scale", "input_quant_format": "int",
    }
    if fmt.shrink != 1:
        arguments["weight_kwargs"] = {"scaling_affine_rescaling_init": fmt.shrink}
    return arguments


def plan(recipe: Recipe) -> PeerPlan:
    """Brevitas's steps that run ``recipe`` (module docstring), or a PtqError naming what cannot be
    expressed."""
    quantizers = quantizer_arguments(recipe)
    steps, differences = [], []
    if recipe.weight.symmetric:
        differences.append("symmetric grid: scale max|w| / 2^(b-1), codes -2^(b-1)...2^(b-1)-1 "
                           "(ours: scale 2 max|w| / (2^b - 1))")
    for step in recipe.steps:  # transforms come before the one quantizer (recipes.recipe_from_config)
        if step.name == "magr":
            if step.group_size or recipe.weight.group_size:
                raise PtqError(f"brevitas: recipe {recipe.name!r}: Brevitas's MagR penalises whole rows, "
                               "not groups (per-group MagR)")
            steps.append(("magr", {"alpha": step.alpha if step.alpha is not None else 1e-3, "num_steps": step.iterations}))
            differences += magr_differences()
        elif step.name in ("rtn", "gptq"):
            steps.append(("quantize", quantizers))
            if step.name == "gptq":
                if step.percdamp != GPTQ_DAMPING:
                    raise PtqError(f"brevitas: recipe {recipe.name!r}: Brevitas's GPTQ damps by {GPTQ_DAMPING:g} of "
                                   f"the mean Hessian diagonal, not {step.percdamp:g}")
                steps.append(("gptq", {"act_order": step.act_order}))
                differences += gptq_differences(step, recipe.weight)
        else:
            raise PtqError(f"brevitas: recipe {recipe.name!r}: step {step.name!r} has no Brevitas equivalent "
                           "(magr, rtn and gptq have)")
    return PeerPlan(steps=steps, differences=differences)


def gptq_differences(step, fmt: IntFormat) -> list[str]:
    differences = []
    if not step.true_sequential:
        differences.append("GPTQ: true-sequential, one linear at a time on the outputs of the layer's "
                           "linears already quantized (ours: every linear on the same forward pass)")
    if fmt.group_size and step.group_mode != "static":
        differences.append("GPTQ: group parameters fitted on the original weight before the sweep "
                           f"(ours: groups {step.group_mode}, on the weight the sweep has updated)")
    return differences


def magr_differences() -> list[str]:
    """MagR in Brevitas (``brevitas.graph.magr.MagR``) iterates ``W <- prox_{α'||.||∞}(W - η (W - W₀) H)``
    with ``η = 1 / λmax(H)`` and ``α' = α λmax(H) / ||H||₁``: in our units (``Ĝ = H / λmax``,
    ``η = 1``) its penalty is ``α λmax / ||H||₁ <= α`` (ours and the authors': ``α``)."""
    return ["MagR: penalty α·λmax(H)/‖H‖₁ per layer, at most α (ours and the authors': α)",
            "MagR: every layer before any quantization, on the outputs of the layers before it after their "
            "MagR (ours: each layer just before its GPTQ, on the outputs of the layers already quantized)"]


def quantize(model: nn.Module, recipe: Recipe, input_ids: torch.Tensor) -> PeerResult:
    """Run ``recipe`` through Brevitas on ``model`` (in float32) with the calibration windows
    ``input_ids`` [n, seqlen]; returns our codes of every decoder-layer linear."""
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas_examples.common.generative.quantize import generate_quant_maps, generate_quantizers
    from brevitas_examples.llm.llm_quant import gpxq

    steps = plan(recipe)
    arch = architecture_of(model)
    names = list(decoder_linears(model, arch))  # the quantizers replace the modules themselves
    device = next(model.parameters()).device
    batches = [{"input_ids": row[None].to(device)} for row in input_ids]
    started = time.perf_counter()
    with torch.no_grad(), _on_device(gpxq, device):
        for name, arguments in steps.steps:
            if name == "magr":
                gpxq.apply_magr(model, batches, block_name=arch.layers, alpha=arguments["alpha"],
                                num_steps=arguments["num_steps"])
            elif name == "quantize":
                layer_map = generate_quant_maps(**generate_quantizers(**arguments), dtype=torch.float32, device=device,
                                                quantize_embedding=False)
                model = layerwise_quantize(model=model, compute_layer_map=layer_map, name_blacklist=UNQUANTIZED)
                model(**batches[0])  # fits the scales and zero points
            elif name == "gptq":
                gpxq.apply_gptq(model, batches, act_order=arguments["act_order"], block_name=arch.layers)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        quantized = {name: quantized_weight(model.get_submodule(name), recipe.weight) for name in names}
    return PeerResult(QuantizationResult(quantized=quantized, float_parameters={}), steps.differences, seconds)


@contextlib.contextmanager
def _on_device(gpxq, device: torch.device):
    """Brevitas's decoder-layer loop (``block_optimization``) moves each cached input to "cuda";
    send them to the model's device instead, so that it also runs on a CPU. Its progress bars (one
    per linear and step) are turned off: the job's log keeps our lines."""
    from accelerate.utils.operations import send_to_device

    with mock.patch.object(gpxq, "send_to_device", lambda tensors, _device: send_to_device(tensors, device)), \
            mock.patch.dict(os.environ, {"TQDM_DISABLE": "1"}):
        yield


def quantized_weight(linear: nn.Module, fmt: IntFormat) -> QuantizedWeight:
    """A Brevitas ``QuantLinear`` on our grid (module docstring)."""
    if not hasattr(linear, "quant_weight"):
        raise PtqError("Brevitas left a linear without a weight quantizer: it was not quantized")
    weight = linear.quant_weight()
    grouped = hasattr(weight, "group_size")
    scale = (weight.scale_ if grouped else weight.scale).detach().float()
    zero = (weight.zero_point_ if grouped else weight.zero_point).detach().float()
    rows = scale.shape[0]
    scale, zero = scale.reshape(rows, -1), zero.expand_as(scale).reshape(rows, -1)
    codes = weight.int().float()
    if weight.signed:
        codes, zero = codes + 2 ** (fmt.bits - 1), zero + 2 ** (fmt.bits - 1)
    return QuantizedWeight(codes=codes.to(fmt.code_dtype), params={"scale": scale, "zero": zero}, fmt=fmt)
