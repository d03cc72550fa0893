"""An out-of-tree method, registered as docs/extending.md#bring-your-own-method shows: round-to-
nearest with a clipping search. For each output row, every candidate ratio r shrinks the row's
grid range to r times the fitted one (the grid is fitted on r W, the row's own values are then
rounded onto it, clamped to its end codes); the row keeps the r of least squared error
||W_row - Q_r(W_row)||^2 over its groups. r = 1 is plain RTN, so the chosen grid is never worse.

The same idea as AWQ's clip search (mit-han-lab/llm-awq auto_clip.py), without the calibration
data: the error is the weight's own, not the layer output's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats import GroupedFormat, QuantizedWeight
from ptqrepro.recipe.steps import LayerContext, Step, register_step


def clip_search_rtn(weight: torch.Tensor, fmt: GroupedFormat, ratios: tuple[float, ...],
                    layer: str = "weight") -> tuple[QuantizedWeight, torch.Tensor]:
    """``weight`` [out, in] on the grid of the best ratio of each row; returns it and the ratios
    [out] chosen."""
    out_features, in_features = weight.shape
    groups = fmt.groups(in_features, layer)
    blocks = weight.float().reshape(out_features * groups, in_features // groups)
    errors = torch.stack([
        (fmt.fake(blocks, fmt.fit(blocks * ratio)) - blocks).pow(2).reshape(out_features, -1).sum(dim=1)
        for ratio in ratios
    ])
    chosen = torch.tensor(ratios, dtype=torch.float32, device=weight.device)[errors.argmin(dim=0)]
    params = fmt.fit(blocks * chosen.repeat_interleave(groups)[:, None])
    codes = fmt.encode(blocks, params)
    quantized = QuantizedWeight(
        codes=codes.to(fmt.code_dtype).reshape(out_features, in_features),
        params={key: value.reshape(out_features, groups) for key, value in params.items()},
        fmt=fmt,
    )
    return quantized, chosen


@register_step
@dataclass(frozen=True)
class ClipRtnStep(Step):
    """A data-free quantizer: ``clip_search_rtn`` on every linear with the candidate ``ratios``."""

    name: ClassVar[str] = "cliprtn"
    quantizer: ClassVar[bool] = True
    ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)

    def __post_init__(self) -> None:
        ratios = tuple(self.ratios)
        if not ratios or not all(isinstance(r, (int, float)) and 0 < r <= 1 for r in ratios) or 1.0 not in ratios:
            raise PtqError(f"step {self.name}: ratios must be numbers in (0, 1] including 1.0, got {self.ratios!r}")
        object.__setattr__(self, "ratios", ratios)

    def quantize(self, context: LayerContext, names: tuple[str, ...]) -> None:
        for name in names:
            weight = context.linears[name].weight.data
            context.quantized[name], chosen = clip_search_rtn(weight, context.weight_format, self.ratios,
                                                              context.qualified(name))
            context.note(name, cliprtn_mean_ratio=float(chosen.mean()))
