"""A quantized low-rank term beside a quantized weight: LQER's error reconstruction at inference.

LQER (Zhang et al., ICML 2024, repo README; docs/papers.md#lqer-the-method) keeps a linear's quantized weight
``Q(W)`` and adds a rank-k approximation ``A_k B_k`` of the quantization error ``Eᵀ = (W - Q(W))ᵀ``
(``A`` [in, k], ``B`` [k, out]), both stored in their own format. With an activation format
``Q_a`` the layer computes (issue 4; ``LinearFlexibleLqer.forward`` in the authors' code):

    y = Q_a(x) Q(W)ᵀ + Q_a(Q_a(x) A_k) B_k

Both factors are stored as weights of linear maps, quantized along their reduction dimension as
every weight is: ``down = Aᵀ`` [k, in] (x -> x A) and ``up = Bᵀ`` [out, k] ((xA) -> (xA) B).
Where a format's block or group is longer than the reduction dimension (an MX block of 32 on a
rank of 8), the block spans the whole dimension instead (``fit_reduction``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ptqrepro.formats import GroupedFormat, IntFormat, MXFormat, QuantizedWeight
from ptqrepro.formats.activation import quantize_activation
from ptqrepro.methods.rtn import rtn


def fit_reduction(fmt: GroupedFormat | None, length: int) -> GroupedFormat | None:
    """``fmt`` with its block or group shortened to ``length`` where it is longer."""
    if fmt is None:
        return None
    if isinstance(fmt, MXFormat) and fmt.block > length:
        return replace(fmt, block=length)
    if isinstance(fmt, IntFormat) and fmt.group_size is not None and fmt.group_size >= length:
        return replace(fmt, group_size=None)
    return fmt


@dataclass
class QuantizedLowRank:
    down: QuantizedWeight  # Aᵀ [k, in]
    up: QuantizedWeight  # Bᵀ [out, k]

    @property
    def rank(self) -> int:
        return self.down.codes.shape[0]

    def to(self, device) -> "QuantizedLowRank":
        """The same term with both factors on ``device``."""
        return QuantizedLowRank(down=self.down.to(device), up=self.up.to(device))

    def weight_delta(self) -> torch.Tensor:
        """``(A B)ᵀ`` [out, in]: what the term adds to the weight when activations stay float."""
        return self.up.dequantize() @ self.down.dequantize()

    def stored_bits(self) -> int:
        return self.down.stored_bits() + self.up.stored_bits()

    def output(self, x: torch.Tensor, act: GroupedFormat | None) -> torch.Tensor:
        """``Q_a(x A) B`` for an input ``x`` that is already ``Q_a(x)``."""
        hidden = x @ self.down.dequantize().to(device=x.device, dtype=x.dtype).T
        hidden = quantize_activation(hidden, fit_reduction(act, self.rank))
        return hidden @ self.up.dequantize().to(device=x.device, dtype=x.dtype).T


def quantize_low_rank(a: torch.Tensor, b: torch.Tensor, fmt: GroupedFormat, layer: str) -> QuantizedLowRank:
    """Store ``A`` [in, k] and ``B`` [k, out] in ``fmt`` (RTN along each one's reduction dimension)."""
    rank = a.shape[1]
    return QuantizedLowRank(
        down=rtn(a.T.contiguous(), fmt, f"{layer} (LQER A)"),
        up=rtn(b.T.contiguous(), fit_reduction(fmt, rank), f"{layer} (LQER B)"),
    )
