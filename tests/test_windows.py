"""GPTQ calibration and evaluation windows, checked against a word-level tokenizer whose every word
is distinct, so that a window's tokens say exactly where in the corpus it was cut."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from ptqrepro.data.corpora import CorpusSpec
from ptqrepro.data.windows import calibration_windows, evaluation_windows, spread_indices, token_ids
from ptqrepro.errors import PtqError

STREAM_SPEC = CorpusSpec(name="tiny", source="local", path="unused", train_join=" JOIN ", test_join=" SEP ")
DOCUMENT_SPEC = dataclasses.replace(STREAM_SPEC, name="tiny-docs", sampling="documents")


def word_tokenizer(documents: list[str]):
    """Whitespace word-level tokenizer over every word of ``documents`` (plus the join words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for d in documents for w in d.split()} | {"JOIN", "SEP"})
    vocab = {"[UNK]": 0, **{word: index + 1 for index, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def make_documents(lengths: list[int]) -> list[str]:
    """Document k is ``lengths[k]`` distinct words d{k}w0 d{k}w1 ..."""
    return [" ".join(f"d{k}w{j}" for j in range(length)) for k, length in enumerate(lengths)]


@pytest.fixture(scope="module")
def corpus():
    documents = make_documents([40, 7, 120, 33, 64, 5, 90])
    return documents, word_tokenizer(documents)


def stream_of(documents, tokenizer, join: str) -> list[int]:
    return tokenizer(join.join(documents))["input_ids"]


def start_in(stream: list[int], window: torch.Tensor) -> int:
    """Position of ``window`` in ``stream``; asserts it is a contiguous slice there."""
    start = stream.index(int(window[0]))
    assert stream[start : start + len(window)] == window.tolist()
    return start


def document_of(tokenizer, window: torch.Tensor) -> int:
    """Index of the single document all tokens of ``window`` come from."""
    words = tokenizer.convert_ids_to_tokens(window.tolist())
    owners = {word.split("w")[0] for word in words}
    assert len(owners) == 1, owners
    return int(owners.pop()[1:])


# --- spread_indices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 2, 7, 10, 100, 1013])
@pytest.mark.parametrize("count", [1, 3, 7, 10, 64, 2000])
def test_spread_indices_are_distinct_increasing_and_even(total, count):
    indices = spread_indices(total, count)
    assert len(indices) == min(total, count)
    assert indices[0] == 0 and indices[-1] < total
    assert all(b > a for a, b in zip(indices, indices[1:]))
    gaps = {b - a for a, b in zip(indices, indices[1:])}
    assert not gaps or max(gaps) - min(gaps) <= 1
    assert spread_indices(total, count) == indices


def test_spread_indices_with_enough_count_is_everything():
    assert spread_indices(5, 5) == [0, 1, 2, 3, 4]
    assert spread_indices(5, 9) == [0, 1, 2, 3, 4]
    assert spread_indices(10, 4) == [0, 2, 5, 7]


def test_spread_indices_rejects_zero_count():
    with pytest.raises(PtqError, match="count must be a positive integer, got 0"):
        spread_indices(10, 0)


# --- calibration, concatenated -----------------------------------------------------------------------


def test_calibration_windows_are_contiguous_slices_of_the_train_stream(corpus):
    documents, tokenizer = corpus
    windows = calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=12, seqlen=16, seed=0)
    assert windows.shape == (12, 16) and windows.dtype == torch.int64
    stream = stream_of(documents, tokenizer, " JOIN ")
    for window in windows:
        start_in(stream, window)
    assert tokenizer.convert_tokens_to_ids("SEP") not in windows


def test_calibration_windows_reproduce_gptq_draws(corpus):
    documents, tokenizer = corpus
    stream = stream_of(documents, tokenizer, " JOIN ")
    seqlen = len(stream) - 255  # 255 starts: one more would make randint draw one more random bit
    random.seed(3)
    starts = [random.randint(0, len(stream) - seqlen - 1) for _ in range(10)]
    windows = calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=10, seqlen=seqlen, seed=3)
    assert windows.tolist() == [stream[i : i + seqlen] for i in starts]


