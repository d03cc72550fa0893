"""Uniform integer grids with min-max parameters, per output channel or per group of inputs.

The grid follows the GPTQ reference quantizer (IST-DASLab/gptq ``quant.py``):

* asymmetric (default): ``x_min = min(w, 0)``, ``x_max = max(w, 0)``,
  ``scale = β (x_max - x_min) / (2^b - 1)``, ``zero = round(-x_min / scale)``;
* symmetric: ``x_max = max(|x_min|, x_max)``, ``scale = β 2 x_max / (2^b - 1)``, ``zero = 2^(b-1)``;
* ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)`` and ``Q(w) = scale (q - zero)``.

``β`` (``shrink``, default 1) is MagR's shrink of the quantisation step (MagR paper §5 "The
choice of parameters", Table 8; code ``quant.py``: ``scale = beta*(xmax - xmin)/maxq``; see
docs/papers.md#magr-the-beta-shrink-of-the-step). With ``β < 1`` the grid is finer and no longer spans the whole range: the
asymmetric grid still starts at ``x_min`` and clips the values above
``x_min + β (x_max - x_min)`` to its top code, as the reference does; the symmetric grid stays
centred and clips both ends. The zero point is not clamped, as in the reference: a row with
``x_max = 0`` gets ``zero = round((2^b - 1) / β)``, above the top code.

A row whose range is empty (all zeros) gets the range [-1, 1], as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats.base import GroupedFormat

PARAMETER_BITS = 16
"""Bits stored per group parameter (an fp16 scale and zero point) when counting bits per weight."""


@dataclass(frozen=True)
class IntFormat(GroupedFormat):
    bits: int
    group_size: int | None = None
    symmetric: bool = False
    shrink: float = 1.0
    """MagR's β: the step is β times the min-max step, 0 < β <= 1."""

    code_dtype = torch.uint8
    param_names = ("scale", "zero")

    def __post_init__(self) -> None:
        if not 0 < self.shrink <= 1:
            raise PtqError(f"integer grid: shrink (beta) must be in (0, 1], got {self.shrink}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def name(self) -> str:
        parts = [f"int{self.bits}"]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.symmetric:
            parts.append("sym")
        if self.shrink != 1:
            parts.append(f"beta{Decimal(repr(float(self.shrink))):f}")
        return "-".join(parts)

    def group_length(self, in_features: int) -> int | None:
        return self.group_size

    def parameter_bits(self) -> int:
        return 2 * PARAMETER_BITS

    def fit(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scale and zero point of each row of ``w`` [rows, n], as [rows, 1] tensors."""
        w = w.float()
        x_min = w.amin(dim=1, keepdim=True).clamp(max=0)  # amin/amax: 20x faster on CPU than min/max(dim)
        x_max = w.amax(dim=1, keepdim=True).clamp(min=0)
        if self.symmetric:
            x_max = torch.maximum(-x_min, x_max)
            x_min = -x_max
        empty = (x_min == 0) & (x_max == 0)
        x_min = torch.where(empty, -1.0, x_min)
        x_max = torch.where(empty, 1.0, x_max)
        scale = self.shrink * (x_max - x_min) / self.maxq
        if self.symmetric:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-x_min / scale)
        return {"scale": scale, "zero": zero}

    def encode(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Integer codes ``clamp(round(w / scale) + zero, 0, maxq)``."""
        return torch.clamp(torch.round(w.float() / params["scale"]) + params["zero"], 0, self.maxq)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``scale (codes - zero)``."""
        return params["scale"] * (codes.float() - params["zero"])
