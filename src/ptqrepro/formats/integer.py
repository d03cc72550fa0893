"""Uniform integer grids with min-max parameters, per output channel or per group of inputs.

The grid follows the GPTQ reference quantizer (IST-DASLab/gptq ``quant.py``):

* asymmetric (default): ``x_min = min(w, 0)``, ``x_max = max(w, 0)``,
  ``scale = (x_max - x_min) / (2^b - 1)``, ``zero = round(-x_min / scale)``;
* symmetric: ``x_max = max(|x_min|, x_max)``, ``scale = 2 x_max / (2^b - 1)``,
  ``zero = (2^b - 1 + 1) / 2 = 2^(b-1)``;
* ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)`` and ``Q(w) = scale (q - zero)``.

A row whose range is empty (all zeros) gets the range [-1, 1], as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqrepro.errors import PtqError

SCALE_BITS = 16
"""Bits stored per group parameter (scale and zero point) when counting bits per weight."""


@dataclass(frozen=True)
class IntFormat:
    bits: int
    group_size: int | None = None
    symmetric: bool = False

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
        return "-".join(parts)

    @property
    def scheme(self) -> str:
        """The format without its bit width: what stays fixed along a bits sweep (``int-g64``)."""
        return self.name.replace(f"int{self.bits}", "int", 1)

    def groups(self, in_features: int, layer: str) -> int:
        """Number of groups per output row; a group size that does not divide the row is an error."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise PtqError(
                f"format {self.name}: group size {self.group_size} does not divide the "
                f"{in_features} inputs of layer {layer}"
            )
        return in_features // self.group_size

    def grid_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of each row of ``w`` ([rows, n] -> two [rows] tensors)."""
        w = w.float()
        x_min = w.min(dim=1).values.clamp(max=0)
        x_max = w.max(dim=1).values.clamp(min=0)
        if self.symmetric:
            x_max = torch.maximum(-x_min, x_max)
            x_min = -x_max
        empty = (x_min == 0) & (x_max == 0)
        x_min = torch.where(empty, -1.0, x_min)
        x_max = torch.where(empty, 1.0, x_max)
        scale = (x_max - x_min) / self.maxq
        if self.symmetric:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-x_min / scale)
        return scale, zero

    def encode(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes ``clamp(round(w / scale) + zero, 0, maxq)``; scale/zero broadcast against w."""
        return torch.clamp(torch.round(w.float() / scale) + zero, 0, self.maxq)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Fake-quantize: ``scale (encode(w) - zero)``."""
        return scale * (self.encode(w, scale, zero) - zero)


@dataclass
class QuantizedWeight:
    """A weight stored as integer codes with one scale and zero point per (row, group)."""

    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor  # float32 [out, groups]
    fmt: IntFormat

    def dequantize(self) -> torch.Tensor:
        """``W[r, c] = scale[r, g(c)] (codes[r, c] - zero[r, g(c)])`` as float32."""
        out_features, in_features = self.codes.shape
        groups = self.scale.shape[1]
        codes = self.codes.float().view(out_features, groups, in_features // groups)
        weight = self.scale.unsqueeze(-1) * (codes - self.zero.unsqueeze(-1))
        return weight.view(out_features, in_features)

    def stored_bits(self) -> int:
        """Bits to store this weight: b per code plus SCALE_BITS per scale and per zero point."""
        return self.codes.numel() * self.fmt.bits + SCALE_BITS * (self.scale.numel() + self.zero.numel())
