"""Integer codes of ``bits`` < 8 packed densely into bytes, for storage (issue 6: compact checkpoints).

A weight's codes take ``bits`` bits each on disk instead of a byte: ``n`` codes become
``ceil(n · bits / 8)`` bytes. The codes are laid out in row-major order as one stream of bits, each
code least significant bit first, and the stream cut into bytes, least significant bit first: bit
``j`` of code ``i`` is bit ``(i · bits + j) mod 8`` of byte ``(i · bits + j) div 8``. Unsigned codes
(an integer grid's ``0 .. 2^bits - 1``) are stored as they are; signed ones (an MX integer element
``-(2^(bits-1) - 1) .. 2^(bits-1) - 1``) in ``bits``-bit two's complement, and sign-extended when
unpacked.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ptqrepro.errors import PtqError

CHUNK_CODES = 1 << 22
"""Codes packed or unpacked at a time (a multiple of 8, so every chunk starts on a byte): bounds the
temporary bit stream to a few tens of MB whatever the weight's size."""

PACKABLE = (torch.uint8, torch.int8)
"""Code dtypes whose values are integers of at most 8 bits (floating-point codes are stored as they are)."""


def _check(dtype: torch.dtype, bits: int) -> None:
    if dtype not in PACKABLE or not 1 <= bits <= 8:
        raise PtqError(f"cannot pack {dtype} codes of {bits} bits: expected uint8 or int8 codes of 1 to 8 bits")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes (any shape, uint8 or int8, each fitting in ``bits`` bits) as a flat uint8 CPU tensor
    of ``ceil(codes.numel() · bits / 8)`` bytes."""
    _check(codes.dtype, bits)
    flat = codes.detach().cpu().reshape(-1).view(torch.uint8).numpy()
    chunks = [
        np.packbits(np.unpackbits(flat[start : start + CHUNK_CODES, None], axis=1, count=bits, bitorder="little"),
                    bitorder="little")
        for start in range(0, flat.size, CHUNK_CODES)
    ]
    return torch.from_numpy(np.concatenate(chunks) if chunks else np.empty(0, np.uint8))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``pack_codes``: the ``shape`` codes of ``dtype`` (int8 codes sign-extended), on the CPU."""
    _check(dtype, bits)
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(count * bits / 8):
        raise PtqError(f"{packed.numel()} packed bytes do not hold {count} codes of {bits} bits")
    source = packed.cpu().numpy()
    codes = np.empty(count, np.uint8)
    for start in range(0, count, CHUNK_CODES):
        length = min(CHUNK_CODES, count - start)
        first = start * bits // 8
        stream = np.unpackbits(source[first : first + math.ceil(length * bits / 8)], count=length * bits, bitorder="little")
        stream = stream.reshape(length, bits)
        chunk = codes[start : start + length]
        chunk[:] = stream[:, 0]
        for j in range(1, bits):
            chunk |= stream[:, j] << j
    if dtype == torch.int8 and bits < 8:
        codes = np.where(codes >= 1 << (bits - 1), codes.astype(np.int16) - (1 << bits), codes).astype(np.int8)
    return torch.from_numpy(codes.view(np.int8) if dtype == torch.int8 else codes).view(shape)
