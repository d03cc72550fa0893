"""Round-to-nearest (RTN): grid parameters fitted per row/group, then the nearest grid point."""

from __future__ import annotations

import torch

from ptqrepro.formats.base import GroupedFormat, QuantizedWeight


def rtn(weight: torch.Tensor, fmt: GroupedFormat, layer: str = "weight") -> QuantizedWeight:
    """Quantize ``weight`` [out, in] to ``fmt``: each row, or each group of ``fmt``'s group length
    of consecutive inputs of a row, gets its own fitted parameters (min-max range, shared
    exponent) and every entry its nearest grid point. ``layer`` names the weight in errors."""
    out_features, in_features = weight.shape
    groups = fmt.groups(in_features, layer)
    blocks = weight.float().reshape(out_features * groups, in_features // groups)
    params = fmt.fit(blocks)
    codes = fmt.encode(blocks, params)
    return QuantizedWeight(
        codes=codes.to(fmt.code_dtype).reshape(out_features, in_features),
        params={key: value.reshape(out_features, groups) for key, value in params.items()},
        fmt=fmt,
    )
