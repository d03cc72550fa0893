"""What the rehearsal puts into the hub cache (laid out by tests/hubcache.py): tiny random models of
the paper configs' classes under their real hub ids, and snapshots of the datasets the built-in
corpora name, with wiki-mini's text.

With ``HF_HUB_OFFLINE=1`` the stage-in and every job resolve ``main`` through the cache's
``refs/main`` and read the snapshot, so a run here takes the code paths a cluster user's run takes
after the download.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import torch

from hubcache import C4_REPO, WIKITEXT_REPO, add_c4_snapshot, add_snapshot, add_wikitext_snapshot

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


def snapshot_folder(hf_home: Path, repo_id: str, repo_type: str, commit: str) -> Path:
    return Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots" / commit


def add(hf_home: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """``files`` as the ``main`` snapshot of ``repo_id`` in ``hf_home``'s hub cache
    (hubcache.add_snapshot); returns the snapshot folder."""
    return snapshot_folder(hf_home, repo_id, repo_type, add_snapshot(Path(hf_home) / "hub", repo_id, files, repo_type))


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
        snapshots[hub_id] = add(hf_home, hub_id, {**files, **tokenizer_files})
    return snapshots


# --- datasets -------------------------------------------------------------------------------------


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


def fill_wikitext(hf_home: Path, splits: dict[str, list[str]]) -> Path:
    """WikiText's repository with the config ``wikitext-2-raw-v1`` (hubcache.add_wikitext_snapshot),
    its rows cut from ``splits`` ({split: articles}) as ``wikitext_lines`` cuts them."""
    commit = add_wikitext_snapshot(Path(hf_home) / "hub", {split: wikitext_lines(articles) for split, articles in splits.items()})
    return snapshot_folder(hf_home, WIKITEXT_REPO, "dataset", commit)


def c4_documents(articles: list[str], paragraphs_per_document: int = 3) -> list[str]:
    """C4-like documents: a few consecutive paragraphs of an article each, headings left out."""
    documents = []
    for article in articles:
        paragraphs = [line for line in article.split("\n") if not line.startswith(" =")]
        documents += ["\n".join(paragraphs[start:start + paragraphs_per_document])
                      for start in range(0, len(paragraphs), paragraphs_per_document)]
    return documents


def fill_c4(hf_home: Path, train: list[str], validation: list[str]) -> Path:
    """``allenai/c4`` with the two shards the built-in corpus ``c4`` reads (hubcache.add_c4_snapshot),
    documents cut from the ``train`` and ``validation`` articles."""
    commit = add_c4_snapshot(Path(hf_home) / "hub", {"train": c4_documents(train), "validation": c4_documents(validation)})
    return snapshot_folder(hf_home, C4_REPO, "dataset", commit)


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
    return add(hf_home, repo_id, files, repo_type="dataset")
