"""DWR's search over a quantized model: block by block, greedy, by calibration perplexity.

Algorithm 1 of "Treasures in Discarded Weights for LLM Quantization" (Yu et al., AAAI 2025), as
docs/papers.md#dwr-what-is-known quotes it, with the update this project reads from it (docs/papers.md#dwr-our-reading-of-the-update):

    p_o <- calibration perplexity of the quantized model
    for each decoder layer (block), in order:
        for each linear: D = W - Q(W)  (the discarded weights), and its search space
        for each k of the rank grid: every linear of the block <- Q_{s,z}(Q(W) + D_k),
            re-rounded onto its fixed grid; p_k <- calibration perplexity of the whole model
        if min_k p_k < p_o: keep the best k for the block and set p_o <- p_k; else keep the block

A rank beyond a linear's largest (min(out, in)) means its full D there. The candidates stay on the base model's grid, so the format, the bits and the inference cost do
not change. A candidate's perplexity only needs the layers from the block on: the hidden states
entering the block are computed once per block (from the blocks already decided) and reused for
every candidate. The curve k -> perplexity of every block is recorded (k = 0: the block as it was).

The model stays on the CPU as loaded (``placement``) and is only read: its linears' weights are the
float weights W. A forward pass borrows one layer at a time onto the device, where the layer's
quantized linears get their current weights (the base's, the kept ones, or the candidate's),
dequantized there from their codes; it runs every scoring window through the layer, and then the
final norm and head. The device thus holds one layer, the head and two sets of the windows' hidden
states (the block's inputs and the pass's), or one batch of them with ``offload="cpu"``; the host
holds the model as loaded (memory-mapped) and the codes. On a GPU every candidate copies the layers
from its block on to the device once.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from ptqrepro.export.artifact import Artifact, install_quantized_inference
from ptqrepro.layerwise.checkpoint import LayerCheckpoints
from ptqrepro.errors import PtqError
from ptqrepro.eval.perplexity import next_token_losses
from ptqrepro.formats import QuantizedWeight
from ptqrepro.methods.dwr import discarded_at_rank, discarded_weight, reconstruct, search_space
from ptqrepro.models.adapters import architecture_of, decoder_layers, modules_after_layers
from ptqrepro.layerwise.pipeline import LayerInputs, advance, capture_layer_inputs, forward_precision
from ptqrepro.layerwise.placement import borrowed
from ptqrepro.recipe.recipes import DwrSettings


@dataclass
class BlockSearch:
    layer: int
    curve: dict[int, float]  # k -> calibration perplexity; k = 0 is the block before the search
    chosen: int
    seconds: float


@dataclass
class ReconstructionResult:
    quantized: dict[str, QuantizedWeight]
    blocks: list[BlockSearch] = field(default_factory=list)
    initial_ppl: float = math.nan
    final_ppl: float = math.nan


def linear_weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """The weights of the named linears of ``model`` as they are, without a copy: from a model that
    ``load_model`` loaded lazily and nothing writes, each stays unread in its memory-mapped file
    until the search reaches its block."""
    return {name: model.get_submodule(name).weight.detach() for name in names}


@contextlib.contextmanager
def quantized_layer(layer: nn.Module, prefix: str, weights: dict[str, QuantizedWeight], device: str):
    """Inside the block, ``layer`` (named ``prefix`` in its model) computes on ``device`` (borrowed,
    in at least float32) with each of its linears named in ``weights`` carrying that quantized
    weight, dequantized on the device from its codes (the loaded weight is not copied there);
    afterwards the layer has its own tensors again."""
    quantized = {module: weights[name] for name, module in layer.named_modules(prefix=prefix) if name in weights}
    loaded = {module: module.weight.data for module in quantized}
    try:
        for module, weight in quantized.items():
            module.weight.data = weight.to(device).dequantize()
        with borrowed([layer], device):  # the rest of the layer; the weights set above are not copied again
            yield
    finally:
        for module, data in loaded.items():
            module.weight.data = data


@torch.no_grad()
def _perplexity_from(layers, first: int, head: list[nn.Module], inputs: LayerInputs, windows: list[torch.Tensor],
                     weights: dict[str, QuantizedWeight], prefix: str) -> float:
    """Calibration perplexity of the model's layers ``first..`` (their quantized linears carrying
    ``weights``; layer i is named ``prefix.i``) and head on the hidden states entering ``first``,
    layer by layer on the device (``inputs`` is left as it was)."""
    hidden = replace(inputs, hidden=list(inputs.hidden))
    for index in range(first, len(layers)):
        with quantized_layer(layers[index], f"{prefix}.{index}", weights, inputs.device):
            advance(layers[index], hidden)
    losses = []
    with borrowed(head, inputs.device), forward_precision(inputs):
        for batch, ids in enumerate(windows):
            logits = hidden.hidden[batch].to(inputs.device)
            for module in head:
                logits = module(logits)
            losses.append(next_token_losses(logits, ids))
    return math.exp(float(torch.cat(losses).double().mean()))


@torch.no_grad()
def search_model(
    model: nn.Module,
    artifact: Artifact,
    calibration: torch.Tensor,
    settings: DwrSettings,
    device: str = "cpu",
    batch_size: int = 8,
    log: Callable[[str], None] = lambda message: None,
    dtype: torch.dtype = torch.float32,
    checkpoints: LayerCheckpoints | None = None,
    offload: str = "device",
) -> ReconstructionResult:
    """Run DWR on ``artifact``, a quantization of ``model``: the unquantized model on the CPU, whose
    linears' weights are the float weights W (it is only read; the artifact's activation
    quantization and low-rank terms are hooked in for the search and removed after it). Forward
    passes compute on ``device`` in ``dtype`` (``pipeline.forward_precision``), the calibration
    activations kept where ``offload`` says. With ``checkpoints``, every searched block is saved
    there and the blocks already there are restored instead of searched again."""
    if artifact.float_parameters:
        raise PtqError(
            f"DWR needs the base model's float weights in the quantized model's basis, but base recipe "
            f"{artifact.manifest.get('recipe')!r} folded scales into other parameters "
            f"({next(iter(artifact.float_parameters))}, ...): use a base without smoothquant/awq"
        )
    hooks = install_quantized_inference(model, artifact, device)
    try:
        return _search(model, artifact, calibration, settings, device, batch_size, log, dtype, checkpoints, offload)
    finally:
        for hook in hooks:
            hook.remove()


def _search(model, artifact, calibration, settings, device, batch_size, log, dtype, checkpoints, offload):
    """``search_model``'s Algorithm 1, block by block, on a model with the artifact's hooks."""
    arch = architecture_of(model)
    layers = decoder_layers(model, arch)
    head = modules_after_layers(model, arch)
    originals = linear_weights(model, artifact.quantized)
    if settings.windows is not None:
        calibration = calibration[: settings.windows]
    windows = list(calibration.split(batch_size))
    inputs = capture_layer_inputs(model, arch, calibration, device, batch_size, dtype, offload)
    result = ReconstructionResult(quantized=dict(artifact.quantized))
    current = _perplexity_from(layers, 0, head, inputs, windows, result.quantized, arch.layers)
    result.initial_ppl = current
    log(f"calibration perplexity of the base model: {current:.4f}")
    restorable = checkpoints.finished() if checkpoints is not None else 0
    for index, layer in enumerate(layers):
        if index < restorable:
            block, current = _restore_block(checkpoints.load(index), result)
            log(f"layer {index}: restored from {checkpoints.folder}, k={block.chosen}, calibration ppl {current:.4f}")
        else:
            names = [name for name in result.quantized if name.startswith(f"{arch.layers}.{index}.")]
            block, current = _search_block(layers, index, names, head, inputs, windows, originals, settings,
                                           result, current, arch.layers)
            if checkpoints is not None:
                checkpoints.save(index, Artifact({name: result.quantized[name] for name in names}, {}, {},
                                                 {"block": asdict(block), "ppl": current}))
            log(f"layer {index}: k={block.chosen}, calibration ppl {current:.4f} "
                f"({', '.join(f'{k}: {p:.4f}' for k, p in block.curve.items())}) in {block.seconds:.1f}s")
        result.blocks.append(block)
        with quantized_layer(layer, f"{arch.layers}.{index}", result.quantized, device):
            advance(layer, inputs)
    result.final_ppl = current
    return result


def _search_block(layers, index, names, head, inputs, windows, originals, settings, result, current, prefix):
    """Algorithm 1's step on block ``index``, whose quantized linears are ``names``: score every
    candidate rank, keep the best if it lowers the calibration perplexity ``current``
    (``result.quantized`` updated); return the block's search and the perplexity after it."""
    started = time.perf_counter()
    spaces = {
        name: search_space(discarded_weight(originals[name], result.quantized[name]), settings.space, settings.seed + index)
        for name in names
    }
    curve, candidates = {0: current}, {}
    for k in settings.ranks:
        candidates[k] = {
            name: reconstruct(result.quantized[name], discarded_at_rank(space, min(k, space.max_rank)))
            for name, space in spaces.items()
        }
        curve[k] = _perplexity_from(layers, index, head, inputs, windows, {**result.quantized, **candidates[k]}, prefix)
    best = min(curve, key=lambda k: (curve[k], k))
    if curve[best] < current:
        result.quantized.update(candidates[best])
        current = curve[best]
    else:
        best = 0
    return BlockSearch(layer=index, curve=curve, chosen=best, seconds=round(time.perf_counter() - started, 3)), current


def _restore_block(checkpoint: Artifact, result: ReconstructionResult) -> tuple[BlockSearch, float]:
    """A checkpointed block: its kept weights into ``result``; its search and the calibration
    perplexity after it."""
    result.quantized.update(checkpoint.quantized)
    block = dict(checkpoint.manifest["block"])
    block["curve"] = {int(k): value for k, value in block["curve"].items()}
    return BlockSearch(**block), checkpoint.manifest["ppl"]
