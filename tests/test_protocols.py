"""Each paper config's windows against the reference code's own loader, on local mirrors in the hub
datasets' layout, tokenized by a LLaMA-class tokenizer (BOS added, as LLaMA's): GPTQ's
get_wikitext2 (GPTQ, MagR, DWR, MX-PTQ), MagR's get_c4_llama3 (C4 evaluation), LQER's datasets
pipeline (SlimPajama calibration, WikiText-2 evaluation). Every reference loop below is a short
transcription, written for this test, of the function it names."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from conftest import synthetic_text
from hubcache import write_wikitext_mirror

from ptqrepro.data import corpora
from ptqrepro.data.corpora import corpus_spec, load_documents
from ptqrepro.data.windows import calibration_windows, evaluation_windows, map_batches
from ptqrepro.errors import PtqError

SEEDS = (0, 1, 2)

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-fallback BPE in transformers' LlamaTokenizer class, adding BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    backend.train_from_iterator([synthetic_text(k, 6) for k in range(40)], trainers.BpeTrainer(vocab_size=700, special_tokens=specials))
    model = json.loads(backend.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True)


@pytest.fixture(autouse=True)
def offline_datasets(monkeypatch, tmp_path):
    """`datasets` offline, caching under tmp_path."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def rows(seed: int, count: int) -> list[str]:
    """WikiText-style rows: blank lines, headings and paragraphs of varying length."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        kind = rng.random()
        out.append("" if kind < 0.3 else f" = Heading {k} = \n" if kind < 0.4 else f" {synthetic_text(seed * 1000 + k, 1)} \n")
    return out


@pytest.fixture
def wikitext_mirror(tmp_path):
    return write_wikitext_mirror(tmp_path / "wikitext", {"train": rows(1, 300), "validation": rows(2, 40), "test": rows(3, 230)})


# --- GPTQ datautils.get_wikitext2 (IST-DASLab/gptq; MagR's datautils.py has the same loader) -----------


def gptq_wikitext2(mirror, tokenizer, nsamples, seed, seqlen):
    """IST-DASLab/gptq datautils.py get_wikitext2, and llama.py's test windows (i*seqlen, all whole ones)."""
    import datasets

    train = datasets.load_dataset(str(mirror), "wikitext-2-raw-v1", split="train")
    test = datasets.load_dataset(str(mirror), "wikitext-2-raw-v1", split="test")
    trainenc = tokenizer("\n\n".join(train["text"]), return_tensors="pt").input_ids
    testenc = tokenizer("\n\n".join(test["text"]), return_tensors="pt").input_ids
    random.seed(seed)
    calibration = []
    for _ in range(nsamples):
        i = random.randint(0, trainenc.shape[1] - seqlen - 1)
        calibration.append(trainenc[:, i : i + seqlen])
    count = testenc.numel() // seqlen
    return torch.cat(calibration), torch.cat([testenc[:, i * seqlen : (i + 1) * seqlen] for i in range(count)])


def test_wikitext2_windows_are_gptq_datautils(wikitext_mirror, tokenizer):
    spec = corpus_spec("wikitext2", {"path": str(wikitext_mirror)})
    train, test = load_documents(spec, "train"), load_documents(spec, "test")
    for seed in SEEDS:
        reference_calibration, reference_test = gptq_wikitext2(wikitext_mirror, tokenizer, 16, seed, 64)
        assert torch.equal(calibration_windows(train, tokenizer, spec, 16, 64, seed), reference_calibration)
    windows, total = evaluation_windows(test, tokenizer, spec, 64)
    assert torch.equal(windows, reference_test) and total == reference_test.shape[0] > 20
    sparsegpt = corpus_spec("wikitext2", {"path": str(wikitext_mirror), "train_join": " "})
    assert not torch.equal(calibration_windows(train, tokenizer, sparsegpt, 16, 64, 0), reference_calibration)


# --- C4: GPTQ get_c4 and MagR get_c4_llama3 ------------------------------------------------------------


@pytest.fixture
def c4_mirror(tmp_path, tokenizer):
    """allenai/c4's two shards; validation document 0 is exactly SEQLEN tokens long."""
    root = tmp_path / "c4"
    (root / "en").mkdir(parents=True)
    texts = {"train": [synthetic_text(100 + k, 1 + k % 4) for k in range(30)],
             "validation": [synthetic_text(200 + k, 1 + k % 4) for k in range(12)]}
    for split, shard in (("train", corpora.C4_TRAIN_SHARD), ("validation", corpora.C4_VALIDATION_SHARD)):
        with gzip.open(root / shard, "wt", encoding="utf-8") as stream:
            for k, text in enumerate(texts[split]):
                stream.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://e.org/{k}"}) + "\n")
    return root, len(tokenizer(texts["validation"][0])["input_ids"])


