"""Calibration statistics of the inputs of each linear layer, accumulated over every token.

For inputs X [tokens, in] of one linear layer:

* ``gram``   G = X^T X (GPTQ's Hessian up to the factor 2/n; AWQ's and MagR's output errors),
* ``absmax`` max_t |X_tj| per input channel (SmoothQuant's activation scale),
* ``absmean`` (1/n) sum_t |X_tj| per input channel (AWQ's activation salience).

When a scale s is folded into a layer so that its inputs become X diag(1/s), the statistics
transform exactly: G -> diag(1/s) G diag(1/s), absmax -> absmax / s, absmean -> absmean / s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``||X D^T||_F^2 = tr(D G D^T)`` for a weight error D [out, in] and G = X^T X."""
    delta = delta.float()
    return torch.einsum("oi,ij,oj->", delta, gram, delta)


@dataclass
class InputStatistics:
    gram: torch.Tensor
    absmax: torch.Tensor
    abssum: torch.Tensor
    tokens: int

    @classmethod
    def of(cls, x: torch.Tensor) -> "InputStatistics":
        features = x.shape[-1]
        stats = cls(
            gram=x.new_zeros((features, features), dtype=torch.float32),
            absmax=x.new_zeros(features, dtype=torch.float32),
            abssum=x.new_zeros(features, dtype=torch.float32),
            tokens=0,
        )
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.gram.addmm_(x.T, x)
        torch.maximum(self.absmax, x.abs().amax(dim=0), out=self.absmax)
        self.abssum.add_(x.abs().sum(dim=0))
        self.tokens += x.shape[0]

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / self.tokens

    def divide_inputs(self, s: torch.Tensor) -> None:
        """The inputs became X diag(1/s): transform every statistic accordingly, in place."""
        inverse = 1.0 / s.float()
        self.gram.mul_(inverse[:, None]).mul_(inverse[None, :])
        self.absmax.mul_(inverse)
        self.abssum.mul_(inverse)


@torch.no_grad()
def collect_input_statistics(run_layer, linears: dict[str, nn.Linear]) -> dict[str, InputStatistics]:
    """Run ``run_layer()`` once with hooks on ``linears``; return each one's input statistics.

    Linears fed the very same input tensor (q/k/v, gate/up) share one ``InputStatistics`` object,
    accumulated once.
    """
    stats: dict[str, InputStatistics] = {}
    owner_of: dict[str, str] = {}
    last = {"input": None, "owner": None}

    def hook_for(name):
        def hook(_module, args):
            x = args[0]
            if x is last["input"]:
                owner_of[name] = last["owner"]
                return
            last["input"], last["owner"] = x, name
            if name in stats:
                stats[name].add(x)
            else:
                stats[name] = InputStatistics.of(x)

        return hook

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears.items()]
    try:
        run_layer()
    finally:
        last["input"] = None
        for handle in handles:
            handle.remove()
    for name, owner in owner_of.items():
        stats[name] = stats[owner]
    return stats
