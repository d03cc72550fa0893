"""Codes stored at their format's bits (issue 6: compact checkpoints): packing is lossless for every
width and sign, across chunk boundaries, and an artifact takes about its stored bits on disk."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ptqrepro.export.artifact import MANIFEST, TENSORS, load_artifact, save_artifact
from ptqrepro.errors import PtqError
from ptqrepro.formats import packing, parse_format
from ptqrepro.formats.packing import pack_codes, unpack_codes
from ptqrepro.formats.lowrank import quantize_low_rank
from ptqrepro.methods.rtn import rtn


def random_codes(bits: int, dtype: torch.dtype, shape, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        low, high = 0, 1 << bits
    else:
        low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int16).to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trips_every_width(bits, dtype, monkeypatch):
    """Odd sizes, chunks that end inside a byte's worth of codes, the extreme values of the range."""
    monkeypatch.setattr(packing, "CHUNK_CODES", 24)
    codes = random_codes(bits, dtype, (7, 13), seed=bits)
    codes[0, 0], codes[0, 1] = (0, (1 << bits) - 1) if dtype == torch.uint8 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-7 * 13 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, (7, 13), dtype), codes)


def test_the_bit_layout_is_least_significant_first():
    """Codes 1, 2, 3 of 3 bits: stream 100 010 110 -> bytes 0b11010001, 0b00000000 (lsb first)."""
    assert pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 3).tolist() == [0b11010001, 0b0]


def test_bad_packing_requests_are_clear_errors():
    with pytest.raises(PtqError, match="cannot pack torch.float16 codes"):
        pack_codes(torch.zeros(4, dtype=torch.float16), 4)
    with pytest.raises(PtqError, match="3 packed bytes do not hold 8 codes of 4 bits"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (8,), torch.uint8)


@pytest.mark.parametrize("fmt", ["int3", "int4-g64", "int2-g32", "mxint4", "mxint8", "mxfp4"])
def test_an_artifact_stores_its_codes_at_their_bits_and_loads_them_unchanged(tmp_path, fmt):
    """The file holds ``bits`` per code plus the group parameters (float32, as the quantizer used them)
    and safetensors' header; every code, group parameter and low-rank factor loads back as saved."""
    generator = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(96, 128, generator=generator) for i in range(3)}
    quantized = {name: rtn(w, parse_format(fmt), name) for name, w in weights.items()}
    term = quantize_low_rank(torch.randn(128, 8, generator=generator), torch.randn(8, 96, generator=generator),
                             parse_format(fmt), "l0")
    save_artifact(tmp_path / "a", quantized, {}, {"recipe": "r"}, {"l0": term})
    loaded = load_artifact(tmp_path / "a")
    saved = {**quantized, "l0.down": term.down, "l0.up": term.up}
    back = {**loaded.quantized, "l0.down": loaded.corrections["l0"].down, "l0.up": loaded.corrections["l0"].up}
    for name, weight in saved.items():
        got = back[name]
        assert got.codes.dtype == weight.codes.dtype and torch.equal(got.codes, weight.codes)
        assert all(torch.equal(got.params[key], value) for key, value in weight.params.items())
    weights = list(saved.values())
    codes_bytes = sum(-(-w.codes.numel() * w.fmt.bits // 8) for w in weights)
    params_bytes = sum(v.numel() * v.element_size() for w in weights for v in w.params.values())
    size = (tmp_path / "a" / TENSORS).stat().st_size
    if parse_format(fmt).name.startswith("mxfp"):
        assert size > codes_bytes * 3  # floating-point elements stay float16
    else:
        assert codes_bytes + params_bytes <= size <= codes_bytes + params_bytes + 4096


def test_an_artifact_with_unpacked_codes_still_loads(tmp_path):
    """An artifact (or a layer checkpoint) written before codes were packed: one code per byte and a
    manifest without ``packed_codes``."""
    weight = rtn(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)), parse_format("int4"), "l")
    (tmp_path / "a").mkdir()
    save_file({"l.codes": weight.codes, **{f"l.{k}": v for k, v in weight.params.items()}}, str(tmp_path / "a" / TENSORS))
    (tmp_path / "a" / MANIFEST).write_text(json.dumps({"recipe": "r", "linears": {"l": "int4"}}))
    assert torch.equal(load_artifact(tmp_path / "a").quantized["l"].codes, weight.codes)
