"""GPTQ: quantize a linear layer's weight column by column, compensating each column's rounding
error on the columns not yet quantized.

Sources: Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023), Algorithm 1, and the authors' reference
implementation IST-DASLab/gptq ``gptq.py`` (``GPTQ.fasterquant``, HEAD 2d65066). This is an
independent implementation of the same algorithm, arranged for speed on CPU.

GPTQ minimises the layer error ``||X Wᵀ - X Qᵀ||²`` of each output row over grid points ``Q``.
With the Hessian ``H = 2/n · XᵀX`` (plus damping) and the upper Cholesky factor ``U`` of
``H⁻¹ = UᵀU``, the columns ``j = 0, 1, ...`` are quantized in order:

    q_j = Q(w_j),    e_j = (w_j - q_j) / U_jj,    w_k <- w_k - U_jk e_j   for every k > j.

Lazy batch updates (paper §3, "Lazy Batch-Updates"): inside a block of ``blocksize`` columns the
update runs column by column on the block only; the columns after the block get the whole
block's errors at once, ``W[:, after] -= E U[block, after]``. The result is the same as
updating every column at once, up to float rounding.

How this implementation differs from the reference's code (not its results):

* it copies each block transposed into a buffer, so that a column is a contiguous vector, and
  writes the update with the ratios ``R = diag(U)⁻¹ U`` and the residuals ``d_j = w_j - q_j``:
  ``U_jk e_j = R_jk d_j``;
* it computes ``U`` with one Cholesky factorisation and one triangular inverse instead of
  Cholesky, inverse and Cholesky again (``inverse_hessian_factor``);
* per column it does the format's encode/decode and three in-place operations on views made
  once per block (the reference's loop allocates an outer product per column).

Group parameters (``groups``), for formats with groups (``int4-g64``, MX blocks):

* ``reference`` (default): as the reference's ``--groupsize``: a group's parameters are fitted
  when the sweep reaches its first column ``g0``, on ``W[:, g0:g0+length]`` as it stands at the
  start of the current lazy block. Inside a block the reference updates only its copy of the
  block, so a group that starts mid-block (groups shorter than ``blocksize``) is fitted on
  weights that lack the updates of the block's earlier columns;
* ``sweep``: a block also ends where a group begins, so that every group is fitted on columns
  that carry every earlier column's update. With groups of ``blocksize`` or a multiple, no group
  starts mid-block and ``sweep`` equals ``reference``;
* ``static``: every group is fitted on the original weight before the sweep (the reference's
  ``--static-groups``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats.base import GroupedFormat, QuantizedWeight

Params = dict[str, torch.Tensor]

GROUP_MODES = ("reference", "sweep", "static")
"""How ``gptq`` fits group parameters (module docstring)."""


@dataclass
class GptqResult:
    """A GPTQ-quantized weight and how its Hessian had to be treated."""

    quantized: QuantizedWeight
    damping: float
    """The ``percdamp`` actually used: the requested one times 10 per Cholesky retry."""
    retries: int
    """Cholesky retries needed (0 normally)."""
    dead_columns: int
    """Inputs whose Hessian diagonal is zero (never active in calibration); their weights are zero."""


def gptq(
    weight: torch.Tensor,
    gram: torch.Tensor,
    fmt: GroupedFormat,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    groups: str = "reference",
    layer: str = "weight",
    max_retries: int = 5,
) -> GptqResult:
    """Quantize ``weight`` [out, in] to ``fmt`` with GPTQ, given ``gram`` = ``XᵀX`` [in, in] summed
    over the calibration tokens.

    The reference's Hessian is ``H = 2/n · XᵀX``. Damping is relative (``percdamp`` times the mean
    of diag H is added to the diagonal), so ``H`` and ``XᵀX`` give the same damped matrix up to
    the factor ``2/n``, and the updates only use ratios ``U_jk / U_jj`` of its inverse's Cholesky
    factor, in which that factor cancels. (One exception: a dead column's diagonal entry is set to 1
    in ``XᵀX``'s units here and in ``H``'s units in the reference, and it enters the mean
    diagonal; the damping differs only where dead columns are a sizeable share of the inputs.)

    * Dead columns (diag = 0): the diagonal entry becomes 1 and the weight column 0.
    * Damping: ``H + percdamp · mean(diag H) · I``; if the Cholesky factorisation fails or is not
      finite, ``percdamp`` is multiplied by 10, up to ``max_retries`` times; then a PtqError names
      ``layer`` and the last damping tried.
    * Groups (``fmt.group_length``): fitted as ``groups`` says, one of ``GROUP_MODES``
      (``reference``, ``sweep``, ``static``; module docstring). Formats without groups fit one
      set per row on the incoming weight before the sweep, as the reference does (before zeroing
      dead columns), whatever ``groups`` says.
    * ``act_order``: columns are quantized in order of decreasing diag H (reference
      ``--act-order``) and put back in their order at the end. The stored layout has groups of
      consecutive original columns, so a format with groups needs ``groups="static"`` with it
      (the reference's ``--act-order --static-groups``; its ``--act-order`` alone would make
      groups of permuted columns); anything else is a PtqError.

    The returned codes are the ones ``fmt.encode`` chose for each column under its group's
    parameters, so ``quantized.dequantize()`` is exactly the GPTQ result.
    """
    _check_inputs(weight, gram, blocksize, percdamp, layer)
    in_features = weight.shape[1]
    count = fmt.groups(in_features, layer)
    _check_groups(groups, act_order and count > 1, layer)
    length = fmt.group_length(in_features) or in_features
    w = weight.detach().to(torch.float32, copy=True)
    hessian = gram.detach().to(torch.float32, copy=True)
    params: list[Params | None] = [fmt.fit(w)] if count == 1 else [None] * count
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1
    w[:, dead] = 0
    if count > 1 and groups == "static":
        params = [fmt.fit(w[:, start : start + length]) for start in range(0, in_features, length)]

    order = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:
        w = w[:, order]
        hessian = hessian[order[:, None], order]
    ratios, damping, retries = inverse_hessian_factor(hessian, percdamp, max_retries, layer)
    ratios.div_(ratios.diagonal().clone().unsqueeze(1))
    del hessian

    columns = order.tolist() if order is not None else range(in_features)
    group_of_column = [column // length for column in columns]
    group_starts = range(0, in_features, length) if count > 1 and groups == "sweep" else ()
    bounds = _block_bounds(in_features, blocksize, group_starts)
    codes = _sweep(w, ratios, fmt, params, group_of_column, length, bounds)
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    quantized = QuantizedWeight(
        codes=codes,
        params={name: torch.cat([p[name] for p in params], dim=1) for name in params[0]},
        fmt=fmt,
    )
    return GptqResult(quantized=quantized, damping=damping, retries=retries, dead_columns=int(dead.sum()))


def _check_inputs(
    weight: torch.Tensor, gram: torch.Tensor, blocksize: int, percdamp: float, layer: str
) -> None:
    """Shapes, finiteness and settings, each failure a PtqError naming the layer."""
    if weight.dim() != 2:
        raise PtqError(f"GPTQ: layer {layer}: weight must be [out, in], got shape {tuple(weight.shape)}")
    in_features = weight.shape[1]
    if tuple(gram.shape) != (in_features, in_features):
        raise PtqError(
            f"GPTQ: layer {layer}: gram must be [{in_features}, {in_features}], got {tuple(gram.shape)}"
        )
    if blocksize < 1 or percdamp <= 0:
        raise PtqError(
            f"GPTQ: layer {layer}: blocksize must be >= 1 and percdamp > 0, got {blocksize} and {percdamp}"
        )
    if not _all_finite(weight):
        raise PtqError(f"GPTQ: layer {layer}: weight has non-finite entries")
    if not _all_finite(gram):
        raise PtqError(f"GPTQ: layer {layer}: gram (XᵀX) has non-finite entries; no damping can fix it")


def _check_groups(groups: str, permuted_groups: bool, layer: str) -> None:
    """``groups`` is one of ``GROUP_MODES``, and ``static`` where ``act_order`` permutes a grouped
    format's columns (``gptq``'s docstring)."""
    if groups not in GROUP_MODES:
        raise PtqError(f"GPTQ: layer {layer}: groups must be one of {', '.join(GROUP_MODES)}, not {groups!r}")
    if permuted_groups and groups != "static":
        raise PtqError(
            f"GPTQ: layer {layer}: act_order on a format with groups needs groups: static "
            f"(the reference's --act-order --static-groups), not {groups!r}"
        )


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``: a finite float32 sum proves it (and is 30× faster than
    ``isfinite``); an inf or NaN sum is checked entry by entry, since it may be an overflow."""
    return math.isfinite(float(tensor.float().sum())) or bool(torch.isfinite(tensor).all())


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float, max_retries: int, layer: str
) -> tuple[torch.Tensor, float, int]:
    """The upper triangular ``U`` with ``(H + λ I)⁻¹ = UᵀU``, ``λ = percdamp · mean(diag H)``.

    The reference computes it as ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``
    (4n³/3 flops). Here, with ``J`` the order-reversing permutation and ``L`` the lower Cholesky
    factor of ``J H J``: ``H⁻¹ = J L⁻ᵀ L⁻¹ J = (J L⁻¹ J)ᵀ (J L⁻¹ J)``, and ``J L⁻¹ J`` is upper
    triangular with a positive diagonal, so it is that same unique factor, for one Cholesky
    (n³/3 flops) and one triangular inverse (about 2n³/3 flops in matrix products, which run
    faster than the reference's two extra LAPACK calls).

    A failed or non-finite factorisation retries with ``percdamp`` × 10, at most ``max_retries``
    times. Returns ``(U, percdamp used, retries)``; if every attempt fails, a PtqError naming
    ``layer`` and the last damping tried.
    """
    reversed_hessian = hessian.flip(0, 1)
    diagonal = reversed_hessian.diagonal()
    undamped = diagonal.clone()
    mean_diagonal = float(undamped.mean())
    damping = percdamp
    for retries in range(max_retries + 1):
        damping = percdamp * 10.0**retries
        diagonal.copy_(undamped).add_(damping * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(reversed_hessian)
        if int(info) == 0 and _all_finite(invert_lower_triangular_(lower)):
            del reversed_hessian, diagonal  # lowers the peak memory of the flipped copy below
            return lower.flip(0, 1), damping, retries
    raise PtqError(
        f"GPTQ: layer {layer}: the Hessian is not positive definite even with percdamp {damping:g} "
        f"(after {max_retries} retries, each ×10)"
    )


def invert_lower_triangular_(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Overwrite a lower triangular ``L`` with ``L⁻¹``, recursively by halves:
    ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹ B A⁻¹, C⁻¹]]``, blocks up to ``leaf`` by a triangular
    solve against the identity. (torch has no triangular inverse; ``solve_triangular`` on the
    whole identity costs n³ flops, this about 2n³/3 in matrix products and needs n²/2 scratch.)"""
    size = lower.shape[0]
    if size <= leaf:
        identity = torch.eye(size, dtype=lower.dtype, device=lower.device)
        return lower.copy_(torch.linalg.solve_triangular(lower, identity, upper=False))
    half = size // 2
    head = invert_lower_triangular_(lower[:half, :half], leaf)
    tail = invert_lower_triangular_(lower[half:, half:], leaf)
    corner = lower[half:, :half]
    corner.copy_(tail @ (corner @ head)).neg_()
    return lower


def _block_bounds(columns: int, blocksize: int, group_starts: range | tuple) -> list[tuple[int, int]]:
    """``[start, stop)`` of the lazy blocks: every ``blocksize`` columns, and also at
    ``group_starts`` (``groups="sweep"``), so that a group's columns are up to date when it is
    fitted."""
    cuts = sorted(set(range(0, columns, blocksize)) | set(group_starts) | {columns})
    return list(zip(cuts[:-1], cuts[1:]))


def _sweep(
    w: torch.Tensor,
    ratios: torch.Tensor,
    fmt: GroupedFormat,
    params: list[Params | None],
    group_of_column: list[int],
    length: int,
    bounds: list[tuple[int, int]],
) -> torch.Tensor:
    """The GPTQ sweep over ``w`` [out, in], updated in place, with ``ratios`` ``R = diag(U)⁻¹ U``.
    Returns the codes, [out, in].

    Per block: fit every group that starts inside it and whose ``params`` entry is still None on
    ``w`` as it stands at the block's start (the reference's ``find_params`` on its full ``W``,
    which it updates only after each block); copy the block transposed into a buffer (a column
    becomes a contiguous vector) and quantize its columns (``_quantize_block``); then
    ``W[:, after] -= D[:, block] R[block, after]`` with ``D`` the block's residuals ``w_j - q_j``,
    one in-place matrix product. (Entries are None only for groups of consecutive columns:
    ``act_order`` comes with every group fitted up front.)
    """
    out_features, columns = w.shape
    codes = torch.empty((out_features, columns), dtype=fmt.code_dtype, device=w.device)
    widest = max(stop - start for start, stop in bounds)
    block_buffer = torch.empty((widest, out_features), device=w.device)
    residual_buffer = torch.empty((widest, out_features), device=w.device)
    code_buffer = torch.empty((widest, out_features), dtype=fmt.code_dtype, device=w.device)
    for start, stop in bounds:
        for first in range(-(-start // length) * length, stop, length):
            if params[first // length] is None:
                params[first // length] = fmt.fit(w[:, first : first + length])
        width = stop - start
        block = block_buffer[:width].copy_(w[:, start:stop].T)
        residuals = residual_buffer[:width]
        column_params = [params[group_of_column[j]] for j in range(start, stop)]
        block_ratios = ratios[start:stop, start:stop]
        _quantize_block(block, block_ratios, residuals, code_buffer[:width], fmt, column_params)
        codes[:, start:stop] = code_buffer[:width].T
        w[:, stop:].addmm_(residuals.T, ratios[start:stop, stop:], alpha=-1)
    return codes


def _quantize_block(
    block: torch.Tensor,
    ratios: torch.Tensor,
    residuals: torch.Tensor,
    codes: torch.Tensor,
    fmt: GroupedFormat,
    column_params: list[Params],
) -> None:
    """Quantize the columns of one block in order, in place: for column j, its codes, its residual
    ``w_j - q_j`` (into ``residuals``) and ``w_k -= R_jk (w_j - q_j)`` for the block's later
    columns, one in-place rank-1 update. All views are made once per block, so the per-column
    work is the format's encode and decode plus three in-place tensor operations."""
    column_views = block.unsqueeze(2).unbind(0)
    residual_views = residuals.unsqueeze(2).unbind(0)
    code_views = codes.unsqueeze(2).unbind(0)
    residual_rows = residuals.unbind(0)
    ratio_rows = ratios.unbind(0)
    for j, (column, params) in enumerate(zip(column_views, column_params)):
        code = fmt.encode(column, params)
        code_views[j].copy_(code)
        torch.sub(column, fmt.decode(code, params), out=residual_views[j])
        block[j + 1 :].addr_(ratio_rows[j][j + 1 :], residual_rows[j], alpha=-1)
