"""MagR: weight magnitude reduction by ℓ∞-regularised least squares, and the coordinate-descent
refinement that MagR+OPTQ† runs after quantization.

Sources: Zhang, Wang, Deng, Li, Yang & Yin, "MagR: Weight Magnitude Reduction for Enhancing
Post-Training Quantization" (NeurIPS 2024, arXiv 2406.00800v2) §4.2, Eq. 2 and 4, Algorithms 1-3;
the authors' code AozhongZhang/MagR (``MagR.py``, ``optq.py``), as summarised in docs/papers.md#magr.
This is an independent implementation, arranged for speed on CPU.

**Problem** (paper §4.2, Eq. 2, in the torch layout: one row ``w_i`` of the weight [out, in] is one
output channel, the paper's column). With the Gram matrix ``G = XᵀX`` of the layer's inputs and
``D = W' - W``:

    min_W'  F(W') = ½ ||X W'ᵀ - X Wᵀ||_F² + α Σ_i ||w'_i||∞ = ½ tr(D G Dᵀ) + α Σ_i ||w'_i||∞,

per group of ``group_size`` consecutive inputs of a row instead of per row when groups are given
(docs/papers.md#magr-problem-and-algorithm).

**Normalisation** (docs/papers.md#magr-settings-paper-against-code). The authors' code divides X by its largest singular value, so
``G`` is replaced by ``Ĝ = G / λ_max(G)``, the step size is ``η = 1`` and ``α`` is relative to
``Ĝ`` (α = 1e-3 per channel, 1e-4 per group). Here ``λ_max`` comes from a few dozen Lanczos
steps on ``G`` (``largest_eigenvalue``) instead of an SVD of X; ``F`` is reported in these
normalised units (the unnormalised objective with ``α λ_max`` is ``λ_max · F``).

**Algorithm 1** (proximal gradient), from ``W⁰ = W``:

    Vᵏ = Wᵏ - (Wᵏ - W) Ĝ,        Wᵏ⁺¹ = prox_{α||·||∞}(Vᵏ)   row by row (or group by group).

**Prox** (paper Eq. 4, Moreau identity): ``prox_{t||·||∞}(v) = v - t proj_{||·||₁≤1}(v / t)``.
Since ``t proj_{||·||₁≤1}(v/t) = proj_{||·||₁≤t}(v) = sign(v) max(|v| - θ, 0)``, the prox is
``clamp(v, -θ, θ)``: the entries above the level ``θ`` are cut to it, ``θ`` being the ℓ₁-ball
threshold of ``v`` for radius ``t`` (``θ = 0``, hence a zero row, when ``||v||₁ <= t``).

**ℓ₁-ball threshold** (Algorithms 2-3, Duchi et al. 2008): with ``u`` the magnitudes ``|v|``
sorted in decreasing order, ``ρ = max{i : u_i > (Σ_{r≤i} u_r - t) / i}`` and
``θ = (Σ_{r≤ρ} u_r - t) / ρ`` (clamped at 0). The condition holds exactly for ``i <= ρ``, so only
the ``ρ`` largest magnitudes matter, and all of them exceed ``u_1 - t``. MagR cuts a handful of
entries per row, so ``l1_ball_threshold`` takes the few magnitudes above ``max(u_1 - t, 0)`` and
finds ``θ`` among them without sorting, by Newton steps on ``Σ max(u_i - θ, 0) = t`` (the same
``θ``: exact once the set of entries above ``θ`` stops changing); a row with many such
magnitudes sorts its top 16 (``torch.topk``), and more only where ``ρ`` might be larger. A prox
costs a comparison, a ``clamp`` and sums over a handful of entries instead of a sort (3-5x less
than ``topk`` on SmolLM2's 576 x 1536 layers, 1.5x on 4096 x 4096).

**Cost.** One matrix product ``D Ĝ`` per iteration (out·in² multiply-adds), which gives both the
gradient for the next step and the quadratic term ``½ Σ D ∘ (D Ĝ)`` of ``F(Wᵏ)``; the penalty
``Σ ||w'_i||∞`` after a prox is the sum of the levels ``θ``. ``W⁰ = W`` has ``D = 0``, so the
first step needs no product: ``iterations`` products give ``F(W⁰) ... F(W^K)``.

**Product precision.** ``product_dtype`` bfloat16 rounds ``Ĝ`` once, and ``D`` and the product
``D Ĝ`` (accumulated in float32) at every step, to bfloat16: 2.4x faster than float32 on CPUs with
native bf16 dot products; everything else stays float32. Rounding ``Ĝ`` solves the problem for a
symmetric ``Ĝ + E`` with ``|E_ij| <= 2⁻⁹ |Ĝ_ij|``; rounding ``D`` and ``D Ĝ`` makes each gradient
inexact by a relative 2⁻⁸ at most: ``F`` then decreases up to that noise instead of strictly.

**Coordinate descent** (MagR+OPTQ†, docs/papers.md#magr-with-rtn-and-gptq; the COMQ-style pass in the authors'
``optq.py``): with the quantized weight's grid parameters fixed, minimise the damped layer error
``E(Q) = tr(R G̃ Rᵀ)``, ``R = W - Q``, ``G̃ = G + damping · mean(diag G) · I``, over one input
column ``q_j`` at a time (all rows at once). With ``S = R G̃``, ``E`` as a function of ``q_j``
alone is ``G̃_jj (q_j - q*_j)² + const`` with ``q*_j = q_j + S_:j / G̃_jj``, so the best grid point
is the nearest one to ``q*_j``: ``encode(q*_j)`` with column ``j``'s group parameters. Each step
cannot increase ``E``. ``S`` is kept current as in GPTQ's lazy batches: inside a block of 128
columns by rank-1 updates of the block's columns, then ``S -= Δ G̃[block, :]`` for all columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats.base import GroupedFormat, QuantizedWeight

NEWTON_CANDIDATES = 64
"""Rows with at most this many magnitudes above ``max(u_1 - radius, 0)`` get their ℓ₁-ball
threshold by Newton steps over those magnitudes, the others by partial sorts."""
TOP_CANDIDATES = 16
"""Magnitudes per row that ``_sorted_threshold`` sorts first; ×8 for the rows that need more."""
PROX_CHUNK_ELEMENTS = 1 << 22
"""Entries per chunk of rows in MagR's prox (bounds the |V| temporary to 16 MiB)."""
INNER_CHUNK = 1 << 20
"""Entries per float32 dot product in the objective's ``Σ D ∘ (D Ĝ)``."""
LANCZOS_TOLERANCE = 1e-6
"""Stop when the top Ritz pair's residual ||G y - θ y|| is below this times θ."""
LANCZOS_MAX_STEPS = 120
LANCZOS_CHECK_EVERY = 10
"""Lanczos steps between two solutions of the small tridiagonal eigenproblem."""
CD_BLOCK = 128
"""Columns per lazy block of the coordinate descent."""


