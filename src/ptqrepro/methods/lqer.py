"""LQER and L2QER: a rank-k correction of a quantized weight's error, computed in closed form.

Sources: Zhang, Cheng, Constantinides & Zhao, "LQER: Low-Rank Quantization Error Reconstruction
for LLMs" (ICML 2024, arXiv 2402.02446) and the authors' code ChengZhang-98/lqer
(``lqer_svd.py``, ``lqer_act.py``, ``statistic_profiler/scale.py``), as summarised in
docs/papers.md#lqer-and-l2qer. This is an independent implementation.

**Correction.** A weight W [out, in] quantized to Q(W) leaves the error ``E = W - Q(W)``. A layer
computes ``y = x Wᵀ = x Q(W)ᵀ + x Eᵀ``, and LQER replaces ``Eᵀ`` [in, out] by a product ``A B`` with
``A`` [in, k] and ``B`` [k, out], so that ``y ≈ x Q(W)ᵀ + (x A) B``:

* LQER: the truncated SVD ``Eᵀ = U Σ Vᵀ``, ``A = U_k``, ``B = Σ_k V_kᵀ``; ``A B`` is the best
  rank-k approximation of ``Eᵀ`` in the Frobenius norm (Eckart–Young).
* L2QER: the truncated SVD of ``S Eᵀ = U Σ Vᵀ`` with ``S = diag(s)``, ``A = S⁻¹ U_k``,
  ``B = Σ_k V_kᵀ``; ``S A B`` is the best rank-k approximation of ``S Eᵀ``, so the error is small
  where the inputs are large. Folding ``S⁻¹`` into ``A`` leaves no scaling at inference.

**Activation scale** (docs/papers.md#lqer-the-activation-scale, ``scale.py``): per calibration batch, the mean of ``|x_j|``
over all of the batch's tokens; ``s_j`` is the running maximum of that mean over the batches, then
``s ← clamp(s, min=1e-4)`` and ``s ← s / √(min(s) · max(s))`` (AWQ's normalisation).

**How the SVD is computed** (``truncated_svd``). For ``M`` [m, n], the eigendecomposition of the
smaller Gram matrix, in float64: ``M Mᵀ = U Σ² Uᵀ`` when ``m <= n``, then ``Σ_k V_kᵀ = U_kᵀ M``;
or ``Mᵀ M = V Σ² Vᵀ`` when ``m > n``, then ``U_k Σ_k = M V_k``, ``σ_i = ||M v_i||``. Both ways the
product ``U_k Σ_k V_kᵀ`` is ``M`` projected onto the k leading singular directions, taken from
``M`` itself: at full rank it is ``M`` up to float64 rounding, then the float32 cast. Squaring
``M`` loses nothing that float32 could hold: float64 resolves ``σ_i²`` to about
``1e-16 σ_1²``, i.e. ``σ_i`` to ``1e-8 σ_1``. The route is exact, not randomised.

Why this route (2 threads on this project's 2-vCPU machine, k = 32; benchmarks/README.md, "LQER
and DWR"): it is faster than LAPACK's SVD, ``torch.linalg.svd(Eᵀ, full_matrices=False)`` in
float32. Single runs with one other job on the machine took 11 s against 12-17 s on a
4096 × 4096 error and 14 s against 42 s on 11008 × 4096 (the SVD works on the long side too); the
benchmark's best-of-3 times on a busier machine give ratios 0.4-0.6 and 0.2-0.3. The
eigendecomposition computes every eigenvector while LQER needs 32, but torch has no subset
eigensolver. The same route in float32 takes about half the time (6 s on 4096 × 4096) but is not
exact to float32 rounding: its full-rank reconstruction of a 4096 × 4096 error with
``max |E| = 6e-3`` is off by up to 4e-8, about 90 ulps (LAPACK's float32 SVD: 5e-8; this route:
half an ulp), and a float32 Gram matrix loses the singular values below about ``3e-4 σ_1`` (the
square root of float32's epsilon), which DWR's large-rank candidates (``dwr.py``) need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqrepro.errors import PtqError

SCALE_FLOOR = 1e-4
"""L2QER clamps the activation statistic to at least this before normalising it."""


def activation_scale(batch_absmean_max: torch.Tensor) -> torch.Tensor:
    """L2QER's ``s`` [in] from ``batch_absmean_max`` [in], the running maximum over calibration
    batches of each batch's mean ``|x_j|``: clamped to ``SCALE_FLOOR``, then divided by
    ``√(min(s) · max(s))`` so that the geometric mean of its extremes is 1."""
    if batch_absmean_max.dim() != 1 or batch_absmean_max.numel() == 0:
        raise PtqError(
            f"L2QER: the activation statistic must be a non-empty vector [in], got shape "
            f"{tuple(batch_absmean_max.shape)}"
        )
    s = batch_absmean_max.float().clamp(min=SCALE_FLOOR)
    return s / torch.sqrt(s.min() * s.max())


@dataclass
class LowRankCorrection:
    """``x Eᵀ ≈ (x a) b``: ``a`` [in, k], ``b`` [k, out], float32."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def error_estimate(self) -> torch.Tensor:
        """``a b`` [in, out], the approximation of ``Eᵀ``."""
        return self.a @ self.b


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` truncated SVD of ``matrix`` [m, n] as ``(U_k, Σ_k V_kᵀ)``, float32:
    ``U_k`` [m, k] holds the left singular vectors of the k largest singular values, largest first,
    and ``Σ_k V_kᵀ`` [k, n] the rows ``σ_i v_iᵀ``; their product is the best rank-k approximation of
    ``matrix``. Computed from the smaller Gram matrix in float64 (module docstring). When ``m > n``
    a direction with ``σ_i = 0`` gets a zero column in ``U_k``; the product is unaffected."""
    rows, columns = matrix.shape
    if not 0 < rank <= min(rows, columns):
        raise PtqError(f"rank must be in 1..{min(rows, columns)} for a {rows} × {columns} matrix, got {rank}")
    m = matrix.double()
    if rows <= columns:
        _, vectors = torch.linalg.eigh(m @ m.T)  # eigenvalues ascending
        left = vectors[:, -rank:].flip(1)
        right = left.T @ m
    else:
        _, vectors = torch.linalg.eigh(m.T @ m)
        right_vectors = vectors[:, -rank:].flip(1)
        left_scaled = m @ right_vectors
        sigma = left_scaled.norm(dim=0)
        left = left_scaled / torch.where(sigma > 0, sigma, 1.0)
        right = sigma[:, None] * right_vectors.T
    return left.float(), right.float()


def low_rank_correction(error: torch.Tensor, rank: int, scale: torch.Tensor | None = None) -> LowRankCorrection:
    """LQER's correction of ``error`` = ``W - Q(W)`` [out, in] at ``rank`` k (1..min(out, in));
    with ``scale`` [in] (``activation_scale``), L2QER's: ``A = S⁻¹ U_k``, ``B = Σ_k V_kᵀ`` from the
    SVD of ``S Eᵀ``."""
    if error.dim() != 2:
        raise PtqError(f"LQER: the error must be a matrix [out, in], got shape {tuple(error.shape)}")
    if not bool(torch.isfinite(error).all()):
        raise PtqError("LQER: the error has non-finite entries")
    out_features, in_features = error.shape
    if not 0 < rank <= min(out_features, in_features):
        raise PtqError(
            f"LQER: rank must be in 1..{min(out_features, in_features)} for a "
            f"{out_features} × {in_features} weight, got {rank}"
        )
    error_t = error.double().T
    if scale is None:
        a, b = truncated_svd(error_t, rank)
        return LowRankCorrection(a=a, b=b)
    if tuple(scale.shape) != (in_features,):
        raise PtqError(f"L2QER: the scale must be a vector [{in_features}], got shape {tuple(scale.shape)}")
    if not bool((scale > 0).all() & torch.isfinite(scale).all()):
        raise PtqError("L2QER: the scale must be positive and finite")
    s = scale.double()[:, None]
    u, b = truncated_svd(s * error_t, rank)
    return LowRankCorrection(a=(u.double() / s).float(), b=b)
