"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024; mit-han-lab/llm-awq
``auto_scale.py`` and ``auto_clip.py``), on one scaling group's weights and input statistics.

Scale search: for ratio r in {0, 1/n, ..., (n-1)/n},

    s = clamp(s_x^r, 1e-4),  s <- s / sqrt(max(s) min(s)),   s_x = mean_t |X_tj|,
    Ŵ_fc(s) = Q(W_fc diag(s)) diag(1/s)   for each linear fc of the scaling group,

and the s of the smallest loss is kept. Two losses:

* ``block``, the reference's (``auto_scale.py`` ``_search_module_scale``): the mean squared error
  of the inspected module's output, ``mean((F(X; W) - F(X; Ŵ(s)))^2)`` over every output element,
  where F is the module the reference inspects (``module2inspect``: the attention block for
  q/k/v, the MLP for gate/up), run on the calibration inputs with the group's linears replaced
  by Ŵ(s) and everything else float (``BlockOutput``). Where the reference inspects the scaled
  linear itself (v -> o, up -> down), F(X; W) = X W^T and the MSE is the ``linears`` loss divided
  by (tokens x outputs), so the same ratio wins: that loss is used there;
* ``linears``: the sum of the group's linears' output errors, sum_fc || X W_fc^T - X Ŵ_fc(s)^T ||_F^2,
  computed exactly from the Gram matrix G = X^T X as tr(D G D^T) with D = W_fc - Ŵ_fc(s). It
  ignores what follows the linears (attention's softmax, the MLP's gating), and weighs q, k and v
  (or gate and up) alike.

Clip search: for each (row, group), the clipping threshold t = (1 - i/n) max|w| for
i < n * max_shrink minimising that group's output error d^T G_gg d, where d = w - Q(clamp(w, -t, t)).
The reference samples 512 tokens for this; the Gram matrix uses every calibration token.

Both searches only rank candidates, so their products with G may run in bfloat16
(``product_dtype``; float32 accumulation, the reduction in float32), which halves their cost on
CPUs with native bf16 dot products.
"""

from __future__ import annotations

from typing import Callable

import torch

from ptqrepro.layerwise.statistics import output_error

Quantizer = Callable[[torch.Tensor], torch.Tensor]
"""Fake-quantizes a weight [out, in] with the recipe's format (RTN)."""

BlockOutput = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""The inspected module's output on the calibration inputs, one tensor per calibration batch, with
the scaling group's linears given these weights [out, in] (in the group's order)."""


def block_mse(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``mean((outputs - reference)^2)`` over every element of every batch, accumulated in float64
    (the reference's ``(org_out - out).float().pow(2).mean()`` on the concatenated batches)."""
    total = sum(float((out.double() - ref.double()).pow(2).sum()) for out, ref in zip(outputs, reference, strict=True))
    return total / sum(ref.numel() for ref in reference)


def search_scales(
    weights: list[torch.Tensor], gram: torch.Tensor, act_absmean: torch.Tensor, quantize: Quantizer, n_grid: int = 20,
    product_dtype: torch.dtype = torch.float32, block: BlockOutput | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """The scale s [in] minimising the group's loss, and the loss per ratio: the ``block`` loss
    (the MSE of ``block``'s output against its output with the float ``weights``) when ``block``
    is given, else the ``linears`` loss from ``gram`` (module docstring)."""
    weights = [w.float() for w in weights]
    gram = gram.to(product_dtype)
    s_x = act_absmean.float()
    reference = block(weights) if block is not None else None
    losses, best, best_loss = [], None, float("inf")
    for step in range(n_grid):
        s = s_x.pow(step / n_grid).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        scaled = [quantize(w * s) / s for w in weights]
        if block is not None:
            loss = block_mse(block(scaled), reference)
        else:
            loss = sum(float(output_error(w - q, gram)) for w, q in zip(weights, scaled))
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = s, loss
    return best, losses


def search_clip(
    weight: torch.Tensor, gram: torch.Tensor, group_length: int | None, quantize: Quantizer,
    n_grid: int = 20, max_shrink: float = 0.5, product_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The per-(row, group) clipping thresholds t [out, groups] minimising each group's output error."""
    weight = weight.float()
    out_features, in_features = weight.shape
    length = group_length or in_features
    groups = in_features // length
    blocks = gram.to(product_dtype).reshape(groups, length, groups, length).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    grouped = weight.view(out_features, groups, length)
    amax = grouped.abs().amax(dim=2)
    best_error = torch.full_like(amax, float("inf"))
    best_threshold = amax.clone()
    for step in range(int(max_shrink * n_grid)):
        threshold = amax * (1 - step / n_grid)
        clipped = torch.maximum(torch.minimum(grouped, threshold[..., None]), -threshold[..., None])
        delta = grouped - quantize(clipped.view(out_features, in_features)).view(out_features, groups, length)
        product = torch.einsum("ogi,gij->ogj", delta.to(product_dtype), blocks)
        error = product.float().mul_(delta).sum(dim=2)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_threshold = torch.where(better, threshold, best_threshold)
    return best_threshold


def apply_clip(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Clamp each (row, group) of ``weight`` to [-t, t]."""
    out_features, in_features = weight.shape
    groups = threshold.shape[1]
    grouped = weight.view(out_features, groups, in_features // groups)
    t = threshold[..., None].to(weight.dtype)
    return torch.maximum(torch.minimum(grouped, t), -t).view(out_features, in_features)
