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
    losses = []
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        losses.append(next_token_losses(model(input_ids=batch, use_cache=False).logits, batch))
    return torch.cat(losses)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu") -> tuple[dict, list[float]]:
    """``({"ppl", "nll"}, window_nll)`` of ``model`` over ``windows`` [n, seqlen]: nll is the mean
    per-token CE, ``window_nll`` each window's mean CE (nll is their mean), kept so that any
    statistic over windows (``ptqrepro.report.uncertainty``) can be computed without the model."""
    losses = window_losses(model, windows, batch_size, device)
    nll = float(losses.double().mean())
    return {"ppl": math.exp(nll), "nll": nll}, [float(loss) for loss in losses]


def windows_fingerprint(windows: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of the windows' token ids (int64, row-major): two results
    are paired window by window only when they scored the same token windows."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
