"""Token windows for calibration and perplexity evaluation, following the reference codes' loaders.

Three protocols, chosen by ``CorpusSpec.sampling``:

* ``concatenated`` (IST-DASLab/gptq datautils.py get_wikitext2): the documents are joined into one
  text and tokenized once; calibration draws random windows from that stream, evaluation cuts it
  into consecutive windows.
* ``documents`` (get_c4): every window comes from one randomly drawn document that is long enough.
* ``chunks`` (ChengZhang-98/lqer src/lqer/datasets): the documents are joined and tokenized per
  ``datasets.map`` batch and cut into consecutive windows (:func:`chunk_windows`); calibration takes
  the first ones, evaluation all. Nothing is drawn: every seed gives the same windows.

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
    """``nsamples`` windows of ``seqlen`` tokens, shape [nsamples, seqlen]: the GPTQ datautils
    calibration loaders (get_wikitext2 for ``concatenated``, get_c4 for ``documents``: random
    windows), or LQER's first ``nsamples`` chunks (``chunks``, the order its profiling DataLoader
    reads them, unshuffled). A ``documents`` draw needs ``seqlen + 1`` tokens (a random start)."""
    _require_positive("nsamples", nsamples)
    _require_positive("seqlen", seqlen)
    if spec.sampling == "chunks":
        return _calibration_from_chunks(documents, tokenizer, spec, nsamples, seqlen)
    if spec.sampling == "documents":
        return _calibration_from_documents(documents, tokenizer, spec, nsamples, seqlen, seed)
    return _calibration_from_stream(documents, tokenizer, spec, nsamples, seqlen, seed)


def calibration_is_drawn(spec: CorpusSpec) -> bool:
    """Whether the calibration windows depend on the seed: every protocol draws them at random but
    LQER's ``chunks``, which takes the first ``nsamples`` chunks, the same at every seed."""
    return spec.sampling != "chunks"


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
    keeps that many, spread evenly (:func:`spread_indices`). ``chunks`` (LQER's WikiText-2
    evaluation): every window of :func:`chunk_windows` on the ``test_join``-joined batches;
    ``max_windows`` as for ``concatenated``. ``documents`` (GPTQ datautils.get_c4 validation set):
    ``nsamples`` windows from random documents of at least ``seqlen`` tokens (``seqlen + 1`` where
    ``exact_length_documents`` is ``redraw``, as MagR's get_c4_llama3); ``max_windows`` keeps the
    first ones.
    """
    _require_positive("seqlen", seqlen)
    if max_windows is not None:
        _require_positive("max_windows", max_windows)
    if spec.sampling == "chunks":
        return _spread(_chunks_or_error(documents, tokenizer, spec, spec.test_join, seqlen, "evaluation"), max_windows)
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
    return _spread(stream[: total * seqlen].view(total, seqlen), max_windows)


def _spread(windows: torch.LongTensor, max_windows: int | None) -> tuple[torch.LongTensor, int]:
    """``max_windows`` of ``windows`` spread evenly (all where None), and how many there were."""
    total = windows.shape[0]
    if max_windows is not None:
        windows = windows[spread_indices(total, max_windows)]
    return windows, total


def map_batches(items: list, shards: int, batch: int) -> list[list]:
    """The batches ``datasets.Dataset.map(fn, batched=True, batch_size=batch, num_proc=shards)`` hands
    to ``fn``, in the order the results come back: ``items`` cut into ``min(shards, len(items))``
    contiguous shards (``Dataset.shard(contiguous=True)``: the first ``len % shards`` hold one more),
    each cut into consecutive batches of at most ``batch``."""
    shards = min(shards, len(items))
    size, larger = divmod(len(items), shards) if shards else (0, 0)
    batches = []
    for index in range(shards):
        start = size * index + min(index, larger)
        end = start + size + (1 if index < larger else 0)
        batches += [items[first : min(first + batch, end)] for first in range(start, end, batch)]
    return batches


def chunk_windows(documents: list[str], tokenizer, spec: CorpusSpec, join: str, seqlen: int) -> torch.LongTensor:
    """LQER's windows [n, seqlen] (ChengZhang-98/lqer src/lqer/datasets/slim_pajama.py and
    wikitext2.py, run by get_data_module with ``num_proc=8``): ``tokenize_function`` joins each
    :func:`map_batches` batch of documents with ``join`` and tokenizes it as one text (special tokens
    included, so each starts with BOS where the tokenizer adds one); ``group_texts`` then concatenates
    each batch of those token lists (batched the same way) and cuts it into consecutive windows of
    ``seqlen``, dropping the remainder. A batch shorter than one window gives none here, where LQER
    would keep it as one short chunk."""
    rows = [token_ids(tokenizer, join.join(batch)) for batch in map_batches(documents, spec.chunk_shards, spec.chunk_batch)]
    windows = []
    for group in map_batches(rows, spec.chunk_shards, spec.chunk_batch):
        stream = torch.cat(group)
        count = stream.numel() // seqlen
        windows.append(stream[: count * seqlen].view(count, seqlen))
    return torch.cat(windows) if windows else torch.empty(0, seqlen, dtype=torch.long)


def _chunks_or_error(documents, tokenizer, spec, join, seqlen, purpose, needed: int = 1) -> torch.LongTensor:
    if not documents:
        raise PtqError(f"corpus {spec.name!r} has no documents to cut windows from")
    windows = chunk_windows(documents, tokenizer, spec, join, seqlen)
    if windows.shape[0] < needed:
        raise PtqError(
            f"corpus {spec.name!r} gives {windows.shape[0]} windows of seqlen {seqlen}, "
            f"fewer than the {needed} the {purpose} needs"
        )
    return windows


def _calibration_from_chunks(documents, tokenizer, spec, nsamples, seqlen) -> torch.LongTensor:
    return _chunks_or_error(documents, tokenizer, spec, spec.train_join, seqlen, "calibration", nsamples)[:nsamples]


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
    min_tokens = seqlen if spec.exact_length_documents == "keep" else seqlen + 1
    for _ in range(count):
        ids = _draw_document(rng, tokens, min_tokens, seqlen, "evaluation")
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
