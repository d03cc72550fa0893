"""DWR's search over a quantized model: block by block, greedy, by calibration perplexity.

Algorithm 1 of "Treasures in Discarded Weights for LLM Quantization" (Yu et al., AAAI 2025), as
papers.md §4 quotes it, with the update this project reads from it (papers.md §7):

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

The model stays on the CPU (``placement``): a candidate's forward pass borrows one layer at a time
onto the device, runs every scoring window through it, and then the final norm and head, so the
device holds one layer, the head and two sets of the windows' hidden states (the block's inputs
and the pass's), or one batch of them with ``offload="cpu"``. On a GPU every candidate thus copies
the layers from its block on to the device once.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from ptqrepro.artifact import Artifact
from ptqrepro.checkpoint import LayerCheckpoints
from ptqrepro.errors import PtqError
from ptqrepro.eval.perplexity import next_token_losses
from ptqrepro.formats import QuantizedWeight
from ptqrepro.methods.dwr import discarded_at_rank, discarded_weight, reconstruct, search_space
from ptqrepro.models.adapters import architecture_of, decoder_layers, modules_after_layers
from ptqrepro.pipeline import LayerInputs, advance, capture_layer_inputs, forward_precision
from ptqrepro.placement import borrowed
from ptqrepro.recipes import DwrSettings


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


@torch.no_grad()
def _perplexity_from(layers, first: int, head: list[nn.Module], inputs: LayerInputs, windows: list[torch.Tensor]) -> float:
    """Calibration perplexity of the model's layers ``first..`` and head on the hidden states entering
    ``first``, layer by layer on the device (``inputs`` is left as it was)."""
    hidden = replace(inputs, hidden=list(inputs.hidden))
    for layer in layers[first:]:
        with borrowed([layer], inputs.device):
            advance(layer, hidden)
    losses = []
    with borrowed(head, inputs.device), forward_precision(inputs):
        for batch, ids in enumerate(windows):
            logits = hidden.hidden[batch].to(inputs.device)
            for module in head:
                logits = module(logits)
            losses.append(next_token_losses(logits, ids))
    return math.exp(float(torch.cat(losses).double().mean()))


def _set_weight(model: nn.Module, name: str, weight: QuantizedWeight) -> None:
    linear = model.get_submodule(name)
    linear.weight.data.copy_(weight.dequantize().to(linear.weight.device, linear.weight.dtype))


@torch.no_grad()
def search_model(
    model: nn.Module,
    artifact: Artifact,
    originals: dict[str, torch.Tensor],
    calibration: torch.Tensor,
    settings: DwrSettings,
    device: str = "cpu",
    batch_size: int = 8,
    log: Callable[[str], None] = lambda message: None,
    dtype: torch.dtype = torch.float32,
    checkpoints: LayerCheckpoints | None = None,
    offload: str = "device",
) -> ReconstructionResult:
    """Run DWR on ``model`` (on the CPU), which already carries ``artifact`` (weights, activation
    quantization, low-rank terms); ``originals`` are the float weights W of its quantized linears.
    Forward passes compute on ``device`` in ``dtype`` (``pipeline.forward_precision``), the
    calibration activations kept where ``offload`` says. With ``checkpoints``, every searched
    block is saved there and the blocks already there are restored instead of searched again."""
    if artifact.float_parameters:
        raise PtqError(
            f"DWR needs the base model's float weights in the quantized model's basis, but base recipe "
            f"{artifact.manifest.get('recipe')!r} folded scales into other parameters "
            f"({next(iter(artifact.float_parameters))}, ...): use a base without smoothquant/awq"
        )
    arch = architecture_of(model)
    layers = decoder_layers(model, arch)
    head = modules_after_layers(model, arch)
    if settings.windows is not None:
        calibration = calibration[: settings.windows]
    windows = list(calibration.split(batch_size))
    inputs = capture_layer_inputs(model, arch, calibration, device, batch_size, dtype, offload)
    result = ReconstructionResult(quantized=dict(artifact.quantized))
    current = _perplexity_from(layers, 0, head, inputs, windows)
    result.initial_ppl = current
    log(f"calibration perplexity of the base model: {current:.4f}")
    restorable = checkpoints.finished() if checkpoints is not None else 0
    for index, layer in enumerate(layers):
        if index < restorable:
            block, current = _restore_block(model, checkpoints.load(index), result)
            log(f"layer {index}: restored from {checkpoints.folder}, k={block.chosen}, calibration ppl {current:.4f}")
        else:
            names = [name for name in result.quantized if name.startswith(f"{arch.layers}.{index}.")]
            block, current = _search_block(model, layers, index, names, head, inputs, windows, originals, settings,
                                           result, current)
            if checkpoints is not None:
                checkpoints.save(index, Artifact({name: result.quantized[name] for name in names}, {}, {},
                                                 {"block": asdict(block), "ppl": current}))
            log(f"layer {index}: k={block.chosen}, calibration ppl {current:.4f} "
                f"({', '.join(f'{k}: {p:.4f}' for k, p in block.curve.items())}) in {block.seconds:.1f}s")
        result.blocks.append(block)
        with borrowed([layer], device):
            advance(layer, inputs)
    result.final_ppl = current
    return result


def _search_block(model, layers, index, names, head, inputs, windows, originals, settings, result, current):
    """Algorithm 1's step on block ``index``, whose quantized linears are ``names``: score every
    candidate rank, keep the best if it lowers the calibration perplexity ``current``
    (``result.quantized`` updated, the model carrying the kept weights); return the block's search
    and the perplexity after it."""
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
        for name in names:
            _set_weight(model, name, candidates[k][name])
        curve[k] = _perplexity_from(layers, index, head, inputs, windows)
    best = min(curve, key=lambda k: (curve[k], k))
    if curve[best] < current:
        result.quantized.update(candidates[best])
        current = curve[best]
    else:
        best = 0
    for name in names:
        _set_weight(model, name, result.quantized[name])
    return BlockSearch(layer=index, curve=curve, chosen=best, seconds=round(time.perf_counter() - started, 3)), current


def _restore_block(model, checkpoint: Artifact, result: ReconstructionResult) -> tuple[BlockSearch, float]:
    """A checkpointed block: its kept weights into ``model`` and ``result``; its search and the
    calibration perplexity after it."""
    for name, weight in checkpoint.quantized.items():
        result.quantized[name] = weight
        _set_weight(model, name, weight)
    block = dict(checkpoint.manifest["block"])
    block["curve"] = {int(k): value for k, value in block["curve"].items()}
    return BlockSearch(**block), checkpoint.manifest["ppl"]
