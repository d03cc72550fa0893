"""Perplexity with the GPTQ protocol (IST-DASLab/gptq ``llama.py``, ``llama_eval``).

Each window of ``seqlen`` tokens is scored independently (no context carried over); the
window's negative log-likelihood is its mean next-token cross-entropy times ``seqlen``, and

    ppl = exp( sum_i NLL_i / (n_windows * seqlen) ) = exp( mean_i CE_i ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each window [batch, seqlen] from its logits (float32)."""
    shifted = logits[:, :-1, :].float()
    targets = input_ids[:, 1:].to(logits.device)
    per_token = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return per_token.view(input_ids.shape[0], -1).mean(dim=1).cpu()


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (float32, one value per window)."""
    losses = []
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        losses.append(next_token_losses(model(input_ids=batch, use_cache=False).logits, batch))
    return torch.cat(losses)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu") -> dict:
    """``{"ppl", "nll"}`` of ``model`` over ``windows`` [n, seqlen]; nll is the mean per-token CE."""
    losses = window_losses(model, windows, batch_size, device)
    nll = float(losses.double().mean())
    return {"ppl": math.exp(nll), "nll": nll}
