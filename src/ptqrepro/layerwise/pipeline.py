"""Sequential, layer-by-layer application of a recipe (docs/methods.md#decisions, "Which activations calibrate a layer").

1. Capture the inputs of decoder layer 0 on the calibration windows (a pre-hook on layer 0
   records them and stops the forward pass; only the modules before layer 0 visit the device).
2. For each decoder layer: give it a copy on the device, in float32 where it was loaded in
   float16 or bfloat16 (``placement.fetch``); if a step needs statistics, run the captured inputs
   through it once and accumulate each linear's input statistics (channel abs-max and abs-means,
   and the Gram matrix X^T X when a step needs it), recording the calls of the submodules a step
   runs again (``Step.inspected_modules``: AWQ's block loss reruns the attention and MLP blocks,
   ``module_output``); apply the recipe's transform steps in order,
   then its quantizer and refinements (with GPTQ's ``true_sequential``, group by group,
   re-collecting the statistics of each group on the partly quantized layer); write the quantized
   weights (plus any low-rank correction, merged) into the layer; move its codes and records to
   the CPU; the next layer's inputs are, for a ``Recipe.sequential`` recipe (GPTQ, MagR), the
   quantized layer's outputs, computed batch by batch in place of the captured inputs (the GPTQ
   reference's loop), and otherwise the float layer's outputs from the statistics pass (AWQ,
   SmoothQuant and L2QER calibrate on the float model's activations, as their references do: one
   forward pass per layer instead of two); then return the layer to the CPU in its loaded dtype,
   or free it (``release_layers``: a job that only needs the returned codes). With per-layer
   checkpoints (``checkpoint.LayerCheckpoints``) each finished layer is saved, and a rerun restores
   the saved layers instead of quantizing them (their weights, then the next layer's inputs as
   above: the float layer's outputs are computed before its saved weights are written).

Peak device memory is one decoder layer (plus the copies and statistics its steps make)
plus the calibration activations (one set, and one batch's outputs; two sets for a recipe that
calibrates on the float model; AWQ's block loss also keeps the attention and MLP blocks' inputs and
two sets of a block's outputs, the float one and a candidate's), or, with ``offload="cpu"``, one batch of them: the activations
then stay on the CPU and each batch visits the device for one layer's forward pass. The loaded
model is never written (memory-mapped weights stay clean), and nothing but the layer at work, the
activations and the statistics stays on the device. A recipe whose steps need no statistics (RTN)
skips the forward passes: its result does not depend on them.
Calibration runs with float activations; activation quantization applies at evaluation.

The forward passes run in the calibration's compute dtype (``LayerInputs.dtype``): float32, or
under autocast with bfloat16/float16 matrix products (the GPTQ reference runs its calibration in
float16 on the GPU); the hidden states between layers, the statistics (Gram matrices included) and
every method's arithmetic stay float32, whatever dtype the model was loaded in.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import nn

from ptqrepro.export.artifact import Artifact
from ptqrepro.layerwise.checkpoint import LayerCheckpoints
from ptqrepro.formats import QuantizedWeight
from ptqrepro.formats.lowrank import QuantizedLowRank
from ptqrepro.models.adapters import (
    Architecture,
    architecture_of,
    decoder_layers,
    layer_linears,
    modules_before_layers,
)
from ptqrepro.layerwise.placement import borrowed, check_offload, fetch, parameter_dtype, release, store
from ptqrepro.recipe.recipes import Recipe
from ptqrepro.layerwise.statistics import collect_input_statistics, relative_output_error
from ptqrepro.recipe.steps import LayerContext


class _StopForward(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded."""


@dataclass
class LayerInputs:
    """Hidden states entering the current decoder layer, one tensor per calibration batch, kept on
    the compute ``device`` or on the CPU (``offload``); each batch's other layer arguments (position
    ids and embeddings, mask) stay on the device."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    dtype: torch.dtype = torch.float32
    """The forward passes' compute dtype (``forward_precision``)."""
    device: str = "cpu"
    """Where the forward passes compute."""
    offload: str = "device"
    """Where ``hidden`` is kept: ``device`` or ``cpu`` (``placement.OFFLOADS``)."""

    @property
    def home(self) -> str:
        """The device that keeps the hidden states."""
        return "cpu" if self.offload == "cpu" else self.device


