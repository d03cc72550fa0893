"""GPTQ: lower layer error than RTN, outputs on the grid, group fitting (reference, sweep, static)
and act-order as in the reference, dead columns, damping retries, and independence of the lazy
block size."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats import GroupedFormat, IntFormat, parse_format
from ptqrepro.methods.gptq import gptq
from ptqrepro.methods.rtn import rtn

TOKENS, INPUTS, OUTPUTS = 512, 96, 24


def calibration(seed: int = 0) -> torch.Tensor:
    """Activations [tokens, inputs] with correlated channels (a random mixing of independent
    sources) and three outlier channels, like a transformer layer's input."""
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randn(TOKENS, INPUTS, generator=generator)
    mixing = torch.eye(INPUTS) + 0.4 * torch.randn(INPUTS, INPUTS, generator=generator)
    x = sources @ mixing
    x[:, [3, 40, 77]] *= 8.0
    return x


def layer_weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(OUTPUTS, INPUTS, generator=torch.Generator().manual_seed(seed))


def layer_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``||X Wᵀ - X Qᵀ||²``."""
    return float(((x @ w.T - x @ q.T) ** 2).sum())


def assert_on_grid(result, fmt: IntFormat) -> None:
    """Codes are integers in [0, maxq], and the dequantized values re-encode to the same codes."""
    quantized = result.quantized
    codes = quantized.codes
    assert codes.dtype == fmt.code_dtype and codes.shape == (OUTPUTS, INPUTS)
    assert int(codes.min()) >= 0 and int(codes.max()) <= fmt.maxq
    values = quantized.dequantize()
    assert torch.isfinite(values).all()
    groups = quantized.groups
    params = {name: p.reshape(-1, 1) for name, p in quantized.params.items()}
    again = fmt.encode(values.reshape(OUTPUTS * groups, -1), params).reshape(OUTPUTS, INPUTS)
    assert torch.equal(again.to(codes.dtype), codes)


def textbook_gptq(
    w: torch.Tensor, gram: torch.Tensor, fmt: GroupedFormat, percdamp: float = 0.01
) -> torch.Tensor:
    """GPTQ without lazy blocks, in float64 (paper Algorithm 1 with B = 1): per-row parameters,
    q_j = Q(w_j), e_j = (w_j - q_j) / U_jj, W[:, j+1:] -= e_j U_j,j+1:."""
    w = w.double()
    params = fmt.fit(w.float())
    h = gram.double()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = fmt.fake(w[:, j : j + 1].float(), params)[:, 0].double()
        error = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j + 1 :] -= torch.outer(error, u[j, j + 1 :])
    return q.float()


@pytest.mark.parametrize("fmt", ["int3", "int4", "int4-g16"])
def test_layer_error_is_below_rtn(fmt):
    x, w = calibration(), layer_weight()
    fmt = parse_format(fmt)
    ours = gptq(w, x.T @ x, fmt).quantized.dequantize()
    baseline = rtn(w, fmt).dequantize()
    assert layer_error(x, w, ours) < 0.8 * layer_error(x, w, baseline)


def test_matches_the_unblocked_algorithm():
    x, w = calibration(), layer_weight()
    fmt = parse_format("int4")
    ours = gptq(w, x.T @ x, fmt, blocksize=32).quantized.dequantize()
    reference = textbook_gptq(w, x.T @ x, fmt)
    mismatched = (ours != reference).float().mean()
    assert mismatched < 0.01  # float32 vs float64 may flip a rounding tie and what follows it in a row
    assert layer_error(x, w, ours) == pytest.approx(layer_error(x, w, reference), rel=0.02)


@pytest.mark.parametrize("fmt", ["int2", "int3", "int4", "int8", "int4-g16", "int3-g32-sym"])
@pytest.mark.parametrize(("act_order", "groups"), [(False, "reference"), (False, "sweep"), (True, "static")])
def test_every_output_lies_on_its_grid(fmt, act_order, groups):
    x = calibration()
    fmt = parse_format(fmt)
    result = gptq(layer_weight(), x.T @ x, fmt, act_order=act_order, groups=groups)
    assert_on_grid(result, fmt)
    assert (result.retries, result.damping, result.dead_columns) == (0, 0.01, 0)


@pytest.mark.parametrize("fmt", ["int3", "int4-g16"])
def test_act_order_changes_the_result(fmt):
    x, w = calibration(), layer_weight()
    fmt = parse_format(fmt)
    plain = gptq(w, x.T @ x, fmt).quantized.dequantize()
    ordered = gptq(w, x.T @ x, fmt, act_order=True, groups="static").quantized.dequantize()
    assert not torch.equal(plain, ordered)
    assert layer_error(x, w, ordered) < layer_error(x, w, rtn(w, fmt).dequantize())


def test_groups_change_the_result_and_lower_the_error():
    x, w = calibration(), layer_weight()
    per_row = gptq(w, x.T @ x, parse_format("int3")).quantized
    grouped = gptq(w, x.T @ x, parse_format("int3-g16")).quantized
    assert (per_row.groups, grouped.groups) == (1, INPUTS // 16)
    assert layer_error(x, w, grouped.dequantize()) < layer_error(x, w, per_row.dequantize())


def test_sweep_groups_are_fitted_on_the_updated_weight():
    """``sweep``: the first group sees the original weight; later groups see the error-compensated
    one, also those that start inside a lazy block."""
    x, w = calibration(), layer_weight()
    fmt = parse_format("int4-g16")
    scale = gptq(w, x.T @ x, fmt, groups="sweep").quantized.params["scale"]
    original = rtn(w, fmt).params["scale"]
    assert torch.equal(scale[:, 0], original[:, 0])
    assert not torch.equal(scale[:, 1:], original[:, 1:])


def reference_fasterquant(w: torch.Tensor, gram: torch.Tensor, fmt: GroupedFormat, blocksize: int,
                          percdamp: float = 0.01) -> tuple[torch.Tensor, list[dict]]:
    """A line-by-line transcription of IST-DASLab/gptq ``GPTQ.fasterquant`` with ``groupsize`` (no
    act-order, no static groups), float64: ``find_params`` at each group's first column on the full
    ``W``, which is updated only after each lazy block. Returns Q and each group's parameters."""
    length = fmt.group_length(w.shape[1])
    w = w.double().clone()
    h = gram.double().clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    fitted = []
    columns = w.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % length == 0:
                params = fmt.fit(w[:, i1 + i : i1 + i + length].float())
                fitted.append(params)
            column = w1[:, i]
            q[:, i1 + i] = fmt.fake(column[:, None].float(), params)[:, 0].double()
            err = (column - q[:, i1 + i]) / hinv1[i, i]
            w1[:, i:] -= torch.outer(err, hinv1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.float(), fitted


@pytest.mark.parametrize("fmt", ["int4-g16", "int3-g32", "mxint4-b16"])
def test_reference_groups_equal_the_reference_loop(fmt):
    """Groups shorter than the block: ``reference`` fits them as the reference's loop does (on
    weights without the block's earlier updates), which ``sweep`` does not."""
    x, w = calibration(), layer_weight()
    fmt = parse_format(fmt)
    expected, fitted = reference_fasterquant(w, x.T @ x, fmt, blocksize=64)
    ours = gptq(w, x.T @ x, fmt, blocksize=64, groups="reference").quantized
    sweep = gptq(w, x.T @ x, fmt, blocksize=64, groups="sweep").quantized
    for name in fmt.param_names:
        reference_params = torch.cat([params[name] for params in fitted], dim=1)
        assert torch.allclose(ours.params[name], reference_params, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(sweep.params[name], reference_params, rtol=1e-3, atol=1e-4)
    assert torch.allclose(ours.dequantize(), expected, atol=1e-5)
    assert not torch.allclose(sweep.dequantize(), expected, atol=1e-3)


def test_groups_of_the_block_size_agree_but_static():
    """With groups as long as the lazy block, no group starts inside a block: ``reference`` and
    ``sweep`` are the same computation; ``static`` fits on the original weight instead."""
    x, w = calibration(), layer_weight()
    fmt = parse_format("int4-g32")
    modes = {mode: gptq(w, x.T @ x, fmt, blocksize=32, groups=mode).quantized for mode in ("reference", "sweep", "static")}
    assert torch.equal(modes["reference"].codes, modes["sweep"].codes)
    assert torch.equal(modes["reference"].params["scale"], modes["sweep"].params["scale"])
    assert not torch.equal(modes["static"].params["scale"], modes["reference"].params["scale"])


@pytest.mark.parametrize("act_order", [False, True])
def test_static_groups_are_fitted_on_the_original_weight(act_order):
    x, w = calibration(), layer_weight()
    fmt = parse_format("int4-g16")
    static = gptq(w, x.T @ x, fmt, groups="static", act_order=act_order).quantized
    original = rtn(w, fmt)
    for name in fmt.param_names:
        assert torch.equal(static.params[name], original.params[name])


@pytest.mark.parametrize("groups", ["reference", "sweep"])
def test_act_order_with_groups_needs_static_groups(groups):
    """The stored layout has groups of consecutive columns: act-order can only use static ones."""
    x, w = calibration(), layer_weight()
    with pytest.raises(PtqError, match="act_order on a format with groups needs groups: static"):
        gptq(w, x.T @ x, parse_format("int4-g16"), act_order=True, groups=groups, layer="q")
    per_row = gptq(w, x.T @ x, parse_format("int4"), act_order=True, groups=groups).quantized
    assert torch.equal(per_row.codes, gptq(w, x.T @ x, parse_format("int4"), act_order=True, groups="static").quantized.codes)


def test_unknown_group_mode_names_the_layer():
    x, w = calibration(), layer_weight()
    with pytest.raises(PtqError, match="layer q: groups must be one of reference, sweep, static, not 'dynamic'"):
        gptq(w, x.T @ x, parse_format("int4-g16"), groups="dynamic", layer="q")


@pytest.mark.parametrize("fmt", ["int4", "int4-g16"])
def test_dead_column_gives_zero_weights(fmt):
    x, w = calibration(), layer_weight()
    x[:, 10] = 0
    result = gptq(w, x.T @ x, parse_format(fmt), act_order=True, groups="static")
    values = result.quantized.dequantize()
    assert result.dead_columns == 1
    assert torch.all(values[:, 10] == 0)
    assert torch.isfinite(values).all()


def test_indefinite_gram_retries_with_more_damping():
    x, w = calibration(), layer_weight()
    gram = x.T @ x
    gram -= 0.05 * gram.diagonal().mean() * torch.eye(INPUTS)  # H + 1% damping is indefinite
    fmt = parse_format("int4")
    result = gptq(w, gram, fmt, layer="model.layers.3.mlp.down_proj")
    assert result.retries == 1 and result.damping == pytest.approx(0.1)
    assert_on_grid(result, fmt)


@pytest.mark.parametrize("gram", ["nan", "negative"])
def test_impossible_gram_names_the_layer(gram):
    x = calibration()
    gram = torch.full((INPUTS, INPUTS), float("nan")) if gram == "nan" else -(x.T @ x)
    with pytest.raises(PtqError, match="model.layers.3.mlp.down_proj"):
        gptq(layer_weight(), gram, parse_format("int4"), layer="model.layers.3.mlp.down_proj")


def test_negative_gram_reports_the_last_damping():
    x = calibration()
    with pytest.raises(PtqError, match=r"percdamp 10 \(after 3 retries"):
        gptq(layer_weight(), -(x.T @ x), parse_format("int4"), max_retries=3, layer="q")


@pytest.mark.parametrize(("fmt", "groups"), [("int4", "reference"), ("int3-g16", "sweep"), ("int4-g32", "sweep"),
                                             ("int3-g16", "static")])
@pytest.mark.parametrize("blocksize", [1, 7, 32])
def test_blocksize_does_not_change_the_result(fmt, groups, blocksize):
    """Lazy batch updates are a reordering of the same arithmetic (7 also puts group starts mid-block
    and groups across block ends), where no group is fitted on a block's stale columns: per-row
    parameters, ``sweep`` and ``static`` groups (``reference`` groups depend on the block size, as
    in the reference)."""
    x, w = calibration(), layer_weight()
    fmt = parse_format(fmt)
    reference = gptq(w, x.T @ x, fmt, blocksize=128, groups=groups).quantized.dequantize()
    blocked = gptq(w, x.T @ x, fmt, blocksize=blocksize, groups=groups).quantized.dequantize()
    assert torch.allclose(blocked, reference, atol=1e-5)


@dataclass(frozen=True)
class PowerOfTwoFormat(GroupedFormat):
    """A toy non-integer format: signed 3-bit elements times a per-group power of two, to check that
    GPTQ only relies on the GroupedFormat interface."""

    bits: int = 3
    block: int = 16
    code_dtype = torch.int8
    param_names = ("exponent",)

    @property
    def name(self) -> str:
        return f"pow2-{self.bits}-b{self.block}"

    def group_length(self, in_features: int) -> int:
        return self.block

    def parameter_bits(self) -> int:
        return 8

    def fit(self, w):
        top = 2 ** (self.bits - 1) - 1
        absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        return {"exponent": torch.ceil(torch.log2(absmax / top))}

    def encode(self, w, params):
        top = 2 ** (self.bits - 1) - 1
        return torch.clamp(torch.round(w / torch.exp2(params["exponent"])), -top - 1, top)

    def decode(self, codes, params):
        return codes.float() * torch.exp2(params["exponent"])


def test_works_for_any_grouped_format():
    x, w = calibration(), layer_weight()
    fmt = PowerOfTwoFormat()
    result = gptq(w, x.T @ x, fmt, groups="sweep")
    values = result.quantized.dequantize()
    assert result.quantized.codes.dtype == torch.int8
    assert layer_error(x, w, values) < 0.8 * layer_error(x, w, rtn(w, fmt).dequantize())
    assert torch.equal(gptq(w, x.T @ x, fmt, blocksize=5, groups="sweep").quantized.codes, result.quantized.codes)


@pytest.mark.parametrize("fmt", ["mxint4", "mxfp4", "mxint8-b16"])
def test_mx_formats_beat_rtn_on_their_grid(fmt):
    """MX blocks are groups whose shared exponent is fitted when the sweep reaches them."""
    x, w = calibration(), layer_weight()
    fmt = parse_format(fmt)
    quantized = gptq(w, x.T @ x, fmt).quantized
    values = quantized.dequantize()
    params = {name: p.reshape(-1, 1) for name, p in quantized.params.items()}
    assert torch.equal(fmt.fake(values.reshape(-1, fmt.block), params).reshape(values.shape), values)
    assert layer_error(x, w, values) < 0.8 * layer_error(x, w, rtn(w, fmt).dequantize())
