"""LQER/L2QER: exact reconstruction at full rank, Eckart–Young optimality at rank k (in the scaled
norm for L2QER), the activation scale, and L2QER's lower output error on skewed activations.
DWR: k = 0 keeps the codes bit for bit, candidates stay on the base grid, full rank re-rounds W
itself, the search spaces are nested projections, and the random one is seeded."""

from __future__ import annotations

import pytest
import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats import GroupedFormat, IntFormat, MXFormat, QuantizedWeight
from ptqrepro.methods.dwr import discarded_at_rank, discarded_weight, reconstruct, search_space
from ptqrepro.methods.gptq import gptq
from ptqrepro.methods.lqer import activation_scale, low_rank_correction
from ptqrepro.methods.rtn import rtn

FORMATS = [IntFormat(4, 16), MXFormat("int4", 16)]
SHAPES = [(48, 64), (64, 32)]
"""[out, in]: both sides of ``truncated_svd``'s choice of Gram matrix."""


def weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def quantization_error(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight(shape, seed)
    return w, w - rtn(w, IntFormat(3, 16)).dequantize()


def skewed_activations(in_features: int, tokens: int = 256, seed: int = 1) -> torch.Tensor:
    """Gaussian inputs [tokens, in] with three channels 10, 30 and 50 times larger."""
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(seed))
    x[:, [3, 17, 30]] *= torch.tensor([10.0, 30.0, 50.0])
    return x


def l2qer_scale(x: torch.Tensor, batches: int = 4) -> torch.Tensor:
    """Running max over batches of the batch mean |x_j|, normalised."""
    batch_means = torch.stack([chunk.abs().mean(dim=0) for chunk in x.chunk(batches)])
    return activation_scale(batch_means.amax(dim=0))


def discarded_squared_singular_values(matrix: torch.Tensor, rank: int) -> float:
    return float((torch.linalg.svdvals(matrix.double()) ** 2)[rank:].sum())


# --- LQER / L2QER ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_full_rank_reproduces_the_weight(shape, scaled):
    w, error = quantization_error(shape)
    q = w - error
    scale = l2qer_scale(skewed_activations(shape[1])) if scaled else None
    correction = low_rank_correction(error, min(shape), scale)
    assert correction.a.shape == (shape[1], min(shape)) and correction.b.shape == (min(shape), shape[0])
    torch.testing.assert_close(q + correction.error_estimate().T, w, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 7, 20])
