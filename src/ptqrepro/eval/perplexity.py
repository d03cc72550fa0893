"""Perplexity with the GPTQ protocol (IST-DASLab/gptq ``llama.py``, ``llama_eval``).

Each window of ``seqlen`` tokens is scored independently (no context carried over); the
window's negative log-likelihood is its mean next-token cross-entropy times ``seqlen``, and

    ppl = exp( sum_i NLL_i / (n_windows * seqlen) ) = exp( mean_i CE_i ).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ptqrepro.eval.divergence import FloatReference, divergence_from_reference


CHUNK_ELEMENTS = 1 << 22
"""Logits converted to float32 at a time (16 MB): a whole batch's float32 copy (400 MB for 4
windows of 512 tokens over a 49k vocabulary) costs more in fresh memory pages than in arithmetic."""


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each window [batch, seqlen] from its logits, in float32,
    a few positions of one window at a time."""
    batch, positions = input_ids.shape[0], input_ids.shape[1] - 1
    targets = input_ids[:, 1:].to(logits.device)
    per_token = torch.empty(batch, positions, dtype=torch.float32, device=logits.device)
    rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    for window in range(batch):
        for start in range(0, positions, rows):
            end = min(start + rows, positions)
            per_token[window, start:end] = F.cross_entropy(
                logits[window, start:end].float(), targets[window, start:end], reduction="none")
    return per_token.mean(dim=1).cpu()


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (float32, one value per window)."""
    return window_scores(model, windows, batch_size, device)["window_nll"]


@torch.no_grad()
def window_scores(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str,
                  reference: FloatReference | None = None) -> dict[str, torch.Tensor]:
    """Per window: ``window_nll`` its mean next-token cross-entropy (float32) and, against the float
    model's ``reference`` (``eval.divergence``) from the same forward pass and log-softmax,
    ``window_kld`` its mean token KL(float || model) and ``window_flips`` its share of top-1 flips."""
    scores: dict[str, list] = {"window_nll": [], "window_kld": [], "window_flips": []}
    done = 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        if reference is None:
            scores["window_nll"].append(next_token_losses(logits, batch))
        else:
            rows = slice(done, done + batch.shape[0])
            for name, values in zip(scores, divergence_from_reference(
                    logits, batch, reference.ids[rows], reference.logprobs[rows], reference.rest[rows])):
                scores[name].append(values)
        done += batch.shape[0]
    return {name: torch.cat(values) for name, values in scores.items() if values}


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu",
               reference: FloatReference | None = None) -> tuple[dict, dict[str, list[float]]]:
    """``(metrics, per_window)`` of ``model`` over ``windows`` [n, seqlen]: metrics ``ppl`` and
    ``nll`` (the mean per-token CE), and with a float ``reference`` ``kld`` and ``flips`` (their
    means over windows); ``per_window`` each window's value of each (``window_nll``,
    ``window_kld``, ``window_flips``: ``window_scores``), kept so that any statistic over windows
    (``ptqrepro.report.uncertainty``) can be computed without the model."""
    scores = window_scores(model, windows, batch_size, device, reference)
    nll = float(scores["window_nll"].double().mean())
    metrics = {"ppl": math.exp(nll), "nll": nll}
    if reference is not None:
        metrics |= {"kld": float(scores["window_kld"].mean()), "flips": float(scores["window_flips"].mean())}
    return metrics, {name: [float(value) for value in values] for name, values in scores.items()}


def windows_fingerprint(windows: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of the windows' token ids (int64, row-major): two results
    are paired window by window only when they scored the same token windows."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
