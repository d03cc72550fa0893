"""Round-to-nearest (RTN): min-max grid parameters per row/group, then nearest grid point."""

from __future__ import annotations

import torch

from ptqrepro.formats.integer import IntFormat, QuantizedWeight


def rtn(weight: torch.Tensor, fmt: IntFormat, layer: str = "weight") -> QuantizedWeight:
    """Quantize ``weight`` [out, in] to ``fmt`` by rounding every entry to its nearest grid point.

    Grid parameters come from each row (per-channel) or each group of ``fmt.group_size``
    consecutive inputs of a row; ``layer`` names the weight in error messages.
    """
    out_features, in_features = weight.shape
    groups = fmt.groups(in_features, layer)
    blocks = weight.float().reshape(out_features * groups, in_features // groups)
    scale, zero = fmt.grid_params(blocks)
    codes = fmt.encode(blocks, scale[:, None], zero[:, None])
    return QuantizedWeight(
        codes=codes.to(torch.uint8).reshape(out_features, in_features),
        scale=scale.reshape(out_features, groups),
        zero=zero.reshape(out_features, groups),
        fmt=fmt,
    )