def test_lqer_error_is_eckart_young_optimal(shape, rank):
    _, error = quantization_error(shape)
    correction = low_rank_correction(error, rank)
    assert correction.rank == rank
    residual = float(((error.T - correction.error_estimate()).double() ** 2).sum())
    assert residual == pytest.approx(discarded_squared_singular_values(error.T, rank), rel=1e-5)
    # A = U_k: orthonormal columns; B = Σ_k V_kᵀ: rows of norm σ_1 >= σ_2 >= ...
    torch.testing.assert_close(correction.a.T @ correction.a, torch.eye(rank), rtol=0, atol=1e-5)
    sigma = torch.linalg.svdvals(error.T.double())[:rank].float()
    torch.testing.assert_close(correction.b.norm(dim=1), sigma, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_l2qer_is_optimal_in_the_scaled_norm(shape):
    _, error = quantization_error(shape)
    s = l2qer_scale(skewed_activations(shape[1]))
    rank = 6
    correction = low_rank_correction(error, rank, s)
    scaled_residual = s[:, None] * (error.T - correction.error_estimate())
    expected = discarded_squared_singular_values(s[:, None] * error.T, rank)
    assert float((scaled_residual.double() ** 2).sum()) == pytest.approx(expected, rel=1e-5)
    # A = S⁻¹ U_k: S A has orthonormal columns.
    scaled_a = s[:, None] * correction.a
    torch.testing.assert_close(scaled_a.T @ scaled_a, torch.eye(rank), rtol=0, atol=1e-5)


def test_l2qer_beats_lqer_on_skewed_activations():
    shape = (48, 64)
    _, error = quantization_error(shape)
    x = skewed_activations(shape[1])
    s = l2qer_scale(x)

    def output_error(scale):
        correction = low_rank_correction(error, 4, scale)
        return float((x @ (error.T - correction.error_estimate())).norm())

    uncorrected = float((x @ error.T).norm())
    lqer, l2qer = output_error(None), output_error(s)
    assert l2qer < 0.8 * lqer < uncorrected


def test_activation_scale_normalises_and_clamps():
    s = activation_scale(torch.tensor([0.0, 0.5, 2.0, 8.0]))
    clamped = torch.tensor([1e-4, 0.5, 2.0, 8.0])
    torch.testing.assert_close(s, clamped / (1e-4 * 8.0) ** 0.5)
    assert float(s.min() * s.max()) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(activation_scale(torch.tensor([1.0, 4.0])), torch.tensor([0.5, 2.0]))


@pytest.mark.parametrize("rank", [0, -1, 33])
def test_bad_ranks_are_rejected(rank):
    _, error = quantization_error((64, 32))
    with pytest.raises(PtqError, match="rank must be in 1..32"):
        low_rank_correction(error, rank)


def test_bad_scale_and_error_are_rejected():
    _, error = quantization_error((48, 64))
    with pytest.raises(PtqError, match="scale must be a vector"):
        low_rank_correction(error, 2, torch.ones(48))
    with pytest.raises(PtqError, match="positive"):
        low_rank_correction(error, 2, torch.zeros(64))
    with pytest.raises(PtqError, match="non-empty vector"):
        activation_scale(torch.ones(2, 3))
    with pytest.raises(PtqError, match="matrix"):
        low_rank_correction(error[0], 1)


# --- DWR ------------------------------------------------------------------------------------------


def gptq_base(w: torch.Tensor, fmt: GroupedFormat) -> QuantizedWeight:
    """A base whose codes are not the nearest grid points of W, so full rank has work to do."""
    x = skewed_activations(w.shape[1], seed=2)
    return gptq(w, x.T @ x, fmt).quantized


def nearest_codes(w: torch.Tensor, base: QuantizedWeight) -> torch.Tensor:
    """RTN's codes of ``w`` on ``base``'s grid (its parameters, not refitted)."""
    out_features, in_features = w.shape
    params = {key: value.reshape(-1, 1) for key, value in base.params.items()}
    codes = base.fmt.encode(w.reshape(out_features * base.groups, -1), params)
    return codes.to(base.fmt.code_dtype).reshape(out_features, in_features)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("fmt", FORMATS + [MXFormat("fp4-e2m1", 16)], ids=lambda f: f.name)
@pytest.mark.parametrize("kind", ["svd", "random"])
def test_rank_zero_keeps_the_codes_bit_for_bit(fmt, kind):
    w = weight((48, 64))
    for base in (rtn(w, fmt), gptq_base(w, fmt)):
        space = search_space(discarded_weight(w, base), kind)
        unchanged = reconstruct(base, discarded_at_rank(space, 0))
        assert same_bits(unchanged.codes, base.codes)
    if fmt.name.startswith("mxfp"):
        assert bool(torch.signbit(base.codes[base.codes == 0]).any()), "no -0 codes: the case is not exercised"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_svd_re_rounds_w_on_the_base_grid(fmt, shape):
    w = weight(shape)
    base = gptq_base(w, fmt)
    expected = nearest_codes(w, base)
    assert not torch.equal(expected, base.codes)
    space = search_space(discarded_weight(w, base), "svd")
    full = reconstruct(base, discarded_at_rank(space, min(shape)))
    assert same_bits(full.codes, expected)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_reconstruct_keeps_params_and_the_grid_range(fmt):
    w = weight((48, 64))
    base = gptq_base(w, fmt)
    space = search_space(discarded_weight(w, base), "svd")
    # Ten times the candidate pushes many values past the grid's ends: they must saturate.
    candidate = reconstruct(base, 10 * discarded_at_rank(space, 8))
    assert candidate.fmt == base.fmt
    assert candidate.params.keys() == base.params.keys()
    for key in base.params:
        assert torch.equal(candidate.params[key], base.params[key])
    codes = candidate.codes.float()
    assert torch.equal(codes, codes.round())
    if isinstance(fmt, IntFormat):
        low, high = 0, fmt.maxq
    else:
        high = 2 ** (fmt.bits - 1) - 1
        low = -high
    assert int(codes.min()) == low and int(codes.max()) == high
    assert not torch.equal(candidate.codes, base.codes)


@pytest.mark.parametrize("kind", ["svd", "random"])
@pytest.mark.parametrize("shape", SHAPES)
def test_candidates_are_nested_projections_of_d(kind, shape):
    w = weight(shape)
    d = discarded_weight(w, rtn(w, IntFormat(3, 16)))
    space = search_space(d, kind, seed=3)
    assert space.max_rank == min(shape)
    for rank in (5, 20, 30):  # both products: L[:, :k] R[:k] and D - L[:, k:] R[k:]
        d_k = discarded_at_rank(space, rank)
        assert int(torch.linalg.matrix_rank(d_k)) == rank
        # Orthogonal projection: the remainder is orthogonal to D_k.
        assert float((d_k * (d - d_k)).sum()) == pytest.approx(0.0, abs=1e-4 * float((d**2).sum()))
    assert torch.equal(discarded_at_rank(space, min(shape)), d)
    if kind == "svd":
        for rank in (7, 30):
            residual = float(((d - discarded_at_rank(space, rank)).double() ** 2).sum())
            assert residual == pytest.approx(discarded_squared_singular_values(d, rank), rel=1e-5)


def test_random_space_is_seeded():
    w = weight((48, 64))
    d = discarded_weight(w, rtn(w, IntFormat(3, 16)))
    first, again, other = (discarded_at_rank(search_space(d, "random", seed), 10) for seed in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)
    # The svd space is the best rank-10 approximation: a random subspace keeps less of D.
    best = discarded_at_rank(search_space(d, "svd"), 10)
    assert float(first.norm()) < float(best.norm())


def test_bad_inputs_are_rejected():
    w = weight((48, 64))
    base = rtn(w, IntFormat(4, 16))
    d = discarded_weight(w, base)
    with pytest.raises(PtqError, match="unknown search space 'afm'; expected one of svd, random"):
        search_space(d, "afm")
    space = search_space(d, "svd")
    for rank in (-1, 49):
        with pytest.raises(PtqError, match="rank must be in 0..48"):
            discarded_at_rank(space, rank)
    with pytest.raises(PtqError, match="do not match"):
        reconstruct(base, d.T)
    with pytest.raises(PtqError, match="differs"):
        discarded_weight(w.T, base)
