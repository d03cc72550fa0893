"""The error of the top-k KL divergence (``eval.divergence``, the tail lumped in one bin) against the
exact KL over the whole vocabulary, on real models: for each quantized model given, the mean token
KL(float || quantized) over a few test windows, exact and at each k, with the relative error
(KL - KL_k) / KL and the largest per-window relative error.

The float and the quantized model are evaluated as ``ptqrepro eval-ppl`` evaluates them (the
prepared model in the evaluation dtype, the artifact applied), over the first ``--windows`` of the
evenly spread test windows.

    python benchmarks/bench_kld_topk.py --model results/models/smollm2-135m --corpus results/corpora/wiki-mini \\
        results/quantized/smollm2-135m/rtn@int4-g64/s0 results/quantized/smollm2-135m/rtn@int3/s0 [--ks 8 32 128 512]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from ptqrepro.export.artifact import apply_artifact
from ptqrepro.cli import _corpus, _documents
from ptqrepro.data.windows import evaluation_windows
from ptqrepro.eval.divergence import divergence_from_reference, top_k_of_logits
from ptqrepro.models.sources import compute_dtype, load_model

KS = (8, 32, 128)
"""The k measured by default (``--ks``)."""


@torch.no_grad()
def logits_of(model, windows: torch.Tensor) -> list[torch.Tensor]:
    return [model(input_ids=window[None], use_cache=False).logits for window in windows]


def exact_kl(float_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of sum_v p (log p - log q), in float64 over the whole vocabulary."""
    logp = F.log_softmax(float_logits[0, :-1].double(), dim=-1)
    logq = F.log_softmax(logits[0, :-1].double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=24)
    parser.add_argument("--windows", type=int, default=4, help="of the evaluation windows, the first this many")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--ks", type=int, nargs="+", default=KS, help=f"the k to measure (default {' '.join(map(str, KS))})")
    parser.add_argument("quantized", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = compute_dtype(args.dtype, "cpu")
    model, tokenizer = load_model(args.model, dtype)
    spec = _corpus(args.corpus)
    windows, _ = evaluation_windows(_documents(args.corpus, "test"), tokenizer, spec, args.seqlen, args.max_windows)
    windows = windows[: args.windows]
    float_logits = logits_of(model, windows)
    references = {k: [top_k_of_logits(logits, k) for logits in float_logits] for k in args.ks}
    print(f"{windows.shape[0]} windows of {args.seqlen} tokens, dtype {dtype}")
    for path in args.quantized:
        quantized = copy.deepcopy(model)
        apply_artifact(quantized, path, "cpu")
        logits = logits_of(quantized, windows)
        exact = torch.stack([exact_kl(f, q) for f, q in zip(float_logits, logits)])
        shown = [f"{path}: exact KL {float(exact.mean()):.5f}"]
        for k in args.ks:
            top = torch.cat([divergence_from_reference(q, window[None], *reference)[1]
                             for q, window, reference in zip(logits, windows, references[k])])
            error = (exact - top) / exact
            shown.append(f"k={k}: {float(top.mean()):.5f} ({100 * float(1 - top.mean() / exact.mean()):.2f} % below, "
                         f"worst window {100 * float(error.max()):.2f} %)")
        print("; ".join(shown))


if __name__ == "__main__":
    main()
