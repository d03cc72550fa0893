"""A Hugging Face hub cache filled here: tiny random models of the paper configs' classes under
their real hub ids, and hub-layout snapshots of the datasets the built-in corpora name.

The layout is what ``huggingface_hub`` itself writes (its cache documentation, "Understand caching"):

    HF_HOME/hub/{models,datasets}--<org>--<name>/
        blobs/<hash>                      every file's bytes, named by the hash the hub gives it
        refs/main                         the commit the main branch points at
        snapshots/<commit>/<path>         a relative symlink to ../../blobs/<hash>

With ``HF_HUB_OFFLINE=1`` ``from_pretrained("meta-llama/Llama-2-7b-hf")`` and
``snapshot_download(...)`` resolve ``main`` through ``refs/main`` and read the snapshot, so a run
here takes the code paths a cluster user's run takes after the download.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".gz")
"""Files the hub stores through Git LFS: their blob is named by the SHA-256 of the content; the
others by their Git blob SHA-1."""

ARCHITECTURES = {
    "meta-llama/Llama-2-7b-hf": "llama",
    "meta-llama/Llama-2-13b-hf": "llama",
    "meta-llama/Llama-2-70b-hf": "llama-gqa",
    "huggyllama/llama-7b": "llama",
    "huggyllama/llama-13b": "llama",
    "huggyllama/llama-30b": "llama",
    "huggyllama/llama-65b": "llama",
    "mistralai/Mistral-7B-v0.1": "mistral",
    "facebook/opt-125m": "opt",
    "facebook/opt-1.3b": "opt",
    "facebook/opt-2.7b": "opt",
    "facebook/opt-6.7b": "opt",
    "facebook/opt-13b": "opt",
    "facebook/opt-30b": "opt",
}
"""Each hub id the paper configs name and the class of its checkpoint: LLaMA-1 and Llama-2 are
``LlamaForCausalLM`` (Llama-2-70B with grouped-query attention, 8 key/value heads of 64),
Mistral-7B ``MistralForCausalLM`` (grouped-query, 8 of 32), OPT ``OPTForCausalLM``."""

HIDDEN = 128
"""Width of every tiny model: 128 keeps what the paper configs ask of a linear's input: groups of
128 (``int4-g128``), MX blocks of 16 and 32, and DWR/LQER ranks once the config copy shrinks them
(``rehearsal.shrink``)."""
INTERMEDIATE = 2 * HIDDEN
HEADS = 4
LAYERS = 2
MAX_POSITIONS = 512


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_snapshot(hf_home: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """Store ``files`` ({path in the repository: bytes}) as the ``main`` snapshot of ``repo_id`` in
    the hub cache under ``hf_home``; returns the snapshot folder. The commit hash is derived from
    the content, so the same files give the same revision."""
    folder = Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    tree = hashlib.sha1()
    hashes = {}
    for path, data in sorted(files.items()):
        hashes[path] = hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
        tree.update(f"{path}\0{hashes[path]}\n".encode())
    commit = tree.hexdigest()
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    for path, data in files.items():
        blob = folder / "blobs" / hashes[path]
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def tiny_model(architecture: str, vocab_size: int, seed: int):
    """A random ``*ForCausalLM`` of ``architecture`` (a value of ARCHITECTURES) in float16, the
    dtype the real checkpoints are stored in, with the real models' token ids for BOS/EOS."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                              OPTForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  max_position_embeddings=MAX_POSITIONS, dtype="float16")
    if architecture == "opt":
        config = OPTConfig(ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, bos_token_id=2, eos_token_id=2,
                           pad_token_id=1, **common)
        model = OPTForCausalLM(config)
    elif architecture == "mistral":
        config = MistralConfig(intermediate_size=INTERMEDIATE, num_key_value_heads=HEADS // 2, sliding_window=4096,
                               bos_token_id=1, eos_token_id=2, **common)
        model = MistralForCausalLM(config)
    else:
        kv_heads = HEADS // 2 if architecture == "llama-gqa" else HEADS
        config = LlamaConfig(intermediate_size=INTERMEDIATE, num_key_value_heads=kv_heads, bos_token_id=1,
                             eos_token_id=2, tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(config)
    return model.to(torch.float16).eval()


def saved_files(save) -> dict[str, bytes]:
    """The files ``save(folder)`` writes, as {relative path: bytes}."""
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        return {str(path.relative_to(folder)): path.read_bytes() for path in Path(folder).rglob("*") if path.is_file()}


def fill_model_cache(hf_home: Path, hub_ids, tokenizer) -> dict[str, Path]:
    """Each hub id's tiny model (sharded safetensors with their index, as the 7B-70B checkpoints
    are stored) and ``tokenizer`` in the hub cache; returns {hub id: snapshot folder}."""
    tokenizer_files = saved_files(tokenizer.save_pretrained)
    snapshots = {}
    for seed, hub_id in enumerate(sorted(hub_ids)):
        model = tiny_model(ARCHITECTURES[hub_id], len(tokenizer), seed)
        files = saved_files(lambda folder: model.save_pretrained(folder, max_shard_size="300KB"))
        snapshots[hub_id] = write_snapshot(hf_home, hub_id, {**files, **tokenizer_files})
    return snapshots


# --- datasets -------------------------------------------------------------------------------------


def parquet_bytes(column: str, values: list[str]) -> bytes:
    import pyarrow
    import pyarrow.parquet

    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.table({column: values}), buffer)
    return buffer.getvalue()