def test_calibration_windows_depend_on_seed_only(corpus):
    documents, tokenizer = corpus
    first = calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=8, seqlen=16, seed=1)
    again = calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=8, seqlen=16, seed=1)
    other = calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=8, seqlen=16, seed=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_calibration_leaves_global_random_state_alone(corpus):
    documents, tokenizer = corpus
    random.seed(11)
    expected = random.random()
    random.seed(11)
    calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=4, seqlen=8, seed=0)
    assert random.random() == expected


# --- evaluation, concatenated ------------------------------------------------------------------------


def test_evaluation_windows_tile_the_test_stream(corpus):
    documents, tokenizer = corpus
    stream = stream_of(documents, tokenizer, " SEP ")
    windows, total = evaluation_windows(documents, tokenizer, STREAM_SPEC, seqlen=32)
    assert total == len(stream) // 32
    assert windows.shape == (total, 32) and windows.dtype == torch.int64
    assert [start_in(stream, w) for w in windows] == [k * 32 for k in range(total)]
    assert tokenizer.convert_tokens_to_ids("JOIN") not in windows


def test_evaluation_max_windows_takes_spread_non_overlapping_windows(corpus):
    documents, tokenizer = corpus
    stream = stream_of(documents, tokenizer, " SEP ")
    windows, total = evaluation_windows(documents, tokenizer, STREAM_SPEC, seqlen=16, max_windows=4)
    assert total == len(stream) // 16 and total > 4
    starts = [start_in(stream, w) for w in windows]
    assert starts == [k * 16 for k in spread_indices(total, 4)]
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:]))


# --- documents protocol (C4) -------------------------------------------------------------------------


def gptq_c4_calibration(documents, tokenizer, nsamples, seqlen, seed):
    """GPTQ datautils.get_c4 calibration loop, written out with the global random module."""
    random.seed(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            ids = tokenizer(documents[random.randint(0, len(documents) - 1)])["input_ids"]
            if len(ids) > seqlen:
                break
        i = random.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[i : i + seqlen])
    return windows


def test_document_calibration_draws_only_long_documents(corpus):
    documents, tokenizer = corpus
    seqlen = 40  # document 0 has exactly 40 tokens: too short for calibration (needs > seqlen)
    windows = calibration_windows(documents, tokenizer, DOCUMENT_SPEC, nsamples=30, seqlen=seqlen, seed=0)
    assert windows.shape == (30, seqlen) and windows.dtype == torch.int64
    drawn = {document_of(tokenizer, w) for w in windows}
    assert drawn <= {k for k, d in enumerate(documents) if len(d.split()) > seqlen}
    assert len(drawn) > 1
    for window in windows:
        start_in(tokenizer(documents[document_of(tokenizer, window)])["input_ids"], window)
    assert windows.tolist() == gptq_c4_calibration(documents, tokenizer, 30, seqlen, 0)


def test_document_evaluation_accepts_exact_length_and_truncates(corpus):
    documents, tokenizer = corpus
    windows, total = evaluation_windows(documents, tokenizer, DOCUMENT_SPEC, seqlen=40, nsamples=40, seed=0)
    assert total == 40 and windows.shape == (40, 40)
    drawn = {document_of(tokenizer, w) for w in windows}
    assert drawn <= {k for k, d in enumerate(documents) if len(d.split()) >= 40}
    assert 0 in drawn  # exactly seqlen tokens: accepted for evaluation, window starts at 0
    assert windows.tolist().count(tokenizer(documents[0])["input_ids"]) >= 1
    first, total_again = evaluation_windows(
        documents, tokenizer, DOCUMENT_SPEC, seqlen=40, max_windows=5, nsamples=40, seed=0
    )
    assert total_again == 40 and torch.equal(first, windows[:5])