def forward_precision(inputs: LayerInputs):
    """The context a forward pass on ``inputs`` runs in: nothing for float32, else autocast to
    ``inputs.dtype`` on the compute device (linear layers and attention in that dtype)."""
    if inputs.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(inputs.device).type, dtype=inputs.dtype)


@dataclass
class QuantizationResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    corrections: dict[str, QuantizedLowRank] = field(default_factory=dict)  # LQER's terms
    float_parameters: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. smoothed norms
    records: list[dict] = field(default_factory=list)

    def stored_bits(self) -> int:
        return sum(w.stored_bits() for w in self.quantized.values()) + sum(
            c.stored_bits() for c in self.corrections.values()
        )

    def bits_per_weight(self) -> float | None:
        """Stored bits (codes, their parameters, low-rank terms) per weight of the quantized linears."""
        numel = sum(w.codes.numel() for w in self.quantized.values())
        return round(self.stored_bits() / numel, 4) if numel else None


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, arch: Architecture, calibration: torch.Tensor, device: str, batch_size: int,
    dtype: torch.dtype = torch.float32, offload: str = "device",
) -> LayerInputs:
    """Run the modules before the first decoder layer on ``device`` (in at least float32, borrowed
    for the capture) and record that layer's inputs, kept where ``offload`` says; later forward
    passes on them compute in ``dtype``."""
    layers = decoder_layers(model, arch)
    captured = LayerInputs(hidden=[], kwargs=[], dtype=dtype, device=device, offload=check_offload(offload))

    def record(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.to(captured.home))
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with borrowed(modules_before_layers(model, arch), device):
            for batch in calibration.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def layer_output(layer: nn.Module, inputs: LayerInputs, batch: int) -> torch.Tensor:
    """The output of ``layer`` (on the compute device) on calibration batch ``batch`` of ``inputs``,
    on the compute device."""
    with forward_precision(inputs):
        out = layer(inputs.hidden[batch].to(inputs.device), **inputs.kwargs[batch])
    return out[0] if isinstance(out, tuple) else out


def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """The outputs of ``layer`` on every calibration batch of ``inputs``, kept where ``inputs``
    keeps its hidden states."""
    outputs = []
    observe(layer, inputs, outputs)
    return outputs


def advance(layer: nn.Module, inputs: LayerInputs) -> None:
    """Replace the hidden states of ``inputs`` by ``layer``'s outputs, batch by batch, so that at
    most one batch's outputs exist beside them."""
    for batch in range(len(inputs.hidden)):
        inputs.hidden[batch] = layer_output(layer, inputs, batch).to(inputs.home)


def observe(layer: nn.Module, inputs: LayerInputs, outputs: list[torch.Tensor] | None = None) -> None:
    """Run ``layer`` on every calibration batch of ``inputs`` (for the hooks that collect
    statistics), appending its outputs to ``outputs`` (kept where ``inputs`` keeps its hidden
    states) if given, else keeping nothing."""
    for batch in range(len(inputs.hidden)):
        out = layer_output(layer, inputs, batch)
        if outputs is not None:
            outputs.append(out.to(inputs.home))