def c4_split(mirror, split):
    import datasets

    shard = corpora.C4_TRAIN_SHARD if split == "train" else corpora.C4_VALIDATION_SHARD
    return datasets.load_dataset(str(mirror), data_files={split: shard}, split=split)


def gptq_c4_calibration(mirror, tokenizer, nsamples, seed, seqlen):
    """IST-DASLab/gptq datautils.py get_c4, its calibration loop (MagR's is the same)."""
    train = c4_split(mirror, "train")
    random.seed(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            ids = tokenizer(train[random.randint(0, len(train) - 1)]["text"], return_tensors="pt").input_ids
            if ids.shape[1] >= seqlen:
                break
        i = random.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, i : i + seqlen])
    return torch.cat(windows)


def c4_evaluation(mirror, tokenizer, seqlen, redraw_exact):
    """The 256-document validation loop of GPTQ's get_c4 (``redraw_exact`` False) or of MagR's
    get_c4_llama3 (True: a document of exactly seqlen tokens is drawn again)."""
    validation = c4_split(mirror, "validation")
    random.seed(0)
    windows = []
    while len(windows) < 256:
        while True:
            ids = tokenizer(validation[random.randint(0, len(validation) - 1)]["text"], return_tensors="pt").input_ids
            if ids.shape[1] >= seqlen:
                break
        if redraw_exact and ids.shape[1] == seqlen:
            continue
        i = random.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, i : i + seqlen])
    return torch.cat(windows)


def test_c4_calibration_is_gptq_get_c4(c4_mirror, tokenizer):
    mirror, _ = c4_mirror
    spec = corpus_spec("c4", {"path": str(mirror)})
    train = load_documents(spec, "train")
    for seed in SEEDS:
        assert torch.equal(calibration_windows(train, tokenizer, spec, 24, 48, seed),
                           gptq_c4_calibration(mirror, tokenizer, 24, seed, 48))


def test_c4_exact_length_rule_redraw_is_magr_and_keep_differs(c4_mirror, tokenizer):
    mirror, exact = c4_mirror
    test = load_documents(corpus_spec("c4", {"path": str(mirror)}), "test")
    redraw = corpus_spec("c4", {"path": str(mirror), "exact_length_documents": "redraw"})
    windows, total = evaluation_windows(test, tokenizer, redraw, exact, nsamples=256, seed=0)
    assert total == 256 and torch.equal(windows, c4_evaluation(mirror, tokenizer, exact, redraw_exact=True))
    whole = torch.tensor(tokenizer(test[0])["input_ids"])
    assert not any(torch.equal(window, whole) for window in windows)
    kept, _ = evaluation_windows(test, tokenizer, corpus_spec("c4", {"path": str(mirror)}), exact, nsamples=256, seed=0)
    assert any(torch.equal(window, whole) for window in kept)  # keep: the whole document, no start drawn
    with pytest.raises(ValueError):  # GPTQ's get_c4 itself fails on it: randint(0, -1)
        c4_evaluation(mirror, tokenizer, exact, redraw_exact=False)
    # Where no document has exactly seqlen tokens, both rules are GPTQ's loop.
    lengths = {len(tokenizer(text)["input_ids"]) for text in test}
    seqlen = next(n for n in range(exact - 1, 0, -1) if n not in lengths)
    reference = c4_evaluation(mirror, tokenizer, seqlen, redraw_exact=False)
    for rule in ("keep", "redraw"):
        spec = corpus_spec("c4", {"path": str(mirror), "exact_length_documents": rule})
        assert torch.equal(evaluation_windows(test, tokenizer, spec, seqlen, nsamples=256, seed=0)[0], reference)


# --- LQER: datasets.map pipeline (ChengZhang-98/lqer src/lqer/datasets) ---------------------------------


@pytest.fixture
def slimpajama_mirror(tmp_path):
    """DKYoon/SlimPajama-6B's layout: two of the train parquet shards, a validation and a test file."""
    import pandas

    root = tmp_path / "slimpajama"
    (root / "data").mkdir(parents=True)
    meta = {"redpajama_set_name": "RedPajamaC4"}
    files = {"train-00000-of-00048-ab2b35705f029d94": range(0, 60), "train-00001-of-00048-f2ff493d6eb6da4e": range(60, 90),
             "validation-00000-of-00001-aaaa": range(90, 95), "test-00000-of-00001-bbbb": range(95, 100)}
    for name, documents in files.items():
        texts = [synthetic_text(300 + k, 1 + k % 3) for k in documents]
        pandas.DataFrame({"text": texts, "meta": [meta] * len(texts)}).to_parquet(root / f"data/{name}.parquet")
    return root