def l1_ball_threshold(magnitudes: torch.Tensor, radius: float) -> torch.Tensor:
    """The threshold ``θ`` [rows] of the Euclidean projection of each row of ``|v|`` (``magnitudes``
    [rows, n], non-negative) onto the ℓ₁ ball of ``radius``: ``Σ max(|v| - θ, 0) = radius``, or
    ``θ = 0`` when the row is already inside the ball (Duchi et al. 2008, see module docstring).

    ``θ >= max(u_1 - radius, 0)`` (the sum at ``u_1 - radius`` is at least ``radius``), so only the
    magnitudes above that bound can exceed ``θ``. Rows with at most ``NEWTON_CANDIDATES`` of them
    (MagR's case: its prox cuts a handful of entries) go to ``_newton_threshold``, the others to
    ``_sorted_threshold``."""
    rows = magnitudes.shape[0]
    lower = (magnitudes.amax(dim=1) - radius).clamp_(min=0)
    row_of, column = (magnitudes > lower.unsqueeze(1)).nonzero(as_tuple=True)
    values = magnitudes[row_of, column]
    few = torch.bincount(row_of, minlength=rows) <= NEWTON_CANDIDATES
    if bool(few.all()):
        return _newton_threshold(row_of, values, rows, radius)
    threshold = magnitudes.new_zeros(rows)
    on_few_row = few[row_of]
    threshold[few] = _newton_threshold(row_of[on_few_row], values[on_few_row], rows, radius)[few]
    threshold[~few] = _sorted_threshold(magnitudes[~few], radius)
    return threshold


