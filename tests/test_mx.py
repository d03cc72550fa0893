import re

import pytest
import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats import IntFormat, MXFormat, parse_format
from ptqrepro.formats.activation import quantize_activation
from ptqrepro.methods.rtn import rtn

# Element constants written out from OCP MX v1.0 and microxcaling, independently of the implementation.
INTEGER = {"int8": (1 / 64, 127), "int6": (1 / 16, 31), "int4": (1 / 4, 7), "int3": (1 / 2, 3), "int2": (1.0, 1)}
"""integer element -> (step, largest code)."""
FLOAT = {"fp8-e4m3": (4, 3, 448.0), "fp8-e5m2": (5, 2, 57344.0), "fp6-e3m2": (3, 2, 28.0),
         "fp6-e2m3": (2, 3, 7.5), "fp4-e2m1": (2, 1, 6.0)}
"""floating-point element -> (exponent bits, mantissa bits, max_norm)."""
EMAX = {"int8": 0, "int6": 0, "int4": 0, "int3": 0, "int2": 0, "fp8-e4m3": 8, "fp8-e5m2": 15,
        "fp6-e3m2": 4, "fp6-e2m3": 2, "fp4-e2m1": 2}
ELEMENTS = list(EMAX)


def max_norm(element):
    if element in INTEGER:
        step, largest = INTEGER[element]
        return step * largest
    return FLOAT[element][2]


def element_values(element):
    """Every value of the element, by enumerating its encodings (sign, exponent field, fraction)."""
    if element in INTEGER:
        step, largest = INTEGER[element]
        return torch.arange(-largest, largest + 1, dtype=torch.float64) * step
    exponent_bits, mantissa_bits, largest = FLOAT[element]
    bias = 2 ** (exponent_bits - 1) - 1
    values = set()
    for field in range(2**exponent_bits):
        for fraction in range(2**mantissa_bits):
            significand = fraction / 2**mantissa_bits + (field > 0)
            value = 2.0 ** (max(field, 1) - bias) * significand
            if value <= largest:  # drops e4m3's NaN and e5m2's inf/NaN encodings
                values |= {value, -value}
    return torch.tensor(sorted(values), dtype=torch.float64)


def weights(rows=8, cols=256, seed=0):
    """Normal weights whose rows span 2^-20..2^20, with an outlier."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator)
    w *= torch.exp2(torch.randint(-20, 21, (rows, 1), generator=generator).float())
    w[1, 5] *= 50
    return w


def uniform(rows, cols, bound, seed=4):
    """Uniform values in (-bound, bound)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


def block_exponents(q):
    """Each element's shared exponent, [out, in]."""
    return q.params["exponent"].repeat_interleave(q.fmt.block, dim=1)


# ---- names and parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mxint8", MXFormat("int8")),
        ("mxint6", MXFormat("int6")),
        ("mxint4", MXFormat("int4")),
        ("mxint2", MXFormat("int2")),
        ("mxint4-b16", MXFormat("int4", 16)),
        ("MXINT8-b32", MXFormat("int8")),
        ("mxfp8", MXFormat("fp8-e4m3")),
        ("mxfp8-e4m3", MXFormat("fp8-e4m3")),
        ("mxfp8-e5m2", MXFormat("fp8-e5m2")),
        ("mxfp8-b16-e5m2", MXFormat("fp8-e5m2", 16)),
        ("mxfp6", MXFormat("fp6-e2m3")),
        ("mxfp6-e3m2", MXFormat("fp6-e3m2")),
        ("mxfp6-e2m3", MXFormat("fp6-e2m3")),
        ("mxfp4", MXFormat("fp4-e2m1")),
        ("mxfp4-e2m1", MXFormat("fp4-e2m1")),
        ("mxfp4-b16", MXFormat("fp4-e2m1", 16)),
    ],
)
def test_parse_valid(text, expected):
    assert parse_format(text) == expected


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("block", [32, 16, 64])
def test_name_round_trips(element, block):
    fmt = MXFormat(element, block)
    assert parse_format(fmt.name) == fmt
    assert ("-b" in fmt.name) == (block != 32)


