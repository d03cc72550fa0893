"""What every weight format provides, and the stored form of a quantized weight.

A format quantizes groups of consecutive inputs of each output row with shared parameters
(an integer grid's scale and zero point, an MX block's shared exponent):

* ``fit(w)``: the parameters of each row of ``w`` [rows, group], as [rows, 1] tensors;
* ``encode(w, params)`` / ``decode(codes, params)``: nearest grid point as a code, and back;
* ``fake(w, params)``: ``decode(encode(w))``, the fake-quantized values.

RTN fits every group at once; GPTQ fits a group when it reaches the group's first column and
then quantizes column by column with those parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ptqrepro.errors import PtqError


class GroupedFormat:
    bits: int
    code_dtype: ClassVar[torch.dtype]
    param_names: ClassVar[tuple[str, ...]]

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def scheme(self) -> str:
        """The format without its element width: what stays fixed along a bits sweep."""
        return self.name.replace(str(self.bits), "", 1)

    def group_length(self, in_features: int) -> int | None:
        """Inputs sharing one set of parameters; None: the whole row."""
        raise NotImplementedError

    def parameter_bits(self) -> int:
        """Bits stored per group for its parameters."""
        raise NotImplementedError

    def groups(self, in_features: int, layer: str) -> int:
        """Groups per row; a group length that does not divide the row is an error naming the layer."""
        length = self.group_length(in_features)
        if length is None:
            return 1
        if in_features % length:
            raise PtqError(
                f"format {self.name}: group size {length} does not divide the "
                f"{in_features} inputs of layer {layer}"
            )
        return in_features // length

    def fit(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def fake(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decode(self.encode(w, params), params)


@dataclass
class QuantizedWeight:
    """A weight [out, in] stored as codes plus one set of format parameters per (row, group)."""

    codes: torch.Tensor  # [out, in], dtype fmt.code_dtype
    params: dict[str, torch.Tensor]  # each float32 [out, groups]
    fmt: GroupedFormat

    @property
    def groups(self) -> int:
        return next(iter(self.params.values())).shape[1]

    def to(self, device) -> "QuantizedWeight":
        """The same weight with its codes and parameters on ``device``."""
        return QuantizedWeight(self.codes.to(device), {key: value.to(device) for key, value in self.params.items()}, self.fmt)

    def dequantize(self) -> torch.Tensor:
        """The weight's values, float32 [out, in]."""
        out_features, in_features = self.codes.shape
        groups = self.groups
        codes = self.codes.view(out_features * groups, in_features // groups)
        params = {key: value.reshape(-1, 1) for key, value in self.params.items()}
        return self.fmt.decode(codes, params).view(out_features, in_features)

    def stored_bits(self) -> int:
        """Bits to store this weight: ``fmt.bits`` per element plus the parameters of every group."""
        return self.codes.numel() * self.fmt.bits + self.fmt.parameter_bits() * self.codes.shape[0] * self.groups

