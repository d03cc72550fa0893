import pytest
import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats import IntFormat, parse_format
from ptqrepro.methods.rtn import rtn


@pytest.mark.parametrize(
    "text, expected",
    [
        ("int8", IntFormat(8)),
        ("int4", IntFormat(4)),
        ("int3-g128", IntFormat(3, 128)),
        ("int2-sym", IntFormat(2, symmetric=True)),
        ("INT4-g64-sym", IntFormat(4, 64, True)),
        ("int4-asym", IntFormat(4)),
    ],
)
def test_parse_valid(text, expected):
    assert parse_format(text) == expected
    assert parse_format(expected.name) == expected


@pytest.mark.parametrize("text", ["fp16", "none", "bf16", None])
def test_parse_unquantized(text):
    assert parse_format(text) is None


@pytest.mark.parametrize("text", ["int", "int9", "int1", "float4", "int4-g", "int4-g0", "int4-x", "int4-g64-g32", "int4-sym-sym"])
def test_parse_invalid_names_the_string(text):
    with pytest.raises(PtqError, match="cannot parse format"):
        parse_format(text)


def weights(rows=16, cols=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator)
    w[3, 7] = 12.0  # an outlier row
    return w


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "int2", "int4-g32", "int3-g16-sym", "int2-sym"])
def test_rtn_output_lies_on_its_grid(fmt):
    fmt = parse_format(fmt)
    q = rtn(weights(), fmt)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= fmt.maxq
    deq = q.dequantize()
    scale, zero = q.params["scale"], q.params["zero"]
    positions = deq.view(16, q.groups, -1) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    assert torch.allclose(positions, positions.round(), atol=1e-3)
    assert positions.round().min() >= 0 and positions.round().max() <= fmt.maxq
    assert torch.equal(zero, zero.round())


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3-g32"])
def test_rtn_error_is_at_most_half_a_step(fmt):
    """Asymmetric min-max covers every value, so RTN never clips: |w - Q(w)| <= scale / 2."""
    w = weights()
    q = rtn(w, parse_format(fmt))
    step = q.params["scale"].repeat_interleave(w.shape[1] // q.groups, dim=1)
    assert ((w - q.dequantize()).abs() <= step / 2 + 1e-5).all()


def test_more_bits_and_smaller_groups_give_smaller_error():
    w = weights()
    error = {f: float((w - rtn(w, parse_format(f)).dequantize()).norm()) for f in ["int8", "int4", "int3", "int4-g32", "int3-g32"]}
    assert error["int8"] < error["int4"] < error["int3"]
    assert error["int4-g32"] < error["int4"]
    assert error["int3-g32"] < error["int3"]


def test_symmetric_grid_is_centred():
    q = rtn(weights(), parse_format("int4-sym"))
    assert torch.all(q.params["zero"] == 8)


def test_zero_row_stays_zero():
    w = weights()
    w[5] = 0
    assert torch.all(rtn(w, parse_format("int3")).dequantize()[5] == 0)


def test_group_that_does_not_divide_names_the_layer():
    with pytest.raises(PtqError, match=r"group size 128 does not divide the 576 inputs of layer model.layers.0.q"):
        rtn(torch.randn(4, 576), parse_format("int4-g128"), "model.layers.0.q")


def test_stored_bits_count_codes_and_group_parameters():
    q = rtn(weights(4, 128), parse_format("int4-g64"))
    assert q.stored_bits() == 4 * 128 * 4 + 16 * 2 * (4 * 2)