def test_document_evaluation_redraw_rule_never_keeps_an_exact_length_document(corpus):
    documents, tokenizer = corpus
    redraw = dataclasses.replace(DOCUMENT_SPEC, exact_length_documents="redraw")
    windows, total = evaluation_windows(documents, tokenizer, redraw, seqlen=40, nsamples=40, seed=0)
    assert total == 40 and windows.shape == (40, 40)
    assert 0 not in {document_of(tokenizer, w) for w in windows}  # document 0 has exactly 40 tokens
    with pytest.raises(PtqError, match="has 120 tokens in its longest document, fewer than one window of seqlen 120"):
        evaluation_windows(documents, tokenizer, redraw, seqlen=120, nsamples=2)


def test_document_protocol_fails_when_no_document_is_long_enough(corpus):
    documents, tokenizer = corpus
    with pytest.raises(PtqError) as error:
        calibration_windows(documents, tokenizer, DOCUMENT_SPEC, nsamples=2, seqlen=120, seed=0)
    assert str(error.value) == (
        "corpus 'tiny-docs' has 120 tokens in its longest document, "
        "fewer than one window of seqlen 120 (calibration, which needs 121)"
    )
    evaluation_windows(documents, tokenizer, DOCUMENT_SPEC, seqlen=120, nsamples=2)
    with pytest.raises(PtqError, match="has 120 tokens in its longest document, fewer than one window of seqlen 121"):
        evaluation_windows(documents, tokenizer, DOCUMENT_SPEC, seqlen=121, nsamples=2)


# --- too little text and bad arguments ----------------------------------------------------------------


def test_too_few_tokens_names_corpus_count_and_seqlen():
    documents = make_documents([150, 150])
    tokenizer = word_tokenizer(documents)
    ntokens = len(token_ids(tokenizer, " SEP ".join(documents)))
    assert ntokens == 301
    with pytest.raises(PtqError) as error:
        calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=1, seqlen=512, seed=0)
    assert str(error.value) == (
        "corpus 'tiny' has 301 tokens, fewer than one window of seqlen 512 (calibration, which needs 513)"
    )
    with pytest.raises(PtqError) as error:
        evaluation_windows(documents, tokenizer, STREAM_SPEC, seqlen=302)
    assert str(error.value) == "corpus 'tiny' has 301 tokens, fewer than one window of seqlen 302 (evaluation)"
    assert evaluation_windows(documents, tokenizer, STREAM_SPEC, seqlen=301)[1] == 1
    with pytest.raises(PtqError, match="which needs 302"):
        calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=1, seqlen=301, seed=0)
    assert calibration_windows(documents, tokenizer, STREAM_SPEC, nsamples=1, seqlen=300, seed=0).shape == (1, 300)


def test_no_documents_is_an_error(corpus):
    _, tokenizer = corpus
    with pytest.raises(PtqError, match="corpus 'tiny-docs' has no documents"):
        calibration_windows([], tokenizer, DOCUMENT_SPEC, nsamples=1, seqlen=4, seed=0)


@pytest.mark.parametrize(
    ("keyword", "value"), [("nsamples", 0), ("seqlen", 0), ("max_windows", 0), ("seqlen", -3)]
)
def test_non_positive_sizes_are_rejected(corpus, keyword, value):
    documents, tokenizer = corpus
    arguments = {"seqlen": 8, keyword: value}
    with pytest.raises(PtqError, match=f"{keyword} must be a positive integer, got {value}"):
        if keyword == "nsamples":
            calibration_windows(documents, tokenizer, STREAM_SPEC, seed=0, **arguments)
        else:
            evaluation_windows(documents, tokenizer, STREAM_SPEC, **arguments)


def test_only_the_chunks_protocol_draws_no_calibration_windows():
    """LQER's chunks are the same at every seed (its results then carry no seed: no draw to
    replicate); GPTQ's concatenated and documents protocols draw them at random."""
    from ptqrepro.data.corpora import BUILTIN_CORPORA
    from ptqrepro.data.windows import calibration_is_drawn

    drawn = {name: calibration_is_drawn(spec) for name, spec in BUILTIN_CORPORA.items()}
    assert drawn == {"wiki-mini": True, "wikitext2": True, "c4": True, "slimpajama": False}