def _newton_threshold(row_of: torch.Tensor, values: torch.Tensor, rows: int, radius: float) -> torch.Tensor:
    """``θ`` [rows] by Newton's method on the convex, decreasing, piecewise-linear
    ``f(θ) = Σ_i max(u_i - θ, 0) - radius`` from ``θ_0 = max(u_1 - radius, 0)``, where
    ``f(θ_0) >= 0``: each step ``θ <- (Σ_{u_i > θ} u_i - radius) / #{u_i > θ}`` (clamped at 0: a row
    inside the ball) rises towards the root without passing it; it stops when the set of
    magnitudes above ``θ`` no longer changes. ``values`` are the magnitudes above ``θ_0``, flat,
    ``row_of`` their rows; a row without any gets 0."""
    while True:
        total = values.new_zeros(rows).index_add_(0, row_of, values)
        count = values.new_zeros(rows).index_add_(0, row_of, torch.ones_like(values))
        level = ((total - radius) / count.clamp(min=1)).clamp_(min=0)
        above = values > level[row_of]
        if bool(above.all()):
            return level
        values, row_of = values[above], row_of[above]


def _sorted_threshold(magnitudes: torch.Tensor, radius: float) -> torch.Tensor:
    """``θ`` of every row from its largest magnitudes in decreasing order: sorts only the
    ``TOP_CANDIDATES`` largest of each row; a row whose condition
    ``u_i > (Σ_{r≤i} u_r - radius) / i`` still holds at the last candidate is redone with 8 times
    as many, up to a full sort."""
    rows, length = magnitudes.shape
    threshold = magnitudes.new_zeros(rows)
    pending = torch.arange(rows, device=magnitudes.device)
    count = TOP_CANDIDATES
    while pending.numel():
        count = min(count, length)
        subset = magnitudes if pending.numel() == rows else magnitudes[pending]
        if count < length:
            largest = torch.topk(subset, count, dim=1).values
        else:
            largest = torch.sort(subset, dim=1, descending=True).values
        excess = largest.cumsum(dim=1).sub_(radius)
        positions = torch.arange(1, count + 1, device=magnitudes.device, dtype=magnitudes.dtype)
        holds = largest * positions > excess  # true for i <= ρ, false after
        rho = holds.sum(dim=1, keepdim=True).clamp_(min=1)  # i = 1 holds unless radius is below u_1's ulp
        level = (excess.gather(1, rho - 1) / rho).squeeze(1).clamp_(min=0)
        settled = ~holds[:, -1] if count < length else torch.ones_like(holds[:, -1])
        threshold[pending[settled]] = level[settled]
        pending = pending[~settled]
        count *= 8
    return threshold