def test_names_and_schemes():
    names = {e: MXFormat(e).name for e in ELEMENTS}
    assert names == {"int8": "mxint8", "int6": "mxint6", "int4": "mxint4", "int3": "mxint3", "int2": "mxint2",
                     "fp8-e4m3": "mxfp8-e4m3", "fp8-e5m2": "mxfp8-e5m2", "fp6-e3m2": "mxfp6-e3m2",
                     "fp6-e2m3": "mxfp6-e2m3", "fp4-e2m1": "mxfp4"}
    assert MXFormat("int4", 16).name == "mxint4-b16"
    assert MXFormat("int4", 16).scheme == MXFormat("int8", 16).scheme == "mxint-b16"
    assert MXFormat("fp8-e4m3").bits == 8 and MXFormat("fp4-e2m1").bits == 4


@pytest.mark.parametrize(
    "text",
    ["mx", "mxint", "mxint5", "mxint16", "mxfp5", "mxfp8-e3m4", "mxfp6-e4m3", "mxfp4-e3m0",
     "mxint4-e2m1", "mxint4-b0", "mxint4-b", "mxint4-b16-b32", "mxfp8-e4m3-e5m2", "mxint4-g32",
     "mxint4-sym", "mxfloat4"],
)
def test_parse_invalid_names_the_string(text):
    with pytest.raises(PtqError, match=re.escape(f"cannot parse format '{text}'")) as error:
        parse_format(text)
    assert "\n" not in str(error.value)


def test_bad_element_or_block_is_an_error():
    with pytest.raises(PtqError, match="fp7"):
        MXFormat("fp7")
    with pytest.raises(PtqError, match="block"):
        MXFormat("int4", 0)


# ---- the grid -------------------------------------------------------------------------------