def lqer_chunks(dataset, tokenizer, max_length, num_proc=8):
    """ChengZhang-98/lqer src/lqer/datasets/slim_pajama.py (wikitext2.py is the same): tokenize each
    map batch joined with "\\n\\n", then group_texts, both with num_proc=8 as get_data_module runs them."""

    def tokenize_function(examples):
        return tokenizer(["\n\n".join(examples["text"])])

    def group_texts(examples):
        concatenated = {key: sum(examples[key], []) for key in examples.keys()}
        total_length = len(concatenated["input_ids"])
        if total_length >= max_length:
            total_length = (total_length // max_length) * max_length
        return {key: [t[i : i + max_length] for i in range(0, total_length, max_length)] for key, t in concatenated.items()}

    encodings = dataset.map(tokenize_function, batched=True, remove_columns=dataset.column_names, num_proc=num_proc)
    return torch.tensor(encodings.map(group_texts, batched=True, num_proc=num_proc)["input_ids"])


def test_lqer_calibration_is_its_slimpajama_pipeline(slimpajama_mirror, tokenizer):
    import datasets

    spec = corpus_spec("slimpajama", {"path": str(slimpajama_mirror), "train_documents": 42})
    train = load_documents(spec, "train")  # the first shard only
    reference = lqer_chunks(datasets.load_dataset(str(slimpajama_mirror), split="train").select(range(42)), tokenizer, 32)
    windows = calibration_windows(train, tokenizer, spec, 20, 32, seed=0)
    assert torch.equal(windows, reference[:20])  # the first 20 chunks, unshuffled
    assert (windows[:, 0] == tokenizer.bos_token_id).sum() >= 2  # shards were tokenized apart
    for seed in SEEDS[1:]:
        assert torch.equal(calibration_windows(train, tokenizer, spec, 20, 32, seed), windows)
    with pytest.raises(PtqError, match=f"gives {reference.shape[0]} windows of seqlen 32, fewer than the 999"):
        calibration_windows(train, tokenizer, spec, 999, 32, seed=0)


def test_lqer_wikitext2_evaluation_is_its_pipeline_not_gptqs(wikitext_mirror, tokenizer):
    import datasets

    spec = corpus_spec("wikitext2", {"path": str(wikitext_mirror), "sampling": "chunks"})
    test = load_documents(spec, "test")
    reference = lqer_chunks(datasets.load_dataset(str(wikitext_mirror), "wikitext-2-raw-v1", split="test"), tokenizer, 64)
    windows, total = evaluation_windows(test, tokenizer, spec, 64)
    assert torch.equal(windows, reference) and total == reference.shape[0]
    _, gptq_test = gptq_wikitext2(wikitext_mirror, tokenizer, 1, 0, 64)
    assert gptq_test.shape[0] > total  # 8 pieces, each with its own BOS and its own dropped remainder


def test_map_batches_follow_datasets_map_sharding():
    import datasets

    seen = []
    dataset = datasets.Dataset.from_dict({"k": list(range(23))})
    dataset.map(lambda batch: seen.append(list(batch["k"])), batched=True, batch_size=4, num_proc=None)
    assert map_batches(list(range(23)), 1, 4) == seen
    assert map_batches(list(range(23)), 5, 4) == [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9], [10, 11, 12, 13], [14],
                                                 [15, 16, 17, 18], [19, 20, 21, 22]]
    assert map_batches(list(range(3)), 8, 1000) == [[0], [1], [2]]
    assert map_batches([], 8, 1000) == []


def test_slimpajama_train_documents_must_exist(slimpajama_mirror):
    spec = corpus_spec("slimpajama", {"path": str(slimpajama_mirror), "train_documents": 61})
    with pytest.raises(PtqError, match="its train split has 60 documents, fewer than train_documents 61"):
        load_documents(spec, "train")


# --- fast or slow tokenizer ----------------------------------------------------------------------------


def test_slow_tokenizer_is_refused_where_transformers_loads_the_fast_one(tokenizer, tmp_path):
    """GPTQ's loaders ask for use_fast=False; transformers 5 answers a LLaMA tokenizer with the fast
    class anyway. load_tokenizer says so instead of tokenizing with it."""
    from transformers import LlamaConfig

    from ptqrepro.models.sources import load_tokenizer, slow_tokenizer_problem

    checkpoint = tmp_path / "checkpoint"
    tokenizer.save_pretrained(checkpoint)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(checkpoint)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "model.json").write_text(json.dumps({"name": "tiny", "source": "hub", "path": str(checkpoint)}))
    fast = load_tokenizer(prepared, "fast")
    assert type(fast).__name__ == "LlamaTokenizer" and fast.is_fast
    if slow_tokenizer_problem() is None:
        pytest.skip("this transformers still has slow tokenizers")
    with pytest.raises(PtqError, match=f"tokenizer 'slow' asked for {checkpoint}, but transformers loaded the fast "
                                       "LlamaTokenizer; set tokenizer: fast"):
        load_tokenizer(prepared, "slow")
