"""Parse format strings such as ``int8``, ``int4``, ``int3-g128``, ``int2-sym``, ``int4-g64-sym``.

``fp16``, ``bf16``, ``fp32`` and ``none`` mean "not quantized" and parse to ``None``.
"""

from __future__ import annotations

import re

from ptqrepro.errors import PtqError
from ptqrepro.formats.integer import IntFormat

UNQUANTIZED = {"fp16", "bf16", "fp32", "none"}
_INT = re.compile(r"int(\d+)")
_GROUP = re.compile(r"g(\d+)")


def parse_format(text: str | None) -> IntFormat | None:
    """Parse one format string; anything that does not parse is a one-line PtqError."""
    if text is None or str(text).lower() in UNQUANTIZED:
        return None
    head, *options = str(text).lower().split("-")
    match = _INT.fullmatch(head)
    if not match:
        raise PtqError(f"cannot parse format {text!r}: expected int<bits>[-g<size>][-sym] or fp16")
    bits = int(match.group(1))
    if not 2 <= bits <= 8:
        raise PtqError(f"cannot parse format {text!r}: integer bits must be 2..8, got {bits}")
    group_size, symmetric = None, False
    for option in options:
        group = _GROUP.fullmatch(option)
        if group and group_size is None:
            group_size = int(group.group(1))
            if group_size < 1:
                raise PtqError(f"cannot parse format {text!r}: group size must be positive")
        elif option in ("sym", "asym") and not symmetric:
            symmetric = option == "sym"
        else:
            raise PtqError(
                f"cannot parse format {text!r}: unknown or repeated option {option!r} "
                "(expected g<size>, sym or asym)"
            )
    return IntFormat(bits=bits, group_size=group_size, symmetric=symmetric)