@pytest.mark.parametrize("element", ELEMENTS)
def test_rtn_output_lies_on_its_grid(element):
    fmt = MXFormat(element)
    w = weights()
    q = rtn(w, fmt)
    assert q.codes.dtype == (torch.int8 if element in INTEGER else torch.float16)
    assert q.params["exponent"].dtype == torch.float32 and q.params["exponent"].shape == (8, 256 // 32)
    scaled = q.dequantize().double() / torch.exp2(block_exponents(q).double())
    assert torch.isin(scaled, element_values(element)).all()
    assert scaled.abs().max() <= max_norm(element)


@pytest.mark.parametrize("element", ELEMENTS)
def test_shared_exponent_is_floor_log2_of_block_max_minus_emax(element):
    w = weights()
    q = rtn(w, MXFormat(element))
    absmax = w.view(8, -1, 32).abs().amax(dim=-1).double()
    assert torch.equal(q.params["exponent"].double(), torch.floor(torch.log2(absmax)) - EMAX[element])


@pytest.mark.parametrize("element", ELEMENTS)
def test_fake_equals_stored_codes_decoded(element):
    """Casting codes to the code dtype loses nothing: fake(w) == dequantize(rtn(w))."""
    fmt = MXFormat(element)
    w = weights()
    blocks = w.reshape(-1, 32)
    assert torch.equal(fmt.fake(blocks, fmt.fit(blocks)).view_as(w), rtn(w, fmt).dequantize())


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("power", [-30, -3, 0, 7])
def test_power_of_two_block_max_is_kept_exactly(element, power):
    w = uniform(2, 64, 2.0**power)
    w[0, 3] = 2.0**power
    w[1, 40] = -(2.0**power)
    deq = rtn(w, MXFormat(element)).dequantize()
    assert deq[0, 3] == 2.0**power and deq[1, 40] == -(2.0**power)


@pytest.mark.parametrize("element", ELEMENTS)
def test_values_beyond_the_range_saturate_at_max_norm(element):
    """A block max of 1.99 · 2^k scales to 1.99 · 2^emax, beyond max_norm: it clamps to max_norm · 2^e."""
    w = uniform(2, 32, 2.0**-8)
    w[0, 0], w[1, 9] = 1.99 * 2.0**5, -1.99 * 2.0**-8
    q = rtn(w, MXFormat(element))
    deq = q.dequantize().double()
    exponent = q.params["exponent"][:, 0].double()
    assert exponent.tolist() == [5 - EMAX[element], -8 - EMAX[element]]
    assert deq[0, 0] == max_norm(element) * 2.0 ** exponent[0]
    assert deq[1, 9] == -max_norm(element) * 2.0 ** exponent[1]


@pytest.mark.parametrize("element", ELEMENTS)
def test_all_zero_block_stays_zero(element):
    w = weights(2, 96)
    w[0, 32:64] = 0
    w[1, :32] = 0
    deq = rtn(w, MXFormat(element)).dequantize()
    assert torch.all(deq[0, 32:64] == 0) and torch.all(deq[1, :32] == 0)
    assert deq[0, :32].abs().max() > 0


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_block_with_inf_or_nan_is_nan_throughout_as_microxcaling(element, bad):
    """microxcaling's shared exponent of such a block overflows E8M0 (inf) or is NaN, and becomes
    NaN, so every element of the block is NaN; the row's other blocks are quantized as alone."""
    fmt = MXFormat(element)
    w = weights(2, 96)
    w[0, 40] = bad
    params = fmt.fit(w.reshape(-1, 32))
    assert params["exponent"].reshape(2, 3)[0, 1].isnan() and not params["exponent"].reshape(2, 3)[:, [0, 2]].isnan().any()
    fake = fmt.fake(w.reshape(-1, 32), params).reshape(2, 96)
    assert fake[0, 32:64].isnan().all()
    clean = w.clone()
    clean[0, 32:64] = 0
    assert torch.equal(torch.cat([fake[0, :32], fake[0, 64:], fake[1]]),
                       torch.cat([rtn(clean, fmt).dequantize()[0, :32], rtn(clean, fmt).dequantize()[0, 64:],
                                  rtn(clean, fmt).dequantize()[1]]))
    assert rtn(w, fmt).dequantize()[0, 32:64].isnan().all()
    activation = quantize_activation(w[None], fmt)[0]
    assert activation[0, 32:64].isnan().all() and activation[:, 64:].isfinite().all()


def test_shared_exponent_saturates_at_e8m0_range():
    fmt = MXFormat("int8")
    tiny = torch.full((1, 32), 2.0**-140)
    assert fmt.fit(tiny)["exponent"].item() == -127


@pytest.mark.parametrize("element", ELEMENTS)
def test_elements_round_to_the_nearest_enumerated_value(element):
    """With shared exponent 0, encode(v) is the enumerated element value nearest v (ties aside)."""
    fmt = MXFormat(element)
    generator = torch.Generator().manual_seed(1)
    largest = max_norm(element)
    v = torch.cat([
        (torch.rand(4000, generator=generator) * 2 - 1) * 1.3 * largest,
        torch.randn(4000, generator=generator)
        * torch.exp2(torch.randint(-20, 2, (4000,), generator=generator).float()),
    ]).view(-1, 1)
    codes = fmt.encode(v, {"exponent": torch.zeros(v.shape[0], 1)})
    mine = fmt.decode(codes, {"exponent": torch.zeros(v.shape[0], 1)}).double().view(-1)
    grid = element_values(element)
    distance = (v.double() - grid).abs()
    two_nearest = distance.topk(2, dim=1, largest=False).values
    not_tie = two_nearest[:, 1] - two_nearest[:, 0] > 1e-9 * two_nearest[:, 1]
    nearest = grid[distance.argmin(dim=1)]
    assert not_tie.sum() > 7900
    assert torch.equal(mine[not_tie], nearest[not_tie])


@pytest.mark.parametrize(
    "element, ties, rounded",
    [
        ("fp4-e2m1", [0.25, 2.5, -5.0, 0.75], [0.5, 3.0, -6.0, 1.0]),
        ("fp6-e2m3", [0.0625, -3.125, 6.75], [0.125, -3.25, 7.0]),
        ("int4", [0.125, -0.375, 1.625], [0.25, -0.5, 1.75]),
        ("int2", [0.5, -0.5], [1.0, -1.0]),
    ],
)
def test_ties_round_away_from_zero(element, ties, rounded):
    fmt = MXFormat(element)
    v = torch.tensor(ties).view(-1, 1)
    zero = {"exponent": torch.zeros(len(ties), 1)}
    assert fmt.fake(v, zero).view(-1).tolist() == rounded


def test_eight_bit_elements_are_far_more_accurate_than_four_bit():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    formats = ["mxint8", "mxint4", "mxfp8", "mxfp4"]
    error = {f: float((w - rtn(w, parse_format(f)).dequantize()).norm()) for f in formats}
    assert error["mxint8"] < error["mxint4"] / 10
    assert error["mxfp8"] < error["mxfp4"] / 3  # relative step 2^-3 (e4m3) against 2^-1 (e2m1)


@pytest.mark.parametrize(
    "text, bits", [("mxint4", 4.25), ("mxint4-b16", 4.5), ("mxfp8", 8.25), ("mxfp4", 4.25), ("mxint8-b16", 8.5)]
)
def test_bits_per_element_count_the_shared_exponents(text, bits):
    q = rtn(weights(4, 128), parse_format(text))
    assert q.stored_bits() / q.codes.numel() == bits


def test_block_that_does_not_divide_names_the_layer():
    with pytest.raises(PtqError, match=r"group size 32 does not divide the 48 inputs of layer fc1"):
        rtn(torch.randn(4, 48), parse_format("mxint4"), "fc1")


# ---- activations ----------------------------------------------------------------------------


def activations(shape=(2, 5, 64), seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    return x * torch.exp2(torch.randint(-6, 7, shape[:-1] + (1,), generator=generator).float())


def test_per_token_int8_keeps_each_token_absmax_and_lies_on_its_grid():
    x = activations()
    y = quantize_activation(x, parse_format("int8"))
    absmax = x.abs().amax(dim=-1, keepdim=True)
    assert torch.allclose(y.abs().amax(dim=-1, keepdim=True), absmax, rtol=1e-6, atol=0)
    codes = y / (absmax / 127)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.abs().max() <= 127 + 1e-3
    assert ((x - y).abs() <= absmax / 127 / 2 * (1 + 1e-5)).all()


def test_int_group_size_quantizes_each_group_of_channels():
    x = activations()
    x[..., :16] *= 100  # one loud group must not coarsen the others
    y = quantize_activation(x, parse_format("int4-g16"))
    groups_x, groups_y = x.view(2, 5, 4, 16), y.view(2, 5, 4, 16)
    absmax = groups_x.abs().amax(dim=-1, keepdim=True)
    assert torch.allclose(groups_y.abs().amax(dim=-1, keepdim=True), absmax, rtol=1e-6, atol=0)
    codes = groups_y / (absmax / 7)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.abs().max() <= 7 + 1e-3


def test_zero_token_stays_zero():
    x = activations()
    x[1, 2] = 0
    assert torch.all(quantize_activation(x, parse_format("int8"))[1, 2] == 0)


@pytest.mark.parametrize("fmt", ["mxint8", "mxint4-b16", "mxfp4", "mxfp8-e5m2"])
def test_mx_activation_equals_rtn_of_rows(fmt):
    fmt = parse_format(fmt)
    x = activations((3, 4, 64))
    expected = rtn(x.reshape(-1, 64), fmt).dequantize()
    assert torch.equal(quantize_activation(x, fmt).reshape(-1, 64), expected)


@pytest.mark.parametrize("fmt", ["mxint4", "int8-g32"])
def test_last_dim_not_divisible_names_format_and_dim(fmt):
    with pytest.raises(PtqError, match=rf"{fmt}.*48"):
        quantize_activation(torch.randn(2, 48), parse_format(fmt))


@pytest.mark.parametrize("fmt", ["int8", "mxint8", "mxfp4"])
def test_dtype_and_shape_are_preserved(fmt):
    x = activations().to(torch.bfloat16)
    y = quantize_activation(x, parse_format(fmt))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.equal(y, quantize_activation(x.float(), parse_format(fmt)).to(torch.bfloat16))


def test_unquantized_activation_format_is_identity():
    x = activations()
    assert quantize_activation(x, parse_format("fp16")) is x


def test_activation_quantization_is_symmetric_for_any_int_format():
    x = activations()
    symmetric = quantize_activation(x, IntFormat(8, symmetric=True))
    assert torch.equal(quantize_activation(x, IntFormat(8)), symmetric)
    assert torch.equal(quantize_activation(-x, IntFormat(4)), -quantize_activation(x, IntFormat(4)))


@pytest.mark.parametrize("name", ["mxint8", "mxint6", "mxint4", "mxint3", "mxint2", "mxint4-b16"])
def test_integer_fake_quantization_is_decode_of_encode_bit_for_bit(name):
    """MXFormat.fake's one-pass integer path against the generic decode(encode(w)), on blocks
    spanning twelve orders of magnitude, with zeros, exact ties and saturating values."""
    fmt = parse_format(name)
    generator = torch.Generator().manual_seed(len(name))
    w = torch.randn(256, fmt.block, generator=generator) * torch.logspace(-6, 6, 256)[:, None]
    w[0] = 0.0
    w[1, :4] = torch.tensor([1.0, -0.5, 0.5 + 2.0**-(fmt.spec.mantissa_bits + 1), -(2.0**-(fmt.spec.mantissa_bits + 1))])
    w[2, 0] = -1e30
    params = fmt.fit(w)
    assert torch.equal(fmt.fake(w, params), fmt.decode(fmt.encode(w, params), params))
