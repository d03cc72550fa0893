"""SmoothQuant (Xiao et al., ICML 2023; mit-han-lab/smoothquant ``smooth.py``).

Migrates activation outliers into the weights with a per-input-channel scale

    s_j = max_t |X_tj|^alpha / max_{fc, i} |W_ij|^(1 - alpha),   clamped to >= 1e-5,

where the weight maximum runs over every linear fed by the same input. The inputs become
X diag(1/s) (folded into the preceding normalisation) and each weight W diag(s), so the float
model computes the same function.
"""

from __future__ import annotations

import torch


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """The per-input-channel scales s [in] for inputs with channel maxima ``act_absmax``."""
    weight_absmax = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (act_absmax.float().pow(alpha) / weight_absmax.pow(1 - alpha)).clamp(min=1e-5)