@contextlib.contextmanager
def recording_inputs(layer: nn.Module, calls: dict[str, list[tuple[tuple, dict]]], home: str):
    """While inside, append the ``(args, kwargs)`` of every call of each submodule of ``layer``
    named in ``calls`` to its list, their tensors kept on ``home`` (the calibration activations'
    place)."""

    def hook_for(recorded):
        def hook(_module, args, kwargs):
            recorded.append((tuple(_moved(a, home) for a in args), {k: _moved(v, home) for k, v in kwargs.items()}))

        return hook

    handles = [layer.get_submodule(name).register_forward_pre_hook(hook_for(recorded), with_kwargs=True)
               for name, recorded in calls.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _moved(value, device: str):
    """``value`` on ``device`` if it is a tensor, else itself."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def module_output(
    layer: nn.Module, linears: dict[str, nn.Linear], calls: dict[str, list[tuple[tuple, dict]]],
    inputs: LayerInputs, module: str, weights: dict[str, torch.Tensor],
) -> list[torch.Tensor]:
    """The float32 outputs of ``layer``'s submodule ``module`` on its recorded calibration calls
    (``recording_inputs``), one per batch, kept where ``inputs`` keeps its hidden states, computed
    as the calibration forward passes are
    (``forward_precision``), with the linears named in ``weights`` given those weights for the call
    and restored after it (``steps.LayerContext.module_output``)."""
    submodule = layer.get_submodule(module)
    saved = {name: linears[name].weight.data for name in weights}
    outputs = []
    try:
        for name, weight in weights.items():
            linears[name].weight.data = weight.to(saved[name].device, saved[name].dtype)
        for args, kwargs in calls[module]:
            with forward_precision(inputs):
                out = submodule(*(_moved(a, inputs.device) for a in args),
                                **{k: _moved(v, inputs.device) for k, v in kwargs.items()})
            outputs.append((out[0] if isinstance(out, tuple) else out).float().to(inputs.home))
    finally:
        for name, weight in saved.items():
            linears[name].weight.data = weight
    return outputs


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calibration: torch.Tensor,
    device: str = "cpu",
    batch_size: int = 8,
    log: Callable[[str], None] = lambda message: None,
    dtype: torch.dtype = torch.float32,
    checkpoints: LayerCheckpoints | None = None,
    offload: str = "device",
    release_layers: bool = False,
) -> QuantizationResult:
    """Apply ``recipe`` to ``model`` layer by layer, with calibration forward passes in ``dtype`` and
    the activations between layers kept where ``offload`` says; return the codes and per-linear
    records, on the CPU. Each finished layer is written back into ``model`` in its loaded dtype, or,
    with ``release_layers``, freed (the model can no longer compute afterwards). With
    ``checkpoints``, every finished layer is saved there, and the layers already there are restored
    instead of quantized again (``checkpoint`` module: the result is the same as an uninterrupted
    run's)."""
    check_offload(offload)
    result = QuantizationResult()
    if not recipe.steps:
        return result
    arch = architecture_of(model)
    layers = decoder_layers(model, arch)
    inputs = capture_layer_inputs(model, arch, calibration, device, batch_size, dtype, offload) if recipe.needs_stats else None
    float_inputs = inputs is not None and not recipe.sequential
    restorable = checkpoints.finished() if checkpoints is not None else 0
    for index, layer in enumerate(layers):
        started = time.perf_counter()
        loaded_dtype = parameter_dtype(layer)
        fetch(layer, device)
        float_outputs = [] if float_inputs else None
        if index < restorable:
            if float_inputs:
                float_outputs = run_layer(layer, inputs)
            done = _restore_layer(model, checkpoints.load(index))
            action = f"restored from {checkpoints.folder}"
        else:
            done = _on_cpu(_quantize_layer(index, layer, arch, recipe, inputs, float_outputs))
            if checkpoints is not None:
                checkpoints.save(index, Artifact(done.quantized, done.corrections, done.float_parameters,
                                                 {"layer": index, "records": done.records}))
            action = recipe.method
        result.quantized.update(done.quantized)
        result.corrections.update(done.corrections)
        result.float_parameters.update(done.float_parameters)
        result.records.extend(done.records)
        if float_inputs:
            inputs.hidden = float_outputs
        elif inputs is not None:
            advance(layer, inputs)
        if release_layers:
            release(layer)
        else:
            store(layer, loaded_dtype)
        log(f"layer {index}: {action} in {time.perf_counter() - started:.1f}s")
    return result


def _on_cpu(done: QuantizationResult) -> QuantizationResult:
    """``done`` with its codes, parameters and low-rank terms moved to the CPU."""
    return QuantizationResult(
        quantized={name: weight.to("cpu") for name, weight in done.quantized.items()},
        corrections={name: term.to("cpu") for name, term in done.corrections.items()},
        float_parameters=done.float_parameters,
        records=done.records,
    )


def effective_weight(weight: QuantizedWeight, correction: QuantizedLowRank | None, device) -> torch.Tensor:
    """The float weight a quantized linear computes with: Q(W), plus LQER's low-rank term A B."""
    effective = weight.dequantize().to(device)
    if correction is not None:
        effective += correction.weight_delta().to(effective.device)
    return effective


def _quantize_layer(
    index: int, layer: nn.Module, arch: Architecture, recipe: Recipe, inputs: LayerInputs | None,
    float_outputs: list[torch.Tensor] | None = None,
) -> QuantizationResult:
    """Run the recipe's steps on one decoder layer (on its device) and write the effective
    weights into it; return that layer's codes, terms, changed parameters and records. The
    statistics pass runs the layer before any step changes it, appending its (float) outputs to
    ``float_outputs`` if given."""
    done = QuantizationResult()
    linears = layer_linears(layer, arch)
    module_inputs: dict[str, list[tuple[tuple, dict]]] = {
        module: [] for module in (recipe.inspected_modules(arch) if inputs else ())
    }

    def statistics_pass() -> None:
        with recording_inputs(layer, module_inputs, inputs.home):
            observe(layer, inputs, float_outputs)

    context = LayerContext(
        index=index, prefix=f"{arch.layers}.{index}", layer=layer, arch=arch, linears=linears,
        weight_format=recipe.weight,
        stats=collect_input_statistics(statistics_pass, linears, recipe.needs_gram) if inputs else None,
        original={name: linear.weight.data.float().clone() for name, linear in linears.items()},
        module_output=partial(module_output, layer, linears, module_inputs, inputs) if module_inputs else None,
    )
    for step in recipe.transforms:
        step.apply(context)
    sequence = arch.sequential_groups if getattr(recipe.quantizer, "true_sequential", False) else (arch.linears,)
    for position, names in enumerate(sequence):
        if position > 0 and inputs is not None:
            context.stats.update(
                collect_input_statistics(lambda: observe(layer, inputs), {n: linears[n] for n in names}, recipe.needs_gram)
            )
        before = {name: linears[name].weight.data.clone() for name in names}
        recipe.quantizer.quantize(context, names)
        for step in recipe.refinements:
            step.refine(context, names)
        for name in names:
            linear = linears[name]
            correction = context.corrections.get(name)
            linear.weight.data.copy_(effective_weight(context.quantized[name], correction, linear.weight.device))
            if correction is not None:
                done.corrections[context.qualified(name)] = correction
            done.quantized[context.qualified(name)] = context.quantized[name]
            done.records.append(_record(context, name, before[name], linear.weight.data))
    for name in sorted(context.changed):
        done.float_parameters[context.qualified(name)] = layer.get_parameter(name).detach().cpu().clone()
    return done


def _restore_layer(model: nn.Module, checkpoint: Artifact) -> QuantizationResult:
    """Write a checkpointed layer's effective weights and changed parameters into ``model``
    (whose layer is on its device) exactly as ``_quantize_layer`` did; return its results."""
    for name, weight in checkpoint.quantized.items():
        linear = model.get_submodule(name)
        linear.weight.data.copy_(effective_weight(weight, checkpoint.corrections.get(name), linear.weight.device))
    for name, value in checkpoint.float_parameters.items():
        parameter = model.get_parameter(name)
        parameter.data.copy_(value.to(parameter.device))
    return QuantizationResult(quantized=checkpoint.quantized, corrections=checkpoint.corrections,
                              float_parameters=checkpoint.float_parameters, records=checkpoint.manifest["records"])


def _record(context: LayerContext, name: str, weight: torch.Tensor, quantized: torch.Tensor) -> dict:
    """What the quantizer and refinements did to one linear (errors of the effective weight,
    relative to the weight just before quantization)."""
    record = {
        "layer": context.index,
        "linear": name,
        "shape": list(weight.shape),
        "max_abs_weight": float(weight.abs().max()),
        "weight_rel_error": float((weight - quantized).float().norm() / weight.float().norm()),
        **context.notes.get(name, {}),
    }
    if context.stats is not None and context.stats[name].gram is not None:
        record["output_rel_error"] = relative_output_error(weight, quantized, context.stats[name].gram)
    return record
