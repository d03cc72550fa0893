"""Calibration statistics of the inputs of each linear layer, accumulated over every token.

For inputs X [tokens, in] of one linear layer:

* ``gram``   G = X^T X (GPTQ's Hessian up to the factor 2/n; AWQ's and MagR's output errors),
  as costly as the layer's forward pass, so collected only when a step needs it (else None),
* ``absmax`` max_t |X_tj| per input channel (SmoothQuant's activation scale),
* ``absmean`` (1/n) sum_t |X_tj| per input channel (AWQ's activation salience),
* ``batch_absmean_max`` the largest, over calibration batches, of a batch's mean |X_tj| per input
  channel (L2QER's activation magnitude, ``statistic_profiler/scale.py`` in the LQER code).

When a scale s is folded into a layer so that its inputs become X diag(1/s), the statistics
transform exactly: G -> diag(1/s) G diag(1/s), absmax -> absmax / s, absmean -> absmean / s (and each batch's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``||X D^T||_F^2 = tr(D G D^T) = sum((D G) * D)`` for a weight error D [out, in] and
    G = X^T X: the product D G in G's dtype (a bfloat16 G halves its cost on CPUs with native
    bf16), the elementwise product and the sum in float32."""
    product = delta.to(gram.dtype) @ gram
    return product.float().mul_(delta.float()).sum()


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (W - Q)^T||_F / ||X W^T||_F`` computed from the Gram matrix ``G = X^T X``."""
    error = output_error(weight - quantized, gram)
    reference = output_error(weight, gram)
    return float(torch.sqrt(error.clamp(min=0) / reference.clamp(min=1e-30)))


def add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``G += X^T X`` in place for float32 ``G`` [in, in] and ``X`` [tokens, in], keeping G exactly
    symmetric: BLAS's symmetric rank-k update on the CPU, three blocks elsewhere."""
    if gram.device.type == "cpu" and x.device.type == "cpu":
        add_gram_syrk(gram, x)
    else:
        add_gram_blocks(gram, x)


def add_gram_syrk(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``G += X^T X`` on the CPU by ``ssyrk`` (through SciPy), which computes one triangle (half a
    full product's work), then mirrored. Read as Fortran arrays, the C-ordered G is G^T = G and X
    is X^T: ssyrk updates the lower triangle of the former (G's upper triangle) in place."""
    from scipy.linalg.blas import ssyrk

    ssyrk(1.0, x.contiguous().numpy().T, beta=1.0, c=gram.numpy().T, trans=0, lower=1, overwrite_c=1)
    upper = gram.triu(1)
    gram.triu_().add_(upper.T)


def add_gram_blocks(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``G += X^T X`` with 3/4 of a full product's work: split the columns X = [A B]; G's blocks
    are A^T A, B^T B and B^T A, the fourth is (B^T A)^T."""
    half = x.shape[1] // 2
    a, b = x[:, :half], x[:, half:]
    gram[:half, :half].addmm_(a.T, a)
    gram[half:, half:].addmm_(b.T, b)
    gram[half:, :half].addmm_(b.T, a)
    gram[:half, half:].copy_(gram[half:, :half].T)


@dataclass
class InputStatistics:
    gram: torch.Tensor | None
    absmax: torch.Tensor
    abssum: torch.Tensor
    batch_absmean_max: torch.Tensor
    tokens: int

    @classmethod
    def of(cls, x: torch.Tensor, gram: bool = True) -> "InputStatistics":
        features = x.shape[-1]
        stats = cls(
            gram=x.new_zeros((features, features), dtype=torch.float32) if gram else None,
            absmax=x.new_zeros(features, dtype=torch.float32),
            abssum=x.new_zeros(features, dtype=torch.float32),
            batch_absmean_max=x.new_zeros(features, dtype=torch.float32),
            tokens=0,
        )
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one calibration batch's inputs."""
        x = x.reshape(-1, x.shape[-1]).float()
        if self.gram is not None:
            add_gram(self.gram, x)
        magnitude = x.abs()
        torch.maximum(self.absmax, magnitude.amax(dim=0), out=self.absmax)
        batch_sum = magnitude.sum(dim=0)
        self.abssum.add_(batch_sum)
        torch.maximum(self.batch_absmean_max, batch_sum / x.shape[0], out=self.batch_absmean_max)
        self.tokens += x.shape[0]

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / self.tokens

    def divide_inputs(self, s: torch.Tensor) -> None:
        """The inputs became X diag(1/s): transform every statistic accordingly, in place."""
        inverse = 1.0 / s.float()
        if self.gram is not None:
            self.gram.mul_(inverse[:, None]).mul_(inverse[None, :])
        self.absmax.mul_(inverse)
        self.abssum.mul_(inverse)
        self.batch_absmean_max.mul_(inverse)


@torch.no_grad()
def collect_input_statistics(run_layer, linears: dict[str, nn.Linear], gram: bool = True) -> dict[str, InputStatistics]:
    """Run ``run_layer()`` once with hooks on ``linears``; return each one's input statistics
    (without the Gram matrices when ``gram`` is false).

    Linears fed the very same input tensor (q/k/v, gate/up) share one ``InputStatistics`` object,
    accumulated once.
    """
    stats: dict[str, InputStatistics] = {}
    owner_of: dict[str, str] = {}
    last = {"input": None, "owner": None}

    def hook_for(name):
        def hook(_module, args):
            x = args[0]
            if x is last["input"]:
                owner_of[name] = last["owner"]
                return
            last["input"], last["owner"] = x, name
            if name in stats:
                stats[name].add(x)
            else:
                stats[name] = InputStatistics.of(x, gram)

        return hook

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears.items()]
    try:
        run_layer()
    finally:
        last["input"] = None
        for handle in handles:
            handle.remove()
    for name, owner in owner_of.items():
        stats[name] = stats[owner]
    return stats
