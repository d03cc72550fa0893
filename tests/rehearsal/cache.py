"""The whole rehearsal cache in one call: HF_HOME/hub with every paper model and corpus."""

from __future__ import annotations

import json
from pathlib import Path

from rehearsal.hub import ARCHITECTURES, fill_c4, fill_model_cache, fill_slimpajama, fill_wikitext
from rehearsal.tasks import TASK_DATASETS, fill_task_datasets


def wiki_mini_splits() -> dict[str, list[str]]:
    """The articles of the tests' real text, the built-in corpus ``wiki-mini`` (gensim's shortened
    Wikipedia dump, cleaned as WikiText), by split."""
    from ptqrepro.data.corpora import SPLITS, corpus_spec, load_documents

    spec = corpus_spec("wiki-mini")
    return {split: load_documents(spec, split) for split in SPLITS}


def build_hub_cache(hf_home: Path, hub_ids=tuple(ARCHITECTURES), tasks=tuple(TASK_DATASETS)) -> dict:
    """Fill ``hf_home/hub``: a tiny model under each of ``hub_ids`` with a byte-level BPE tokenizer
    trained on wiki-mini's train split (tests/conftest.py tiny_tokenizer), ``wikitext``,
    ``allenai/c4`` and ``DKYoon/SlimPajama-6B`` from wiki-mini's articles; and the datasets of the zero-shot ``tasks`` as a
    stage-in leaves them (``rehearsal.tasks``). Returns {repository id or task: its folder}."""
    from conftest import tiny_tokenizer
    from ptqrepro.data.corpora import BUILTIN_CORPORA

    splits = wiki_mini_splits()
    text = hf_home / "tokenizer-text"
    text.mkdir(parents=True, exist_ok=True)
    (text / "train.jsonl").write_text("".join(json.dumps({"text": article}) + "\n" for article in splits["train"]))
    snapshots = fill_model_cache(hf_home, hub_ids, tiny_tokenizer(text))
    paths = {name: spec.path for name, spec in BUILTIN_CORPORA.items()}
    snapshots[paths["wikitext2"]] = fill_wikitext(hf_home, splits)
    snapshots[paths["c4"]] = fill_c4(hf_home, splits["train"], splits["validation"] + splits["test"])
    snapshots[paths["slimpajama"]] = fill_slimpajama(hf_home, [article for split in splits.values() for article in split],
                                                      paths["slimpajama"])
    snapshots.update(fill_task_datasets(hf_home, tasks, splits["test"]))
    return snapshots
