"""Microscaling (MX) block formats: OCP MX v1.0 (MXFP8, MXFP6, MXFP4, MXINT8) plus MXINT6/4/2.

Sources: OCP Microscaling Formats (MX) Specification v1.0 §5 and microsoft/microxcaling
(``mx/mx_ops.py`` ``_shared_exponents`` with method "max", ``mx/elemwise_ops.py``
``_quantize_elemwise_core`` with rounding "nearest", ``mx/formats.py`` for the element constants).

A block of ``block`` consecutive inputs of a row shares one power-of-two scale ``2^e``, stored in
8 bits as E8M0:

    e = clamp(floor(log2 max|x|) - emax_elem, -127, 127)

Each element ``v = x / 2^e`` is then rounded onto the element grid:

    E(v) = clamp(floor(log2 |v|), emin, emax)           the element's own exponent
    Q(v) = sign(v) · min(round(|v| / 2^(E(v) - m)) · 2^(E(v) - m), max_norm)

with ``m`` mantissa bits and round-to-nearest, ties away from zero. ``Q(x) = 2^e · Q(v)``.

* Floating-point elements eXmY have bias ``2^(X-1) - 1``, ``emin = 1 - bias`` (below it the
  grid continues as subnormals with the same step) and never produce inf or NaN.
* Integer elements (8, 6, 4, 3, 2 bits) are microxcaling's sign-magnitude fixed point ``±1.xxx``: ``emin = emax = 0``
  and ``m = b - 2``, so b bits give step ``2^-(b-2)`` and ``max_norm = (2^(b-1) - 1) · 2^-(b-2)``
  (int8: 127/64). OCP defines MXINT8 only; MXINT6/4/3/2 use the same construction (LQER's "MXINT"
  is this grid, with block 16).

Where this differs from microxcaling, only at the last bit: ``floor(log2 ·)`` is taken exactly
(``frexp``) where microxcaling rounds ``log2`` in float32 (so e.g. ``2^k (1 - 2^-24)`` gets its
true exponent ``k - 1``), and ties are detected exactly where microxcaling's
``floor(|v| + 0.5)`` rounds ``0.5 - 2^-25`` up. An all-zero block gets ``e = -127`` and stays zero.

A block holding an inf or a NaN becomes NaN throughout, as in microxcaling: its ``max|x|`` is inf
or NaN, so ``floor(log2 max|x|) - emax`` is above the E8M0 range or NaN, and ``_quantize_mx``
sets the shared exponent to NaN (E8M0's NaN code), which ``x / 2^e`` and ``Q(v) · 2^e`` carry into
every element. Here ``fit`` gives such a block the exponent NaN and ``encode``/``decode``/``fake``
follow it (stored integer codes of such a block are meaningless; they decode to NaN). Other blocks
of the same row are unaffected. A finite float32 block never overflows the E8M0 range
(``floor(log2 max|x|) <= 127``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats.base import GroupedFormat

SCALE_BITS = 8
"""Bits of one block's shared E8M0 exponent."""
SCALE_EXPONENT_LIMIT = 127
"""E8M0 holds the exponents -127..127 (the 256th code is NaN)."""
OCP_BLOCK = 32
"""The block size of the OCP MX v1.0 formats."""


@dataclass(frozen=True)
class Element:
    """One MX element type: ``exponent_bits`` X, ``mantissa_bits`` m, largest exponent ``emax``
    and largest magnitude ``max_norm`` (OCP MX v1.0 Tables 2-4; microxcaling ``formats.py``)."""

    bits: int
    exponent_bits: int
    mantissa_bits: int
    emax: int
    max_norm: float

    @property
    def is_integer(self) -> bool:
        return self.exponent_bits == 0

    @property
    def emin(self) -> int:
        """The smallest normal exponent ``1 - bias``; an integer element has the single exponent 0."""
        if self.is_integer:
            return 0
        return 2 - 2 ** (self.exponent_bits - 1)

    @property
    def code_unit(self) -> float:
        """The element value of code 1: the fixed-point step for integers, 1 for floating point
        (whose codes hold the element values themselves)."""
        return 2.0**-self.mantissa_bits if self.is_integer else 1.0


def _integer_element(bits: int) -> Element:
    """Sign-magnitude fixed point with ``bits - 2`` fraction bits: ``k · 2^-(b-2)``, |k| <= 2^(b-1) - 1."""
    fraction_bits = bits - 2
    return Element(bits, 0, fraction_bits, 0, (2 ** (bits - 1) - 1) / 2**fraction_bits)


