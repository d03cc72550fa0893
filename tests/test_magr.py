"""MagR: the ℓ₁-ball projection and ℓ∞ prox against independent solutions, λ_max, Algorithm 1
against a plain float64 transcription, its objective, magnitudes and output error; the β shrink
of the integer grid; the coordinate-descent refinement on a fixed grid."""

from __future__ import annotations

import pytest
import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats import IntFormat, QuantizedWeight, parse_format
from ptqrepro.methods.gptq import gptq
from ptqrepro.methods.magr import (
    coordinate_descent,
    largest_eigenvalue,
    magr,
    project_l1_ball,
    prox_linf,
)
from ptqrepro.methods.rtn import rtn

TOKENS, INPUTS, OUTPUTS = 512, 128, 64


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP waits when other jobs share the cores
    (the file takes 5 s this way and 30 s or more with two threads on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibration(seed: int = 0) -> torch.Tensor:
    """Inputs [tokens, inputs] like a transformer layer's: 16 shared latent factors plus small
    independent noise (strongly correlated channels) and three outlier channels scaled by 10."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(TOKENS, 16, generator=generator) @ torch.randn(16, INPUTS, generator=generator)
    x = latent + 0.3 * torch.randn(TOKENS, INPUTS, generator=generator)
    x[:, [5, 60, 100]] *= 10.0
    return x


def layer_weight(seed: int = 1) -> torch.Tensor:
    return 0.02 * torch.randn(OUTPUTS, INPUTS, generator=torch.Generator().manual_seed(seed))


def relative_output_error(x: torch.Tensor, w: torch.Tensor, changed: torch.Tensor) -> float:
    """``||X (W - W')ᵀ||_F / ||X Wᵀ||_F``."""
    return float((x @ (w - changed).T).norm() / (x @ w.T).norm())


def bisection_projection(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Projection of each row onto the ℓ₁ ball in float64, from its optimality condition alone:
    ``w = sign(v) max(|v| - θ, 0)`` with ``θ`` found by bisection on ``Σ max(|v| - θ, 0) = radius``
    (rows inside the ball are returned as they are)."""
    v = v.double()
    magnitudes = v.abs()
    low = torch.zeros(v.shape[0], 1, dtype=torch.float64)
    high = magnitudes.amax(dim=1, keepdim=True)
    for _ in range(200):
        middle = (low + high) / 2
        above = (magnitudes - middle).clamp(min=0).sum(dim=1, keepdim=True) > radius
        low = torch.where(above, middle, low)
        high = torch.where(above, high, middle)
    projected = torch.sign(v) * (magnitudes - (low + high) / 2).clamp(min=0)
    inside = magnitudes.sum(dim=1, keepdim=True) <= radius
    return torch.where(inside, v, projected)


def random_rows(rows: int, length: int, seed: int) -> torch.Tensor:
    """Rows of very different ℓ₁ norms (scales 0.001 .. 10) with heavy-tailed entries."""
    generator = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.linspace(-3, 1, rows).unsqueeze(1)
    return scales * torch.randn(rows, length, generator=generator) ** 3


@pytest.mark.parametrize("length", [1, 7, 40, 300])
@pytest.mark.parametrize("radius", [0.05, 1.0, 30.0])
def test_l1_projection_matches_bisection(length, radius):
    """Lengths below and above the 16 sorted candidates and 8×16 after a retry; the radii leave
    some rows inside the ball, some cut to a few entries, some to many. Float32 ``|v| - θ`` is
    exact to a few ulps of ``|v|``, hence the tolerance relative to each row's largest entry."""
    v = random_rows(48, length, seed=length)
    projected = project_l1_ball(v, radius).double()
    expected = bisection_projection(v, radius)
    tolerance = 1e-6 * v.double().abs().amax(dim=1, keepdim=True) + 1e-5 * expected.abs()
    assert ((projected - expected).abs() <= tolerance).all()


@pytest.mark.parametrize("radius", [0.1, 1.0, 20.0])
def test_l1_projection_satisfies_kkt_conditions(radius):
    """Rows with ℓ₁ norms from radius / 2 to 5 radius (no float32 cancellation in ``|v| - θ``)."""
    v = random_rows(64, 50, seed=3)
    v *= radius * torch.linspace(0.5, 5.0, 64).unsqueeze(1) / v.abs().sum(dim=1, keepdim=True)
    w = project_l1_ball(v, radius)
    norms, input_norms = w.abs().sum(dim=1), v.abs().sum(dim=1)
    assert (norms <= radius * (1 + 1e-5)).all()
    inside = input_norms <= radius
    assert torch.equal(w[inside], v[inside])
    assert inside.any() and (~inside).any()
    assert torch.allclose(norms[~inside], torch.full_like(norms[~inside], radius), rtol=1e-5)
    for row_v, row_w in zip(v[~inside], w[~inside]):
        kept = row_w != 0
        assert (torch.sign(row_w[kept]) == torch.sign(row_v[kept])).all()
        shrink = row_v[kept].abs() - row_w[kept].abs()  # the common θ
        theta = float(shrink.mean())
        assert theta >= 0
        assert torch.allclose(shrink, torch.full_like(shrink, theta), rtol=1e-5, atol=1e-6 * radius)
        assert (row_v[~kept].abs() <= theta * (1 + 1e-5)).all()


def test_prox_linf_matches_direct_minimisation():
    """``argmin_w ½||w - v||² + t ||w||∞`` by SLSQP on the epigraph form (variables w and s,
    ``-s <= w_i <= s``), and the Moreau identity with the ℓ₁ projection (paper Eq. 4)."""
    optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    v = random_rows(6, 5, seed=11).double()
    size = v.shape[1]
    bounds = {  # s - w_i >= 0 and s + w_i >= 0, linear in z = (w, s)
        "type": "ineq",
        "fun": lambda z: np.concatenate([z[size] - z[:size], z[size] + z[:size]]),
        "jac": lambda z: np.hstack([np.vstack([-np.eye(size), np.eye(size)]), np.ones((2 * size, 1))]),
    }
    for t in (1e-3, 0.05, 0.5, 5.0):
        prox = prox_linf(v.float(), t).double()
        moreau = v - t * project_l1_ball((v / t).float(), 1.0).double()
        assert torch.allclose(prox, moreau, rtol=0, atol=1e-6 * float(v.abs().max()))
        for row, result in zip(v.numpy(), prox.numpy()):
            solution = optimize.minimize(
                lambda z, row=row: 0.5 * np.sum((z[:size] - row) ** 2) + t * z[size],
                np.zeros(size + 1),
                jac=lambda z, row=row: np.append(z[:size] - row, t),
                constraints=[bounds], method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000},
            )
            assert solution.success
            assert np.allclose(result, solution.x[:size], rtol=0, atol=1e-6 * np.abs(row).max())


def test_largest_eigenvalue_is_accurate():
    x = calibration()
    gram = x.T @ x
    exact = float(torch.linalg.eigvalsh(gram.double())[-1])
    assert largest_eigenvalue(gram) == pytest.approx(exact, rel=1e-5)
    # a cluster at the top of the spectrum: 1, 1 - 1e-4, 1 - 2e-4, ... then a spread
    basis, _ = torch.linalg.qr(torch.randn(200, 200, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    spectrum = torch.cat([1 - 1e-4 * torch.arange(8, dtype=torch.float64), torch.rand(192, dtype=torch.float64) * 0.99])
    clustered = (basis * spectrum) @ basis.T
    assert largest_eigenvalue(clustered.float()) == pytest.approx(1.0, rel=1e-4)
    assert largest_eigenvalue(torch.diag(torch.tensor([2.0, 7.0, 3.0]))) == pytest.approx(7.0, rel=1e-6)


def algorithm_1_float64(weight: torch.Tensor, gram: torch.Tensor, alpha: float, iterations: int,
                        group_size: int | None = None) -> torch.Tensor:
    """Paper Algorithm 1, plainly in float64: η = 1 on G / λ_max (eigvalsh), prox by the Moreau
    identity with the bisection projection."""
    w = weight.double()
    normalised = gram.double() / torch.linalg.eigvalsh(gram.double())[-1]
    current = w.clone()
    length = group_size or w.shape[1]
    for _ in range(iterations):
        v = (current - (current - w) @ normalised).reshape(-1, length)
        current = (v - alpha * bisection_projection(v / alpha, 1.0)).reshape(w.shape)
    return current


@pytest.mark.parametrize("group_size, alpha", [(None, 1e-3), (32, 1e-4)])
def test_magr_matches_plain_algorithm_1(group_size, alpha):
    x, w = calibration(), layer_weight()
    gram = x.T @ x
    result = magr(w, gram, alpha, iterations=30, group_size=group_size)
    expected = algorithm_1_float64(w, gram, alpha, 30, group_size)
    assert result.weight.dtype == torch.float32 and result.weight.shape == w.shape
    assert torch.allclose(result.weight.double(), expected, atol=2e-6)
    assert not torch.equal(result.weight, w)


def test_magr_first_step_is_the_prox_of_the_weight():
    """At W⁰ = W the gradient vanishes, so one iteration is prox_{α||·||∞}(W)."""
    x, w = calibration(), layer_weight()
    result = magr(w, x.T @ x, alpha=1e-2, iterations=1)
    assert torch.equal(result.weight, prox_linf(w, 1e-2))


@pytest.mark.parametrize("group_size, alpha", [(None, 1e-3), (32, 1e-4)])
def test_magr_objective_decreases_monotonically(group_size, alpha):
    x, w = calibration(), layer_weight()
    gram = x.T @ x
    result = magr(w, gram, alpha, iterations=100, group_size=group_size)
    objective = result.objective
    assert len(objective) == 101 and result.iterations == 100 and result.alpha == alpha
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(objective, objective[1:]))
    assert objective[-1] < 0.9 * objective[0]
    # the reported values are F(W) = ½ tr(D Ĝ Dᵀ) + α Σ ||w||∞ with Ĝ = G / λ_max, recomputed here
    lam = float(torch.linalg.eigvalsh(gram.double())[-1])
    assert result.eigenvalue == pytest.approx(lam, rel=1e-5)
    length = group_size or INPUTS
    for weight, reported in ((w, objective[0]), (result.weight, objective[-1])):
        difference = (weight - w).double()
        quadratic = 0.5 * float(((difference @ gram.double()) * difference).sum()) / lam
        penalty = alpha * float(weight.double().reshape(-1, length).abs().amax(dim=1).sum())
        assert reported == pytest.approx(quadratic + penalty, rel=1e-5)


def test_magr_lowers_row_maxima_and_keeps_the_output():
    x, w = calibration(), layer_weight()
    result = magr(w, x.T @ x, alpha=1e-4, iterations=150)
    before, after = w.abs().amax(dim=1), result.weight.abs().amax(dim=1)
    assert (after <= before).all()
    assert float((after / before).mean()) < 0.9
    assert relative_output_error(x, w, result.weight) < 0.01


def test_magr_per_group_lowers_each_group_maximum():
    x, w = calibration(), layer_weight()
    result = magr(w, x.T @ x, alpha=5e-5, iterations=150, group_size=32)
    before = w.reshape(-1, 32).abs().amax(dim=1)
    after = result.weight.reshape(-1, 32).abs().amax(dim=1)
    assert (after <= before).all()
    assert float((after / before).mean()) < 0.9
    assert relative_output_error(x, w, result.weight) < 0.01


def test_magr_bfloat16_products_stay_close_to_float32():
    """bfloat16 products (module docstring, "Product precision") solve a problem perturbed by
    2⁻⁸ relative: the result is within a small fraction of float32's change to W, keeps the output
    and still lowers every row maximum; the objective decreases up to that noise."""
    x, w = calibration(), layer_weight()
    gram = x.T @ x
    exact = magr(w, gram, alpha=1e-4, iterations=150)
    rounded = magr(w, gram, alpha=1e-4, iterations=150, product_dtype=torch.bfloat16)
    assert rounded.weight.dtype == torch.float32
    assert not torch.equal(rounded.weight, exact.weight)
    assert float((rounded.weight - exact.weight).norm() / (exact.weight - w).norm()) < 0.05
    assert (rounded.weight.abs().amax(dim=1) <= w.abs().amax(dim=1)).all()
    assert relative_output_error(x, w, rounded.weight) < 0.01
    assert rounded.objective[-1] == pytest.approx(exact.objective[-1], rel=0.01)
    objective = rounded.objective
    assert all(later <= earlier * (1 + 2**-7) for earlier, later in zip(objective, objective[1:]))


def test_magr_rejects_bad_input():
    w, gram = layer_weight(), torch.eye(INPUTS)
    with pytest.raises(PtqError, match=r"group size 48 does not divide the 128 inputs"):
        magr(w, gram, group_size=48)
    with pytest.raises(PtqError, match=r"gram must be \[128, 128\], got \(64, 64\)"):
        magr(w, torch.eye(64))
    with pytest.raises(PtqError, match="alpha must be > 0"):
        magr(w, gram, alpha=0.0)
    with pytest.raises(PtqError, match="no positive eigenvalue"):
        magr(w, torch.zeros(INPUTS, INPUTS))
    with pytest.raises(PtqError, match="products must be float32 or bfloat16"):
        magr(w, gram, product_dtype=torch.float16)


# --- β shrink of the integer grid -------------------------------------------------------------

@pytest.mark.parametrize("text", ["int2-beta0.8", "int3-g32-beta0.95", "int4-g64-sym-beta0.9"])
def test_shrunk_grid_codes_lie_on_the_grid_and_scale_shrinks(text):
    fmt = parse_format(text)
    plain = IntFormat(fmt.bits, fmt.group_size, fmt.symmetric)
    w = layer_weight()
    shrunk, full = rtn(w, fmt), rtn(w, plain)
    assert torch.allclose(shrunk.params["scale"], fmt.shrink * full.params["scale"], rtol=1e-6)
    codes = shrunk.codes
    assert int(codes.min()) >= 0 and int(codes.max()) <= fmt.maxq
    length = fmt.group_size or INPUTS
    values = shrunk.dequantize().reshape(-1, length)
    scale, zero = shrunk.params["scale"].reshape(-1, 1), shrunk.params["zero"].reshape(-1, 1)
    positions = values / scale + zero
    assert torch.allclose(positions, codes.reshape(-1, length).float(), atol=1e-4)
    if fmt.symmetric:
        assert torch.all(zero == 2 ** (fmt.bits - 1))
    else:
        x_min = w.reshape(-1, length).amin(dim=1, keepdim=True).clamp(max=0)
        assert torch.equal(zero, torch.round(-x_min / scale))
        # the top of the range is clipped: the largest weight of every row lands on the top code
        top = w.reshape(-1, length).argmax(dim=1, keepdim=True)
        assert (codes.reshape(-1, length).gather(1, top) == fmt.maxq).all()


@pytest.mark.parametrize("text, shrink", [("int2-beta0.8", 0.8), ("INT3-g128-beta0.95", 0.95),
                                          ("int4-beta.85-g64", 0.85), ("int3-beta1", 1.0), ("int2-sym-beta0.80", 0.8)])
def test_beta_parses_and_its_name_round_trips(text, shrink):
    fmt = parse_format(text)
    assert fmt.shrink == shrink
    assert parse_format(fmt.name) == fmt
    assert ("beta" in fmt.name) == (shrink != 1)
    assert IntFormat(2, shrink=1e-5).name == "int2-beta0.00001"
    assert parse_format("int2-beta0.00001") == IntFormat(2, shrink=1e-5)


@pytest.mark.parametrize("text", ["int2-beta0", "int2-beta1.2", "int2-beta", "int2-beta0.8-beta0.9", "int2-beta-0.5",
                                  "int2-betax"])
def test_bad_beta_is_rejected(text):
    with pytest.raises(PtqError, match="cannot parse format"):
        parse_format(text)


def test_shrink_outside_range_is_rejected_on_construction():
    with pytest.raises(PtqError, match=r"shrink \(beta\) must be in \(0, 1\]"):
        IntFormat(3, shrink=1.5)


# --- coordinate descent on a fixed grid ---------------------------------------------------------

def damped_error(w: torch.Tensor, quantized: QuantizedWeight, gram: torch.Tensor, damping: float = 0.75) -> float:
    """``tr((W - Q) G̃ (W - Q)ᵀ)`` in float64, ``G̃ = G + damping · mean(diag G) · I``."""
    damped = gram.double()
    damped += damping * float(damped.diagonal().mean()) * torch.eye(gram.shape[0], dtype=torch.float64)
    difference = w.double() - quantized.dequantize().double()
    return float(((difference @ damped) * difference).sum())


def layer_error(x: torch.Tensor, w: torch.Tensor, quantized: QuantizedWeight) -> float:
    return float(((x @ (w - quantized.dequantize()).T) ** 2).sum())


def assert_same_grid(start: QuantizedWeight, refined: QuantizedWeight) -> None:
    """Same format and parameters; the codes are valid and are what ``encode`` gives their values."""
    fmt = start.fmt
    assert refined.fmt == fmt and refined.codes.dtype == start.codes.dtype
    assert refined.params.keys() == start.params.keys()
    assert all(torch.equal(refined.params[key], start.params[key]) for key in start.params)
    length = INPUTS // start.groups
    params = {key: value.reshape(-1, 1) for key, value in start.params.items()}
    again = fmt.encode(refined.dequantize().reshape(-1, length), params).reshape(OUTPUTS, INPUTS)
    assert torch.equal(again.to(refined.codes.dtype), refined.codes)


@pytest.mark.parametrize("text", ["int3", "int2-g32", "int3-beta0.9", "mxint4", "mxfp4"])
def test_coordinate_descent_stays_on_the_grid_and_never_increases_the_error(text):
    x, w = calibration(), layer_weight()
    gram = x.T @ x
    start = rtn(w, parse_format(text))
    errors = [damped_error(w, start, gram)]
    for sweeps in (1, 2, 4):
        refined = coordinate_descent(w, start, gram, sweeps)
        assert_same_grid(start, refined)
        errors.append(damped_error(w, refined, gram))
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.95 * errors[0]
    assert layer_error(x, w, refined) < layer_error(x, w, start)
    assert torch.equal(coordinate_descent(w, start, gram, 0).codes, start.codes)


def test_coordinate_descent_after_gptq_does_not_increase_its_error():
    x, w = calibration(), layer_weight()
    gram = x.T @ x
    start = gptq(w, gram, IntFormat(2)).quantized
    refined = coordinate_descent(w, start, gram, 3)
    assert_same_grid(start, refined)
    assert damped_error(w, refined, gram) <= damped_error(w, start, gram) * (1 + 1e-6)


def test_coordinate_descent_rejects_mismatched_shapes():
    w = layer_weight()
    start = rtn(w, IntFormat(3))
    with pytest.raises(PtqError, match="differ in shape"):
        coordinate_descent(w[:, :64], start, torch.eye(INPUTS), 1)
    with pytest.raises(PtqError, match=r"gram must be \[128, 128\]"):
        coordinate_descent(w, start, torch.eye(64), 1)
