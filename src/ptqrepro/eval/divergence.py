"""How far a quantized model's next-token distributions moved from the float model's: the KL
divergence per token and the top-1 flips, against the float model's top-k log-probabilities kept
once per model, dataset and evaluation protocol (no second float forward pass per recipe).

For each scored position t (the GPTQ protocol's windows, ``eval.perplexity``) the float model's
distribution p_t and the quantized model's q_t over the vocabulary give

    KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v)),

which is also the expected rise of the next-token loss, in nats, were the text drawn from the float
model. Only the float model's ``k`` most likely tokens T_t are kept (``FloatReference``), with the
log of the mass outside them, log p_t(rest) (exact: from the whole distribution). The KL is then
computed with the rest of the vocabulary lumped in one bin:

    KL_k(p_t || q_t) = sum_{v in T_t} p_t(v) (log p_t(v) - log q_t(v))
                       + p_t(rest) (log p_t(rest) - log q_t(rest)),

with q_t(rest) = 1 - sum_{v in T_t} q_t(v) computed from the quantized model's whole distribution.
Lumping is a coarsening, so KL_k <= KL (the log-sum inequality), and the gap is
p_t(rest) · KL(p_t(· | rest) || q_t(· | rest)): the tail's own divergence weighted by its mass.
It is 0 where q_t = p_t, so the float model scores 0 against itself. The gap is not small for a
small model's flat distributions: on SmolLM2-135M (4 windows of 512 tokens, bfloat16) KL_k fell
below the exact KL by 39 / 24 / 13 / 6 / 2 % at k = 8 / 32 / 128 / 512 / 2048 for RTN INT4-g64 and
by 27 / 17 / 9 / 4 / 1 % for RTN INT3 (``benchmarks/bench_kld_topk.py``). The default k = 128
(``eval.ppl.kld_top_k``) keeps 1 kB per token.
llama.cpp's ``--kl-divergence-base`` (tools/perplexity) keeps every logit instead, which at 49k
tokens of vocabulary costs 100 kB per token.

A top-1 **flip** at t: the float model's most likely token is not a most likely token of the
quantized model (q_t of it is below q_t's maximum), so ties never count as flips. Each window keeps
its mean KL and its fraction of flips over its scored positions, beside its mean NLL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptqrepro.errors import InputError, PtqError

ROWS_PER_CHUNK_ELEMENTS = 1 << 22
"""Logits turned into float32 log-probabilities a few positions at a time (16 MB a chunk)."""


@dataclass(frozen=True)
class FloatReference:
    """The float model's ``k`` most likely next tokens at every scored position of every window:
    ``ids`` and ``logprobs`` [windows, seqlen - 1, k] (most likely first), ``rest`` [windows,
    seqlen - 1] the log of the probability outside them (-inf where k covers the vocabulary), and
    the ``windows_sha256`` of the windows scored (``perplexity.windows_fingerprint``)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor
    windows_sha256: str

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def save(self, path: str | Path, protocol: dict) -> None:
        """Write it as safetensors (ids int32), the fingerprint and ``protocol`` in its metadata."""
        from safetensors.torch import save_file

        metadata = {"windows_sha256": self.windows_sha256, **{key: str(value) for key, value in protocol.items()}}
        save_file({"ids": self.ids.to(torch.int32).contiguous(), "logprobs": self.logprobs.contiguous(),
                   "rest": self.rest.contiguous()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> FloatReference:
        """Read what ``save`` wrote; anything else is a ``PtqError``."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (OSError, SafetensorError) as error:
            raise InputError(f"--reference {path}: cannot read it ({error})") from None
        if set(tensors) != {"ids", "logprobs", "rest"} or "windows_sha256" not in metadata:
            raise PtqError(f"--reference {path}: not a file of `ptqrepro float-reference`")
        return cls(tensors["ids"].long(), tensors["logprobs"], tensors["rest"], metadata["windows_sha256"])

    def check_windows(self, fingerprint: str, path: str) -> None:
        """The reference scored the same windows as the evaluation (else a ``PtqError``)."""
        if fingerprint != self.windows_sha256:
            raise PtqError(f"--reference {path} was computed on other test windows (sha256 {self.windows_sha256}, "
                           f"these are {fingerprint}): compute it with the evaluation's protocol")


def _chunks(batch: int, positions: int, vocab: int):
    """(window, start, end) slices of a [batch, positions, vocab] logits tensor, a chunk at a time."""
    rows = max(1, ROWS_PER_CHUNK_ELEMENTS // vocab)
    for window in range(batch):
        for start in range(0, positions, rows):
            yield window, start, min(start + rows, positions)


def top_k_of_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, logprobs, rest)`` of the next-token distributions of ``logits`` [batch, seqlen, vocab]
    at the scored positions (all but the last): the ``k`` largest log-probabilities (float32) and
    the log of the mass outside them."""
    batch, positions, vocab = logits.shape[0], logits.shape[1] - 1, logits.shape[-1]
    k = min(k, vocab)
    ids = torch.empty(batch, positions, k, dtype=torch.int64)
    logprobs = torch.empty(batch, positions, k, dtype=torch.float32)
    rest = torch.empty(batch, positions, dtype=torch.float32)
    for window, start, end in _chunks(batch, positions, vocab):
        logp = F.log_softmax(logits[window, start:end].float(), dim=-1)
        top = logp.topk(k, dim=-1)
        ids[window, start:end], logprobs[window, start:end] = top.indices.cpu(), top.values.cpu()
        rest[window, start:end] = logp.scatter(-1, top.indices, -torch.inf).logsumexp(dim=-1).cpu()
    return ids, logprobs, rest


@torch.no_grad()
def float_reference(model: nn.Module, windows: torch.Tensor, k: int, batch_size: int, device: str,
                    fingerprint: str) -> FloatReference:
    """The ``FloatReference`` of ``model`` (the float model) over ``windows`` [n, seqlen]."""
    parts = []
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        parts.append(top_k_of_logits(model(input_ids=batch, use_cache=False).logits, k))
    ids, logprobs, rest = (torch.cat(tensors) for tensors in zip(*parts))
    return FloatReference(ids, logprobs, rest, fingerprint)


def divergence_from_reference(logits: torch.Tensor, input_ids: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                              rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each window's mean next-token cross-entropy (float32, bit for bit
    ``perplexity.next_token_losses``: the same log-softmax, read at the targets), mean KL_k(p || q)
    (float64) and fraction of top-1 flips, from the quantized model's ``logits`` [batch, seqlen,
    vocab] of ``input_ids`` [batch, seqlen] and the float reference's ``ids``/``logprobs`` [batch,
    seqlen - 1, k] and ``rest`` [batch, seqlen - 1] of the same windows (module docstring): one
    log-softmax per position serves all three."""
    batch, positions, vocab = logits.shape[0], logits.shape[1] - 1, logits.shape[-1]
    targets = input_ids[:, 1:].to(logits.device)
    losses = torch.empty(batch, positions, dtype=torch.float32, device=logits.device)
    kl = torch.empty(batch, positions, dtype=torch.float64)
    flips = torch.empty(batch, positions, dtype=torch.bool)
    for window, start, end in _chunks(batch, positions, vocab):
        logq = F.log_softmax(logits[window, start:end].float(), dim=-1)
        losses[window, start:end] = -logq.gather(-1, targets[window, start:end, None]).squeeze(-1)
        top = ids[window, start:end].to(logq.device)
        logq_top = logq.gather(-1, top).double().cpu()
        logq_rest = logq.scatter(-1, top, -torch.inf).logsumexp(dim=-1).double().cpu()
        logp_top, logp_rest = logprobs[window, start:end].double(), rest[window, start:end].double()
        head = (logp_top.exp() * (logp_top - logq_top)).sum(dim=-1)
        tail = torch.where(torch.isinf(logp_rest), 0.0, logp_rest.exp() * (logp_rest - logq_rest))
        kl[window, start:end] = head + tail
        flips[window, start:end] = (logq.gather(-1, top[:, :1]).squeeze(-1) < logq.max(dim=-1).values).cpu()
    return losses.mean(dim=1).cpu(), kl.mean(dim=1), flips.double().mean(dim=1)
