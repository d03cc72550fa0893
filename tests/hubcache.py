"""Stand-ins for the Hugging Face hub: a cache laid out as huggingface_hub lays it out, filled from
local files, so that stage-in and every job can be tested offline under real hub ids.

    from hubcache import add_snapshot, add_folder_snapshot, add_wikitext_snapshot, add_c4_snapshot

    hub = tmp_path / "hf-home" / "hub"                      # HF_HOME/hub (or HF_HUB_CACHE)
    add_folder_snapshot(hub, "meta-llama/Llama-2-7b-hf", saved_model_dir)
    add_wikitext_snapshot(hub, {"train": [...], "validation": [...], "test": [...]})
    add_c4_snapshot(hub, {"train": [...], "validation": [...]})

Each repository becomes ``<hub>/<type>s--<org>--<name>/`` with ``blobs/<sha256 of the bytes>``,
``refs/main`` holding a 40-hex commit, and ``snapshots/<commit>/<path>`` as relative symlinks into
``blobs/``, which is what ``snapshot_download(..., local_files_only=True)``, ``from_pretrained`` and
``datasets`` read offline. No tree listing is cached, so huggingface_hub takes a snapshot folder as
complete. The commit is the SHA-1 of the repository's paths and bytes unless given, so the same
files give the same commit.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from pathlib import Path

WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
C4_REPO = "allenai/c4"
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}

WIKITEXT_CARD = f"""---
configs:
- config_name: {WIKITEXT_CONFIG}
  data_files:
  - split: train
    path: {WIKITEXT_CONFIG}/train-*
  - split: validation
    path: {WIKITEXT_CONFIG}/validation-*
  - split: test
    path: {WIKITEXT_CONFIG}/test-*
---
# Stand-in for the hub's wikitext repository (only the config the corpora read)
"""


def add_snapshot(hub: str | os.PathLike, repo_id: str, files: dict[str, bytes], repo_type: str = "model",
                 commit: str | None = None) -> str:
    """Put ``files`` (path in the repository -> bytes) into the cache ``hub`` as the ``main`` snapshot
    of ``repo_id`` (``repo_type`` model or dataset); return its commit."""
    if commit is None:
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path])
        commit = digest.hexdigest()
    folder = Path(hub) / "--".join([f"{repo_type}s", *repo_id.split("/")])
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    for path, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


def add_folder_snapshot(hub: str | os.PathLike, repo_id: str, folder: str | os.PathLike, commit: str | None = None) -> str:
    """The files of ``folder`` (e.g. a ``save_pretrained`` model with its tokenizer) as the model
    repository ``repo_id``'s ``main`` snapshot; return its commit."""
    folder = Path(folder)
    files = {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
    return add_snapshot(hub, repo_id, files, "model", commit)


def wikitext_files(rows: dict[str, list[str]]) -> dict[str, bytes]:
    """The files of a WikiText repository with the ``wikitext-2-raw-v1`` config only: one parquet file
    of ``rows[split]`` (the ``text`` column) per split, as the hub's parquet layout names them, and a
    card mapping them."""
    import pandas

    files = {"README.md": WIKITEXT_CARD.encode()}
    for split, texts in rows.items():
        buffer = io.BytesIO()
        pandas.DataFrame({"text": texts}).to_parquet(buffer)
        files[f"{WIKITEXT_CONFIG}/{split}-00000-of-00001.parquet"] = buffer.getvalue()
    return files


def write_wikitext_mirror(root: str | os.PathLike, rows: dict[str, list[str]]) -> Path:
    """``wikitext_files(rows)`` as a plain folder ``root`` (a local mirror that ``load_dataset(root,
    "wikitext-2-raw-v1")`` reads, as a user's copy of the repository would be); return ``root``."""
    root = Path(root)
    for path, data in wikitext_files(rows).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def add_wikitext_snapshot(hub: str | os.PathLike, rows: dict[str, list[str]], commit: str | None = None) -> str:
    """``wikitext_files(rows)`` as the dataset repository of WikiText (``load_dataset("wikitext")`` is
    redirected to it) in the cache ``hub``; return its commit."""
    return add_snapshot(hub, WIKITEXT_REPO, wikitext_files(rows), "dataset", commit)


def add_c4_snapshot(hub: str | os.PathLike, records: dict[str, list[str]], commit: str | None = None) -> str:
    """The dataset repository allenai/c4 with the two shards the C4 corpus reads (its first train and
    validation shard of ``en``), ``records[split]`` as their documents' text; return its commit."""
    files = {}
    for split, texts in records.items():
        lines = "".join(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{index}"}) + "\n"
                        for index, text in enumerate(texts))
        files[C4_FILES[split]] = gzip.compress(lines.encode(), mtime=0)
    return add_snapshot(hub, C4_REPO, files, "dataset", commit)


NETGUARD = Path(__file__).resolve().parent / "netguard"
"""A folder to put first on ``PYTHONPATH``: its ``sitecustomize`` makes every Python process refuse a
connection to anything but loopback or a Unix socket, and append the address to ``$NETGUARD_LOG``."""
