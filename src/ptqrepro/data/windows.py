"""Token windows for calibration and perplexity evaluation, following GPTQ datautils (IST-DASLab/gptq).

Two protocols, chosen by ``CorpusSpec.sampling``:

* ``concatenated`` (get_wikitext2): the documents are joined into one text and tokenized once;
  calibration draws random windows from that stream, evaluation cuts it into consecutive windows.
* ``documents`` (get_c4): every window comes from one randomly drawn document that is long enough.

Random draws use ``random.Random(seed)``, which yields exactly the numbers GPTQ gets from
``random.seed(seed)`` and the module-level ``random.randint``, without touching global state.
"""

from __future__ import annotations

import random

import torch

from ptqrepro.data.corpora import CorpusSpec
from ptqrepro.errors import PtqError

REJECTED_DRAWS_BEFORE_CHECK = 1000


def calibration_windows(
    documents: list[str], tokenizer, spec: CorpusSpec, nsamples: int, seqlen: int, seed: int
) -> torch.LongTensor:
    """``nsamples`` random windows of ``seqlen`` tokens, shape [nsamples, seqlen]: the GPTQ datautils
    calibration loaders (get_wikitext2 for ``concatenated``, get_c4 for ``documents``)."""
    _require_positive("nsamples", nsamples)
    _require_positive("seqlen", seqlen)
    if spec.sampling == "documents":
        return _calibration_from_documents(documents, tokenizer, spec, nsamples, seqlen, seed)
    return _calibration_from_stream(documents, tokenizer, spec, nsamples, seqlen, seed)


def evaluation_windows(
    documents: list[str],
    tokenizer,
    spec: CorpusSpec,
    seqlen: int,
    max_windows: int | None = None,
    nsamples: int = 256,
    seed: int = 0,
) -> tuple[torch.LongTensor, int]:
    """Perplexity windows [n, seqlen] and the number of windows the protocol defines.

    ``concatenated`` (GPTQ datautils.get_wikitext2 test set, as scored by llama_eval): the
    ``test_join``-joined text cut into ``ntokens // seqlen`` consecutive windows; ``max_windows``
    keeps that many, spread evenly (:func:`spread_indices`). ``documents`` (GPTQ datautils.get_c4
    validation set): ``nsamples`` windows from random documents of at least ``seqlen`` tokens;
    ``max_windows`` keeps the first ones.
    """
    _require_positive("seqlen", seqlen)
    if max_windows is not None:
        _require_positive("max_windows", max_windows)
    if spec.sampling == "documents":
        _require_positive("nsamples", nsamples)
        count = nsamples if max_windows is None else min(nsamples, max_windows)
        return _evaluation_from_documents(documents, tokenizer, spec, count, seqlen, seed), nsamples
    return _evaluation_from_stream(documents, tokenizer, spec, seqlen, max_windows)


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` distinct, increasing indices spread evenly over ``range(total)``, starting at 0
    (all of them when ``count >= total``); used to subsample evaluation windows deterministically."""
    _require_positive("count", count)
    if count >= total:
        return list(range(total))
    return [k * total // count for k in range(count)]


def token_ids(tokenizer, text: str) -> torch.LongTensor:
    """Token ids of ``text`` from one tokenizer call with its default special tokens, as GPTQ's
    ``tokenizer(text, return_tensors='pt').input_ids`` (1-D here)."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _calibration_from_stream(documents, tokenizer, spec, nsamples, seqlen, seed) -> torch.LongTensor:
    stream = token_ids(tokenizer, spec.train_join.join(documents))
    _require_tokens(spec, stream.numel(), seqlen + 1, seqlen, "calibration")
    rng = random.Random(seed)
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[start : start + seqlen] for start in starts])


def _evaluation_from_stream(documents, tokenizer, spec, seqlen, max_windows) -> tuple[torch.LongTensor, int]:
    stream = token_ids(tokenizer, spec.test_join.join(documents))
    _require_tokens(spec, stream.numel(), seqlen, seqlen, "evaluation")
    total = stream.numel() // seqlen
    windows = stream[: total * seqlen].view(total, seqlen)
    if max_windows is not None:
        windows = windows[spread_indices(total, max_windows)]
    return windows, total


def _calibration_from_documents(documents, tokenizer, spec, nsamples, seqlen, seed) -> torch.LongTensor:
    tokens = _DocumentTokens(documents, tokenizer, spec)
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        ids = _draw_document(rng, tokens, seqlen + 1, seqlen, "calibration")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def _evaluation_from_documents(documents, tokenizer, spec, count, seqlen, seed) -> torch.LongTensor:
    tokens = _DocumentTokens(documents, tokenizer, spec)
    rng = random.Random(seed)
    windows = []
    for _ in range(count):
        ids = _draw_document(rng, tokens, seqlen, seqlen, "evaluation")
        start = rng.randint(0, ids.numel() - seqlen - 1) if ids.numel() > seqlen else 0
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


class _DocumentTokens:
    """Documents tokenized on first use (a C4 shard holds far more documents than are drawn)."""

    def __init__(self, documents: list[str], tokenizer, spec: CorpusSpec):
        if not documents:
            raise PtqError(f"corpus {spec.name!r} has no documents to draw windows from")
        self.documents = documents
        self.tokenizer = tokenizer
        self.spec = spec
        self._ids: dict[int, torch.LongTensor] = {}

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> torch.LongTensor:
        if index not in self._ids:
            self._ids[index] = token_ids(self.tokenizer, self.documents[index])
        return self._ids[index]

    def longest(self) -> int:
        return max(self[index].numel() for index in range(len(self)))


def _draw_document(
    rng: random.Random, tokens: _DocumentTokens, min_tokens: int, seqlen: int, purpose: str
) -> torch.LongTensor:
    """Draw documents until one has ``min_tokens`` tokens (GPTQ get_c4's rejection loop). After
    REJECTED_DRAWS_BEFORE_CHECK misses, every document is measured once so that a corpus without
    any long-enough document fails instead of looping forever; the draws themselves are unchanged."""
    rejected = 0
    while True:
        ids = tokens[rng.randint(0, len(tokens) - 1)]
        if ids.numel() >= min_tokens:
            return ids
        rejected += 1
        if rejected == REJECTED_DRAWS_BEFORE_CHECK:
            longest = tokens.longest()
            _require_tokens(tokens.spec, longest, min_tokens, seqlen, purpose, " in its longest document")


def _require_tokens(
    spec: CorpusSpec, available: int, needed: int, seqlen: int, purpose: str, where: str = ""
) -> None:
    """PtqError unless ``available`` tokens reach the ``needed`` ones (seqlen, or seqlen + 1 when a
    random start needs one spare token)."""
    if available < needed:
        extra = "" if needed == seqlen else f", which needs {needed}"
        raise PtqError(
            f"corpus {spec.name!r} has {available} tokens{where}, "
            f"fewer than one window of seqlen {seqlen} ({purpose}{extra})"
        )


def _require_positive(key: str, value: int) -> None:
    if value < 1:
        raise PtqError(f"{key} must be a positive integer, got {value!r}")