def json_gz_bytes(records: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(record) + "\n" for record in records).encode(), mtime=0)


WIKITEXT_README = """---
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: train
    path: wikitext-2-raw-v1/train-*
  - split: validation
    path: wikitext-2-raw-v1/validation-*
---
# WikiText (rehearsal stand-in: Wikipedia text of gensim's test dump, laid out as the hub repository)
"""


def wikitext_lines(articles: list[str]) -> list[str]:
    """The rows of a WikiText raw split: one line each, ending in a newline, a blank row around each
    heading, as the hub's parquet files hold them."""
    rows = [""]
    for article in articles:
        for line in article.split("\n"):
            heading = line.startswith(" =")
            rows += [line + "\n", ""] if heading else [line + "\n"]
        rows.append("")
    return rows


def fill_wikitext(hf_home: Path, splits: dict[str, list[str]], repo_id: str) -> Path:
    """``repo_id`` (the built-in corpus ``wikitext2``'s path) with the config ``wikitext-2-raw-v1``:
    one parquet file per split (column ``text``), the README's ``configs`` naming them, as the
    hub repository (Salesforce/wikitext, which ``wikitext`` redirects to) has them."""
    files = {"README.md": WIKITEXT_README.encode()}
    for split, articles in splits.items():
        files[f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet"] = parquet_bytes("text", wikitext_lines(articles))
    return write_snapshot(hf_home, repo_id, files, repo_type="dataset")


def c4_documents(articles: list[str], paragraphs_per_document: int = 3) -> list[dict]:
    """C4-like records (``text``, ``timestamp``, ``url``): a few consecutive paragraphs of an article
    each, headings left out."""
    records = []
    for number, article in enumerate(articles):
        paragraphs = [line for line in article.split("\n") if not line.startswith(" =")]
        for start in range(0, len(paragraphs), paragraphs_per_document):
            text = "\n".join(paragraphs[start:start + paragraphs_per_document])
            records.append({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                            "url": f"https://example.org/{number}/{start}"})
    return records


def fill_c4(hf_home: Path, train: list[str], validation: list[str], repo_id: str) -> Path:
    """``allenai/c4`` with the two shards the built-in corpus ``c4`` reads (ptqrepro.data.corpora
    C4_TRAIN_SHARD, C4_VALIDATION_SHARD), JSON lines in gzip as the hub repository stores them."""
    from ptqrepro.data.corpora import C4_TRAIN_SHARD, C4_VALIDATION_SHARD

    files = {C4_TRAIN_SHARD: json_gz_bytes(c4_documents(train)),
             C4_VALIDATION_SHARD: json_gz_bytes(c4_documents(validation)),
             "README.md": b"# C4 (rehearsal stand-in: Wikipedia text of gensim's test dump)\n"}
    return write_snapshot(hf_home, repo_id, files, repo_type="dataset")


SLIMPAJAMA_SHARDS = ("train-00000-of-00048-ab2b35705f029d94", "train-00001-of-00048-f2ff493d6eb6da4e",
                     "validation-00000-of-00001-1dd1ef6e4ac3a7b0", "test-00000-of-00001-6d9a46ba1ba8cde1")
"""Four of ``DKYoon/SlimPajama-6B``'s files (``data/<name>.parquet``): its first two train shards,
its validation and test files. The hash suffixes are stand-ins; the built-in corpus matches
``train-00000-of-00048-*``."""


def fill_slimpajama(hf_home: Path, articles: list[str], repo_id: str) -> Path:
    """``DKYoon/SlimPajama-6B`` as the hub stores it (parquet, columns ``text``, ``meta``,
    ``__index_level_0__``): each paragraph of ``articles`` a document, the first shard holding the
    first 4500 (LQER reads the first 4096 train documents), the other files a few each."""
    paragraphs = [line for article in articles for line in article.split("\n") if not line.startswith(" =")]
    if len(paragraphs) < 4600:
        raise ValueError(f"fill_slimpajama: {len(paragraphs)} paragraphs, fewer than 4600")
    bounds = {SLIMPAJAMA_SHARDS[0]: (0, 4500), SLIMPAJAMA_SHARDS[1]: (4500, 4540),
              SLIMPAJAMA_SHARDS[2]: (4540, 4570), SLIMPAJAMA_SHARDS[3]: (4570, 4600)}
    import pyarrow
    import pyarrow.parquet

    files = {"README.md": b"# SlimPajama-6B (rehearsal stand-in: Wikipedia text of gensim's test dump)\n"}
    for name, (start, stop) in bounds.items():
        table = pyarrow.table({"text": paragraphs[start:stop],
                               "meta": [{"redpajama_set_name": "RedPajamaWikipedia"}] * (stop - start),
                               "__index_level_0__": list(range(start, stop))})
        buffer = io.BytesIO()
        pyarrow.parquet.write_table(table, buffer)
        files[f"data/{name}.parquet"] = buffer.getvalue()
    return write_snapshot(hf_home, repo_id, files, repo_type="dataset")
