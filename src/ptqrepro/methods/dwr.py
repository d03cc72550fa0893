"""DWR, discarded-weight reconstruction: the per-layer mathematics of the candidate weights.

Source: Yu, Zhou, Chen, Yang, Li, Li & Wu, "Treasures in Discarded Weights for LLM Quantization"
(AAAI 2025), Algorithm 1 and the search spaces of its ablation, as summarised in docs/papers.md#dwr.
The paper's update equations (its Eq. 4, 5, 10) are not available; this module implements the
reading of docs/papers.md#dwr-our-reading-of-the-update. This is an independent implementation.

**From the paper.** The discarded weights of a quantized layer are ``D = W - Ŵ_q``, ``Ŵ_q`` the
dequantized weight. For each transformer block, every linear of the block is updated with the same
rank k, taken from a pre-designed set, and the k with the lowest calibration perplexity is kept if
it beats the current model (k = 0 is "no change"). Search spaces: an SVD of D, and a random
orthogonal basis (the ablation reports that even random ones help).

**This reading** (docs/papers.md#dwr-our-reading-of-the-update). The rank-k candidate ``D_k`` is added and the sum re-rounded onto
the base model's grid, with its parameters (scales and zero points, or MX shared exponents)
unchanged:

    Ŵ_k = Q_params(Ŵ_q + D_k),

so a candidate has the same format, storage and inference cost as the base model. At k = 0 the
codes are the base codes bit for bit. The candidates of a layer ``D`` [out, in], with
``r = min(out, in)`` and ``0 <= k <= r``:

* ``"svd"``: ``D_k = U_k Σ_k V_kᵀ``, the best rank-k approximation of D (Eckart–Young), from
  ``lqer.truncated_svd`` (float64 eigendecomposition of the smaller Gram matrix).
* ``"random"``: the projection of D onto the first k columns of a Haar-random orthonormal basis
  ``P`` [r, r] of the smaller of D's two spaces: ``D_k = D P_k P_kᵀ`` (rows of D projected onto a
  k-dimensional subspace of the input space) when ``in <= out``, ``D_k = P_k P_kᵀ D`` (columns
  projected in the output space) when ``out < in``. ``P`` is the Q factor of the QR decomposition
  of an r × r standard Gaussian matrix drawn from ``torch.Generator().manual_seed(seed)`` in
  float64, its columns' signs fixed by ``sign(diag R)`` (Mezzadri 2007), so the basis depends on
  the seed and r only. The subspaces are nested in k and ``k = r`` gives D.

Both spaces are stored as factors ``D = L R`` (``L`` [out, r], ``R`` [r, in]) ordered so that
``D_k = L[:, :k] R[:k]``, together with D: one search space costs one decomposition, and a
candidate one product of out·in·min(k, r - k) multiply-adds, as ``D_k = D - L[:, k:] R[k:]`` when
``k > r / 2`` (for the paper's 7B grid k = 512, ..., 4096 on r = 4096, 2.25 times fewer than
with ``L[:, :k] R[:k]`` throughout; ``k = r`` gives D itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats.base import QuantizedWeight
from ptqrepro.methods.lqer import truncated_svd

SEARCH_SPACES = ("svd", "random")
"""The kinds of search space ``search_space`` builds."""


def discarded_weight(weight: torch.Tensor, quantized: QuantizedWeight) -> torch.Tensor:
    """``D = W - Ŵ_q`` [out, in], float32."""
    if tuple(weight.shape) != tuple(quantized.codes.shape):
        raise PtqError(
            f"DWR: weight shape {tuple(weight.shape)} differs from the quantized weight's "
            f"{tuple(quantized.codes.shape)}"
        )
    return weight.float() - quantized.dequantize()


@dataclass
class SearchSpace:
    """A layer's candidates ``D_k = left[:, :k] @ right[:k]``: ``left`` [out, r], ``right`` [r, in],
    float32, r = min(out, in), with ``discarded`` = D = ``left @ right`` [out, in]; ``kind`` is one
    of ``SEARCH_SPACES``."""

    kind: str
    left: torch.Tensor
    right: torch.Tensor
    discarded: torch.Tensor

    @property
    def max_rank(self) -> int:
        return self.left.shape[1]


def search_space(discarded: torch.Tensor, kind: str = "svd", seed: int = 0) -> SearchSpace:
    """The search space ``kind`` of the discarded weights ``discarded`` [out, in] (module
    docstring); ``seed`` chooses the random basis of ``"random"`` and is unused by ``"svd"``."""
    if kind not in SEARCH_SPACES:
        raise PtqError(f"DWR: unknown search space {kind!r}; expected one of {', '.join(SEARCH_SPACES)}")
    if discarded.dim() != 2:
        raise PtqError(f"DWR: the discarded weights must be a matrix [out, in], got shape {tuple(discarded.shape)}")
    out_features, in_features = discarded.shape
    full_rank = min(out_features, in_features)
    if kind == "svd":
        left, right = truncated_svd(discarded, full_rank)
        return SearchSpace(kind, left, right, discarded.float())
    gaussian = torch.randn(
        full_rank, full_rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    q, r = torch.linalg.qr(gaussian)
    basis = q * torch.sign(torch.diagonal(r))
    d = discarded.double()
    if in_features <= out_features:
        left, right = d @ basis, basis.T
    else:
        left, right = basis, basis.T @ d
    return SearchSpace(kind, left.float(), right.float(), discarded.float())


def discarded_at_rank(space: SearchSpace, rank: int) -> torch.Tensor:
    """The candidate ``D_k`` [out, in] of ``space`` at ``rank`` k (0..max_rank): zeros at k = 0, D at
    k = max_rank; from the smaller of the two products (module docstring)."""
    if not 0 <= rank <= space.max_rank:
        raise PtqError(f"DWR: rank must be in 0..{space.max_rank}, got {rank}")
    if rank == 0:
        return torch.zeros_like(space.discarded)
    if 2 * rank <= space.max_rank:
        return space.left[:, :rank] @ space.right[:rank]
    return space.discarded - space.left[:, rank:] @ space.right[rank:]


def reconstruct(quantized: QuantizedWeight, discarded_k: torch.Tensor) -> QuantizedWeight:
    """``Q_params(Ŵ_q + D_k)``: ``quantized``'s dequantized values plus ``discarded_k`` [out, in],
    re-encoded group by group with ``quantized``'s own parameters and format. Where ``D_k`` is
    zero the dequantized value itself is re-encoded (an IEEE sum with +0 would turn a float code
    -0 into +0), so ``D_k = 0`` returns the input codes bit for bit."""
    codes = quantized.codes
    if tuple(discarded_k.shape) != tuple(codes.shape):
        raise PtqError(
            f"DWR: discarded weights of shape {tuple(discarded_k.shape)} do not match the quantized "
            f"weight's {tuple(codes.shape)}"
        )
    out_features, in_features = codes.shape
    groups = quantized.groups
    dequantized = quantized.dequantize()
    discarded_k = discarded_k.float()
    target = torch.where(discarded_k == 0, dequantized, dequantized + discarded_k)
    params = {key: value.reshape(-1, 1) for key, value in quantized.params.items()}
    new_codes = quantized.fmt.encode(target.view(out_features * groups, in_features // groups), params)
    return QuantizedWeight(
        codes=new_codes.to(quantized.fmt.code_dtype).view(out_features, in_features),
        params=dict(quantized.params),
        fmt=quantized.fmt,
    )
