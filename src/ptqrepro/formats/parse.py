"""Parse format strings into formats.

* Integer grids: ``int<bits>[-g<size>][-sym|-asym][-beta<β>]``, e.g. ``int8``, ``int3-g128``,
  ``int4-g64-sym``, ``int2-beta0.8``; ``beta<β>`` shrinks the step by MagR's β, 0 < β <= 1
  (``IntFormat.shrink``, docs/papers.md#magr-the-beta-shrink-of-the-step).
* MX formats: ``mxint<bits>[-b<size>]`` (bits 8, 6, 4, 2) and ``mxfp<bits>[-e<X>m<Y>][-b<size>]``
  with ``mxfp8`` = ``mxfp8-e4m3`` (or ``-e5m2``), ``mxfp6`` = ``mxfp6-e2m3`` (or ``-e3m2``) and
  ``mxfp4`` = e2m1; the block size defaults to 32 (OCP), e.g. ``mxint4-b16`` is LQER's MXINT4.

Options may come in any order, each at most once; matching is case-insensitive.
``fp16``, ``bf16``, ``fp32`` and ``none`` mean "not quantized" and parse to ``None``.
"""

from __future__ import annotations

import re

from ptqrepro.errors import PtqError
from ptqrepro.formats.base import GroupedFormat
from ptqrepro.formats.integer import IntFormat
from ptqrepro.formats.mx import ELEMENTS, OCP_BLOCK, MXFormat

UNQUANTIZED = {"fp16", "bf16", "fp32", "none"}
_INT = re.compile(r"int(\d+)")
_GROUP = re.compile(r"g(\d+)")
_BETA = re.compile(r"beta(\d+(?:\.\d*)?|\.\d+)")
_MX = re.compile(r"mx(int|fp)(\d+)")
_BLOCK = re.compile(r"b(\d+)")
_FP_VARIANT = re.compile(r"e\d+m\d+")
DEFAULT_FP_VARIANT = {8: "e4m3", 6: "e2m3", 4: "e2m1"}
"""The element an ``mxfp<bits>`` without a variant means."""


def parse_format(text: str | None) -> GroupedFormat | None:
    """Parse one format string; anything that does not parse is a one-line PtqError."""
    if text is None or str(text).lower() in UNQUANTIZED:
        return None
    head, *options = str(text).lower().split("-")
    if head.startswith("mx"):
        return _parse_mx(str(text), head, options)
    return _parse_int(str(text), head, options)


def _positive_size(text: str, match: re.Match, what: str) -> int:
    size = int(match.group(1))
    if size < 1:
        raise PtqError(f"cannot parse format {text!r}: {what} size must be positive")
    return size


def _parse_int(text: str, head: str, options: list[str]) -> IntFormat:
    match = _INT.fullmatch(head)
    if not match:
        raise PtqError(
            f"cannot parse format {text!r}: expected int<bits>[-g<size>][-sym][-beta<β>], "
            "mxint<bits>[-b<size>], mxfp<bits>[-e<X>m<Y>][-b<size>] or fp16"
        )
    bits = int(match.group(1))
    if not 2 <= bits <= 8:
        raise PtqError(f"cannot parse format {text!r}: integer bits must be 2..8, got {bits}")
    group_size, symmetric, shrink = None, False, None
    for option in options:
        group = _GROUP.fullmatch(option)
        beta = _BETA.fullmatch(option)
        if group and group_size is None:
            group_size = _positive_size(text, group, "group")
        elif option in ("sym", "asym") and not symmetric:
            symmetric = option == "sym"
        elif beta and shrink is None:
            shrink = float(beta.group(1))
        else:
            raise PtqError(
                f"cannot parse format {text!r}: unknown or repeated option {option!r} "
                "(expected g<size>, sym, asym or beta<value>)"
            )
    try:
        return IntFormat(bits, group_size, symmetric, shrink=1.0 if shrink is None else shrink)
    except PtqError as error:  # a beta outside (0, 1]
        raise PtqError(f"cannot parse format {text!r}: {error}") from None


def _parse_mx(text: str, head: str, options: list[str]) -> MXFormat:
    match = _MX.fullmatch(head)
    if not match:
        raise PtqError(f"cannot parse format {text!r}: expected mxint<bits> or mxfp<bits>")
    kind, bits = match.group(1), int(match.group(2))
    block, variant = None, None
    for option in options:
        size = _BLOCK.fullmatch(option)
        if size and block is None:
            block = _positive_size(text, size, "block")
        elif kind == "fp" and _FP_VARIANT.fullmatch(option) and variant is None:
            variant = option
        else:
            expected = "b<size> or e<X>m<Y>" if kind == "fp" else "b<size>"
            raise PtqError(
                f"cannot parse format {text!r}: unknown or repeated option {option!r} (expected {expected})"
            )
    element = f"int{bits}" if kind == "int" else f"fp{bits}-{variant or DEFAULT_FP_VARIANT.get(bits)}"
    if element not in ELEMENTS:
        known = ", ".join(MXFormat(name).name for name in ELEMENTS)
        raise PtqError(f"cannot parse format {text!r}: no such MX element (expected one of {known})")
    return MXFormat(element=element, block=block or OCP_BLOCK)