def project_l1_ball(v: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Euclidean projection of every row of ``v`` [rows, n] onto ``{w : ||w||₁ <= radius}``:
    ``sign(v) max(|v| - θ, 0)`` with ``θ`` from ``l1_ball_threshold``; rows inside are unchanged."""
    _check_rows(v, "project_l1_ball")
    if not radius > 0:
        raise PtqError(f"project_l1_ball: radius must be positive, got {radius}")
    magnitudes = v.abs()
    threshold = l1_ball_threshold(magnitudes, radius)
    return torch.sign(v) * (magnitudes - threshold.unsqueeze(1)).clamp_(min=0)


def prox_linf(v: torch.Tensor, t: float) -> torch.Tensor:
    """``prox_{t||·||∞}`` of every row of ``v`` [rows, n]: ``argmin_w ½||w - v||² + t ||w||∞``,
    which by the Moreau identity (paper Eq. 4) is ``v - t proj_{||·||₁≤1}(v / t)``, computed as
    ``clamp(v, -θ, θ)`` (module docstring)."""
    _check_rows(v, "prox_linf")
    if not t > 0:
        raise PtqError(f"prox_linf: t must be positive, got {t}")
    result = v.to(torch.float32, copy=True)
    _prox_linf_(result, t)
    return result


def _prox_linf_(rows: torch.Tensor, t: float) -> float:
    """``prox_{t||·||∞}`` of every row of ``rows`` in place, by chunks of rows; returns the sum of
    the rows' ℓ∞ norms afterwards, which are their levels ``θ``."""
    penalty = 0.0
    for chunk in rows.split(max(1, PROX_CHUNK_ELEMENTS // rows.shape[1])):
        level = l1_ball_threshold(chunk.abs(), t).unsqueeze(1)
        torch.clamp(chunk, -level, level, out=chunk)
        penalty += float(level.sum(dtype=torch.float64))
    return penalty


def _check_rows(v: torch.Tensor, function: str) -> None:
    if v.dim() != 2:
        raise PtqError(f"{function}: expected rows [rows, n], got shape {tuple(v.shape)}")


def largest_eigenvalue(gram: torch.Tensor) -> float:
    """``λ_max`` of a symmetric positive semi-definite ``gram`` [n, n], by Lanczos with full
    reorthogonalisation from a fixed random start (seed 0), falling back to ``eigvalsh``.

    Every ``LANCZOS_CHECK_EVERY`` steps the tridiagonal ``T_k`` (float64) gives the Ritz value
    ``θ <= λ_max`` and the residual norm ``||G y - θ y|| = β_k |s_k|`` (``s`` the Ritz vector in
    the Krylov basis); some eigenvalue lies within the residual of ``θ``, and with a random start
    it is ``λ_max``. Lanczos stops at a residual ``<= 1e-6 θ`` or an invariant subspace. That takes
    a few dozen matrix-vector products (about 0.2 s for n = 4096 on 2 cores, against 2.5 s for
    float32 ``eigvalsh`` and far more for the SVD of X the authors' code takes). A spectrum whose
    top is a tight cluster can keep the residual large for long: after ``LANCZOS_MAX_STEPS`` steps
    the answer is float32 ``eigvalsh(G)`` instead. (A step size ``1/θ`` up to 1e-6 above
    ``1/λ_max`` keeps proximal gradient monotone, which needs only ``η < 2/λ_max``.)
    """
    size = gram.shape[0]
    matrix = gram.float()
    steps = min(size, LANCZOS_MAX_STEPS)
    basis = torch.zeros(steps + 1, size, dtype=torch.float64)
    start = torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis[0] = start / start.norm()
    diagonal, off_diagonal = [], []
    for step in range(steps):
        vector = (matrix @ basis[step].float()).double()
        diagonal.append(float(basis[step] @ vector))
        for _ in range(2):  # classical Gram-Schmidt, twice, against the whole basis
            vector -= basis[: step + 1].T @ (basis[: step + 1] @ vector)
        norm = float(vector.norm())
        invariant = norm <= LANCZOS_TOLERANCE * max(diagonal)  # then the residual is small too
        if invariant or (step + 1) % LANCZOS_CHECK_EVERY == 0 or step + 1 == steps:
            ritz_value, residual = _top_ritz_pair(diagonal, off_diagonal, norm)
            if residual <= LANCZOS_TOLERANCE * ritz_value or step + 1 == size:
                return ritz_value
        off_diagonal.append(norm)
        basis[step + 1] = vector / norm
    return float(torch.linalg.eigvalsh(matrix)[-1])


def _top_ritz_pair(diagonal: list[float], off_diagonal: list[float], next_coupling: float) -> tuple[float, float]:
    """The largest eigenvalue ``θ`` of the Lanczos tridiagonal and its residual ``β_k |s_k|``."""
    tridiagonal = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    if off_diagonal:
        couplings = torch.tensor(off_diagonal, dtype=torch.float64)
        tridiagonal += torch.diag(couplings, 1) + torch.diag(couplings, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    return float(values[-1]), next_coupling * abs(float(vectors[-1, -1]))


@dataclass
class MagrResult:
    """The MagR-processed weight and the run's objective."""

    weight: torch.Tensor
    """float32 [out, in]."""
    objective: list[float]
    """``F(Wᵏ)`` for k = 0 .. iterations, in units of the normalised ``Ĝ = G / λ_max``."""
    iterations: int
    alpha: float
    eigenvalue: float
    """``λ_max(G)`` by which ``G`` was normalised (the unnormalised objective is ``λ_max · F``)."""


@torch.no_grad()
def magr(
    weight: torch.Tensor,
    gram: torch.Tensor,
    alpha: float = 1e-3,
    iterations: int = 150,
    group_size: int | None = None,
    *,
    layer: str = "weight",
    product_dtype: torch.dtype = torch.float32,
) -> MagrResult:
    """MagR (paper Algorithm 1) on ``weight`` [out, in] with ``gram`` = ``XᵀX`` [in, in]: proximal
    gradient on ``½ tr(D Ĝ Dᵀ) + α Σ ||w'||∞`` with ``Ĝ = G / λ_max(G)`` and step 1, the ℓ∞ norm
    taken per row or, with ``group_size``, per group of that many consecutive inputs; the products
    ``D Ĝ`` in ``product_dtype`` (float32 or bfloat16, module docstring). ``layer`` names the weight
    in errors."""
    _check_magr_inputs(weight, gram, alpha, iterations, group_size, layer, product_dtype)
    out_features, in_features = weight.shape
    eigenvalue = largest_eigenvalue(gram)
    if not eigenvalue > 0:
        raise PtqError(f"MagR: layer {layer}: gram (XᵀX) has no positive eigenvalue; nothing to fit")
    normalised = (gram.float() / eigenvalue).to(product_dtype)
    original = weight.float().contiguous()
    current = original.clone()
    groups = current.view(-1, group_size or in_features)
    difference = torch.empty_like(current)
    product = torch.empty_like(current)
    rounded = product_dtype != torch.float32
    if rounded:  # the bfloat16 operand and result of each product
        low_difference, low_product = (torch.empty_like(current, dtype=product_dtype) for _ in range(2))
    objective = [alpha * float(groups.abs().amax(dim=1).sum(dtype=torch.float64))]
    for step in range(iterations):
        if step > 0:
            current.sub_(product)  # Vᵏ = Wᵏ - (Wᵏ - W) Ĝ; at k = 0 the gradient is zero
        penalty = _prox_linf_(groups, alpha)
        torch.sub(current, original, out=difference)
        if rounded:
            torch.mm(low_difference.copy_(difference), normalised, out=low_product)
            product.copy_(low_product)
        else:
            torch.mm(difference, normalised, out=product)
        quadratic = 0.5 * _inner_product(difference, product)
        objective.append(quadratic + alpha * penalty)
    return MagrResult(weight=current, objective=objective, iterations=iterations, alpha=alpha, eigenvalue=eigenvalue)


def _inner_product(a: torch.Tensor, b: torch.Tensor) -> float:
    """``Σ a ∘ b`` of two contiguous tensors: float32 dot products of 2^20 entries (about 1e-7
    relative error each; one dot over 4096² entries is off by about 1e-5), summed in float64."""
    return sum(float(torch.dot(x, y)) for x, y in zip(a.view(-1).split(INNER_CHUNK), b.view(-1).split(INNER_CHUNK)))


def _check_magr_inputs(
    weight: torch.Tensor, gram: torch.Tensor, alpha: float, iterations: int, group_size: int | None, layer: str,
    product_dtype: torch.dtype,
) -> None:
    if weight.dim() != 2:
        raise PtqError(f"MagR: layer {layer}: weight must be [out, in], got shape {tuple(weight.shape)}")
    in_features = weight.shape[1]
    if tuple(gram.shape) != (in_features, in_features):
        raise PtqError(f"MagR: layer {layer}: gram must be [{in_features}, {in_features}], got {tuple(gram.shape)}")
    if product_dtype not in (torch.float32, torch.bfloat16):
        raise PtqError(f"MagR: layer {layer}: products must be float32 or bfloat16, got {product_dtype}")
    if not alpha > 0 or iterations < 0:
        raise PtqError(f"MagR: layer {layer}: alpha must be > 0 and iterations >= 0, got {alpha} and {iterations}")
    if group_size is not None and (group_size < 1 or in_features % group_size):
        raise PtqError(
            f"MagR: layer {layer}: group size {group_size} does not divide the {in_features} inputs"
        )
    if not math.isfinite(float(weight.float().sum())) or not math.isfinite(float(gram.float().sum())):
        raise PtqError(f"MagR: layer {layer}: weight or gram has non-finite entries")


@torch.no_grad()
def coordinate_descent(
    target_weight: torch.Tensor,
    quantized: QuantizedWeight,
    gram: torch.Tensor,
    sweeps: int,
    damping: float = 0.75,
) -> QuantizedWeight:
    """``sweeps`` passes of coordinate descent over the input columns of ``quantized`` (module
    docstring): each column moves to the grid point of its fixed group parameters that minimises
    ``tr((W - Q) G̃ (W - Q)ᵀ)``, ``W`` = ``target_weight`` [out, in], ``G̃ = gram + damping ·
    mean(diag gram) · I``. Returns a new QuantizedWeight with the same format and parameters."""
    codes = quantized.codes
    out_features, in_features = codes.shape
    if tuple(target_weight.shape) != (out_features, in_features):
        raise PtqError(
            f"coordinate descent: target weight {tuple(target_weight.shape)} and codes "
            f"{tuple(codes.shape)} differ in shape"
        )
    if tuple(gram.shape) != (in_features, in_features):
        raise PtqError(f"coordinate descent: gram must be [{in_features}, {in_features}], got {tuple(gram.shape)}")
    if sweeps < 0 or damping < 0:
        raise PtqError(f"coordinate descent: sweeps and damping must be >= 0, got {sweeps} and {damping}")
    length = in_features // quantized.groups
    damped = gram.float().clone()
    damped.diagonal().add_(damping * float(damped.diagonal().mean()))
    curvature = damped.diagonal()
    inverse_curvature = torch.where(curvature > 0, 1.0 / curvature, torch.zeros_like(curvature)).tolist()
    group_params = [
        {name: value[:, group : group + 1] for name, value in quantized.params.items()}
        for group in range(quantized.groups)
    ]
    column_params = [group_params[column // length] for column in range(in_features)]
    values = quantized.dequantize()
    new_codes = codes.clone()
    slope = (target_weight.float() - values) @ damped  # S = R G̃
    for _ in range(sweeps):
        for start in range(0, in_features, CD_BLOCK):
            block = slice(start, min(start + CD_BLOCK, in_features))
            block_values = values[:, block].T.contiguous()
            block_codes = torch.empty(block_values.shape, dtype=codes.dtype)
            changes = _descend_block(
                slope[:, block].T.contiguous(), block_values, block_codes, damped[block, block],
                inverse_curvature[block], column_params[block], quantized.fmt,
            )
            values[:, block] = block_values.T
            new_codes[:, block] = block_codes.T
            slope.addmm_(changes.T, damped[block], alpha=-1)
    return QuantizedWeight(codes=new_codes, params=quantized.params, fmt=quantized.fmt)


def _descend_block(
    slope: torch.Tensor,
    values: torch.Tensor,
    codes: torch.Tensor,
    hessian: torch.Tensor,
    inverse_curvature: list[float],
    column_params: list[dict[str, torch.Tensor]],
    fmt: GroupedFormat,
) -> torch.Tensor:
    """One block's columns in order, all transposed to [block, out]: column j goes to the grid
    point nearest ``q_j + S_:j / G̃_jj``, written into ``values`` and ``codes``, and the block's later
    columns of ``slope`` get ``S_:k -= G̃_jk Δ_j`` (``hessian`` is ``G̃`` on the block). Returns the
    changes ``Δ = Q_new - Q_old`` [block, out]."""
    changes = torch.empty_like(values)
    slope_rows = slope.unbind(0)
    for j, (current, params) in enumerate(zip(values.unbind(0), column_params)):
        optimum = (current + slope_rows[j] * inverse_curvature[j]).unsqueeze(1)
        code = fmt.encode(optimum, params)
        codes[j] = code.squeeze(1)
        updated = fmt.decode(code, params).squeeze(1)
        torch.sub(updated, current, out=changes[j])
        current.copy_(updated)
        slope[j + 1 :].addr_(hessian[j, j + 1 :], changes[j], alpha=-1)
    return changes
