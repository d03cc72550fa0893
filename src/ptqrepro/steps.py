"""The glue between the layer-by-layer pipeline and the methods.

A step receives a ``LayerContext`` (one decoder layer's linear modules, their calibration
statistics and the recipe's weight format) and either transforms float weights or, as the
recipe's quantizer, fills ``context.quantized`` with one ``QuantizedWeight`` per linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ptqrepro.errors import PtqError
from ptqrepro.formats import IntFormat, QuantizedWeight
from ptqrepro.methods.rtn import rtn


@dataclass
class LayerContext:
    index: int
    prefix: str  # qualified name of the decoder layer, e.g. "model.layers.3"
    linears: dict[str, nn.Linear]
    weight_format: IntFormat
    grams: dict[str, torch.Tensor] | None = None  # X^T X of each linear's inputs
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)

    def qualified(self, linear: str) -> str:
        return f"{self.prefix}.{linear}"


@dataclass(frozen=True)
class Step:
    name: ClassVar[str]
    needs_gram: ClassVar[bool] = False
    quantizer: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, recipe: str, settings: dict) -> "Step":
        known = set(cls.__dataclass_fields__)
        unknown = set(settings) - known
        if unknown:
            raise PtqError(
                f"recipe {recipe!r}: step {cls.name!r} has no setting(s) {', '.join(sorted(unknown))}"
                + (f" (known: {', '.join(sorted(known))})" if known else "")
            )
        return cls(**settings)

    def apply(self, context: LayerContext) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class RtnStep(Step):
    """Round-to-nearest every linear of the layer (data-free)."""

    name: ClassVar[str] = "rtn"
    quantizer: ClassVar[bool] = True

    def apply(self, context: LayerContext) -> None:
        for name, linear in context.linears.items():
            context.quantized[name] = rtn(linear.weight.data, context.weight_format, context.qualified(name))


STEPS: dict[str, type[Step]] = {step.name: step for step in (RtnStep,)}