ELEMENTS: dict[str, Element] = {
    "int8": _integer_element(8),
    "int6": _integer_element(6),
    "int4": _integer_element(4),
    "int3": _integer_element(3),
    "int2": _integer_element(2),
    "fp8-e4m3": Element(8, 4, 3, emax=8, max_norm=448.0),
    "fp8-e5m2": Element(8, 5, 2, emax=15, max_norm=57344.0),
    "fp6-e3m2": Element(6, 3, 2, emax=4, max_norm=28.0),
    "fp6-e2m3": Element(6, 2, 3, emax=2, max_norm=7.5),
    "fp4-e2m1": Element(4, 2, 1, emax=2, max_norm=6.0),
}
"""Element name -> element type."""


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2 |x|)`` exactly, as int32 (``|x| = f · 2^k`` with ``f`` in [0.5, 1) gives ``k - 1``);
    zero gives -1."""
    return torch.frexp(x.abs()).exponent - 1


def round_half_away(magnitude: torch.Tensor) -> torch.Tensor:
    """Nearest integer to a non-negative ``magnitude``, ties up (away from zero); exact in float32."""
    whole = torch.floor(magnitude)
    return whole + (magnitude - whole >= 0.5)


def quantize_elements(v: torch.Tensor, element: Element) -> torch.Tensor:
    """``Q(v)`` of the module docstring: ``v`` (float32, already divided by its block scale) rounded
    to the nearest value of ``element``, saturated at ``±max_norm``."""
    if element.is_integer:
        step = 2.0**-element.mantissa_bits  # the one exponent 0: a fixed step, no per-element log2
    else:
        step = torch.exp2((floor_log2(v).clamp(element.emin, element.emax) - element.mantissa_bits).float())
    magnitude = (round_half_away(v.abs() / step) * step).clamp(max=element.max_norm)
    return torch.copysign(magnitude, v)


@dataclass(frozen=True)
class MXFormat(GroupedFormat):
    """An MX format: ``element`` (a key of ``ELEMENTS``) in blocks of ``block`` inputs of a row."""

    element: str
    block: int = OCP_BLOCK

    param_names = ("exponent",)

    def __post_init__(self) -> None:
        if self.element not in ELEMENTS:
            raise PtqError(f"unknown MX element {self.element!r}; expected one of {', '.join(ELEMENTS)}")
        if self.block < 1:
            raise PtqError(f"MX block size must be positive, got {self.block}")

    @property
    def spec(self) -> Element:
        return ELEMENTS[self.element]

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def code_dtype(self) -> torch.dtype:
        """int8 codes ``k`` for integer elements, float16 element values (exact) for floating point."""
        return torch.int8 if self.spec.is_integer else torch.float16

    @property
    def name(self) -> str:
        """``mxint4``, ``mxint4-b16``, ``mxfp8-e4m3``, ``mxfp6-e2m3``, ``mxfp4`` (e2m1, the only FP4)."""
        width, _, variant = self.element.partition("-")
        parts = [f"mx{width}"]
        if variant and width != "fp4":
            parts.append(variant)
        if self.block != OCP_BLOCK:
            parts.append(f"b{self.block}")
        return "-".join(parts)

    def group_length(self, in_features: int) -> int:
        return self.block

    def parameter_bits(self) -> int:
        return SCALE_BITS

    def fit(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Shared exponent ``clamp(floor(log2 max|w|) - emax, -127, 127)`` of each row of ``w``
        [rows, block], float32 [rows, 1]; -127 for an all-zero row, NaN for a row holding an inf or
        a NaN (microxcaling's NaN block; module docstring)."""
        absmax = w.float().abs().amax(dim=1, keepdim=True)
        exponent = (floor_log2(absmax) - self.spec.emax).clamp(-SCALE_EXPONENT_LIMIT, SCALE_EXPONENT_LIMIT).float()
        exponent = torch.where(absmax == 0, -SCALE_EXPONENT_LIMIT, exponent)
        return {"exponent": torch.where(absmax.isfinite(), exponent, float("nan"))}

    def encode(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes of ``Q(w / 2^e)`` as float32: integers ``k`` (element ``k · 2^-(b-2)``) for integer
        elements, the element values for floating point."""
        elements = quantize_elements(w.float() / torch.exp2(params["exponent"]), self.spec)
        return elements / self.spec.code_unit

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``codes · code_unit · 2^e``, float32."""
        return codes.float() * self.spec.code_unit * torch.exp2(params["exponent"])

    def fake(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``decode(encode(w))``. For integer elements, whose step ``2^-m`` is fixed, in one pass
        of in-place operations with the block's step ``s = 2^(e - m)``:
        ``sign(w) · min(round_half_away(|w| / s), max_norm / 2^-m) · s``, bit for bit the same
        values (every scaling is by a power of two) at half the cost: it is the activation
        quantizer of every MX recipe's evaluation."""
        element = self.spec
        if not element.is_integer:
            return super().fake(w, params)
        w = w.float()
        step = torch.exp2(params["exponent"] - element.mantissa_bits)
        magnitude = w.abs().div_(step)
        whole = magnitude.floor()
        whole.add_(magnitude.sub_(whole).ge_(0.5))
        return whole.clamp_(max=element.max_norm / element.code_unit).mul_(step).copysign_(w)
