"""Dynamic fake quantization of a linear layer's input along its last (reduction) dimension.

Scales come from the tensor itself at every call; the arithmetic is float32 and the result has the
input's dtype and shape.

* Integer formats ``int<b>``: symmetric absmax per token, SmoothQuant's W8A8 activation quantizer
  (mit-han-lab/smoothquant ``smoothquant/fake_quant.py`` ``quantize_activation_per_token_absmax``):

      s = max(max_j |x_j|, 1e-5) / (2^(b-1) - 1)
      Q(x) = s · clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)      (round: half to even, as torch)

  With ``-g<size>`` the max runs over each group of ``size`` consecutive channels instead of the
  whole token. Activations are always symmetric: ``sym``/``asym`` only concern weights.
* MX formats: each block of ``block`` consecutive channels gets its shared exponent and element
  grid exactly as a weight row's block does (``MXFormat.fit`` then ``fake``; OCP MX v1.0,
  microsoft/microxcaling, where linear layers block activations along the reduction axis too).
"""

from __future__ import annotations

import torch

from ptqrepro.errors import PtqError
from ptqrepro.formats.base import GroupedFormat
from ptqrepro.formats.integer import IntFormat
from ptqrepro.formats.mx import MXFormat

ABSMAX_FLOOR = 1e-5
"""SmoothQuant's lower bound on a token's absmax, which keeps an all-zero token's scale positive."""


def quantize_activation(x: torch.Tensor, fmt: GroupedFormat | None) -> torch.Tensor:
    """``x`` [..., channels] fake-quantized to ``fmt`` along its last dimension; ``None`` (an
    unquantized format such as ``fp16``) returns ``x`` itself."""
    if fmt is None:
        return x
    if isinstance(fmt, IntFormat):
        length, quantize = fmt.group_size or x.shape[-1], _int_absmax
    elif isinstance(fmt, MXFormat):
        length, quantize = fmt.block, _mx_blocks
    else:
        raise PtqError(f"activation quantization does not support format {fmt.name}")
    channels = x.shape[-1]
    if channels % length:
        raise PtqError(
            f"activation format {fmt.name}: group of {length} does not divide the last dimension {channels}"
        )
    groups = x.float().reshape(-1, length)
    return quantize(groups, fmt).reshape(x.shape).to(x.dtype)


def _int_absmax(groups: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Symmetric absmax fake quantization of each row of ``groups`` [n, length]."""
    qmax = 2 ** (fmt.bits - 1) - 1
    scale = groups.abs().amax(dim=1, keepdim=True).clamp(min=ABSMAX_FLOOR) / qmax
    return torch.clamp(torch.round(groups / scale), -qmax - 1, qmax) * scale


def _mx_blocks(groups: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    """MX fake quantization of each block (row) of ``groups`` [n, block]."""
    return fmt.fake(groups, fmt.fit(groups))
