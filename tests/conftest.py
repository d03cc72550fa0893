"""Shared fixtures: a tiny random-initialised LLaMA with its own tokenizer, a tiny corpus, and the
rehearsals' hub cache; and the order in which the two workers take the test files.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the tiny corpus.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a model layer weight quantization grid scale zero point error matrix column row "
    "group channel token window corpus river mountain city history music language science "
    "king war people north south early later small large first second known called"
).split()


def synthetic_text(seed: int, paragraphs: int) -> str:
    """Deterministic pseudo-prose: sentences drawn from a small vocabulary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 5))]
        lines.append(" ".join(sentences))
    return "\n".join(lines)


def write_tiny_corpus(folder: Path) -> Path:
    """A 'local' corpus: train/validation/test as JSONL documents."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (seed, docs) in {"train": (1, 40), "validation": (2, 5), "test": (3, 12)}.items():
        with open(folder / f"{split}.jsonl", "w") as handle:
            for index in range(docs):
                handle.write(json.dumps({"text": synthetic_text(seed * 1000 + index, 6)}) + "\n")
    return folder


def tiny_tokenizer(corpus: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform predictions; larger weights give the layers real structure.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(8.0)
    return model.eval()


def pytest_collection_modifyitems(config, items):
    """Files with more slow tests first, each file's tests kept together and in order: with two
    workers taking whole files (pyproject.toml's addopts), the long files start early and the
    short ones fill the end."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_corpus) -> Path:
    """A saved tiny LLaMA + tokenizer: what a user's local hub directory looks like."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tokenizer = tiny_tokenizer(tiny_corpus)
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepare_tiny_run(root: Path, model_dir: Path, corpus: Path, nsamples: int, seqlen: int) -> Path:
    """What the DAG's first jobs make, by the command line: ``root/model`` and ``root/corpus``
    prepared, ``root/calib.pt`` drawn (seed 0)."""
    from ptqrepro.cli import main

    assert main(["prepare-model", "--name", "tiny", "--spec", json.dumps({"hub": str(model_dir)}),
                 "--out", str(root / "model")]) == 0
    assert main(["prepare-corpus", "--name", "tiny", "--spec", f"{{source: local, path: {corpus}}}",
                 "--out", str(root / "corpus")]) == 0
    assert main(["calibrate", "--model", str(root / "model"), "--corpus", str(root / "corpus"), "--nsamples",
                 str(nsamples), "--seqlen", str(seqlen), "--out", str(root / "calib.pt")]) == 0
    return root


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory) -> Path:
    """HF_HOME with the hub cache of every paper model and corpus and the zero-shot stand-ins
    (tests/rehearsal/cache.py, about 20 s): what the rehearsals read, offline."""
    from rehearsal.cache import build_hub_cache

    home = tmp_path_factory.mktemp("hf-home")
    build_hub_cache(home)
    return home


@pytest.fixture()
def model():
    return tiny_llama(vocab_size=96)
