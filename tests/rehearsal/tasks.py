"""Stand-ins for the lm-eval hub tasks the paper configs score, left where an online stage-in leaves
them: the real tasks' datasets cannot be downloaded here.

lm-eval's own task definitions run unchanged (``TaskManager().load(["arc_easy"])``); what is stood
in is their data. ``datasets`` offline reads only the Arrow cache it prepared online
(``HF_DATASETS_CACHE/<org>___<name>/<config>/<version>/<hash>/``, found by
``datasets.load.CachedDatasetModuleFactory``), so each task's dataset is written there, in the
columns its lm-eval YAML reads, with items cut from the wiki-mini text (their answers meaningless),
and its repository gets a hub-cache snapshot as well (the revision a staging record reads).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from rehearsal.hub import add

TASK_DATASETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "piqa": ("baber/piqa", "default"),
    "boolq": ("aps/super_glue", "boolq"),
    "social_iqa": ("lighteval/siqa", "default"),
    "hellaswag": ("Rowan/hellaswag", "default"),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "openbookqa": ("allenai/openbookqa", "main"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default"),
}
"""Each task the paper configs name: the dataset (repository, config) its lm-eval 0.4 YAML loads."""
SPLITS = ("train", "validation", "test")
ITEMS = 24


def sentence_items(documents: list[str], seed: int) -> list[tuple[str, str, list[str]]]:
    """(context, answer, three other words) from each sentence of ``documents`` of 8+ words: the
    sentence without its last word, that word, and words drawn from other sentences."""
    sentences = [sentence.split() for document in documents for line in document.split("\n")
                 for sentence in line.split(". ") if len(sentence.split()) >= 8]
    rng = random.Random(seed)
    words = [word for sentence in sentences for word in sentence]
    return [(" ".join(sentence[:-1]), sentence[-1].rstrip("."), rng.sample(words, 3)) for sentence in sentences]


def task_rows(task: str, items: list[tuple[str, str, list[str]]]) -> list[dict]:
    """Rows in the columns the task's lm-eval YAML (and its utils) read."""
    rows = []
    for number, (context, answer, others) in enumerate(items):
        choices = [answer, *others]
        if task in ("arc_easy", "arc_challenge"):
            rows.append({"id": f"q{number}", "question": context, "answerKey": "A",
                         "choices": {"text": choices, "label": ["A", "B", "C", "D"]}})
        elif task == "openbookqa":
            rows.append({"id": f"q{number}", "question_stem": context, "answerKey": "A", "fact1": context,
                         "choices": {"text": choices, "label": ["A", "B", "C", "D"]}})
        elif task == "piqa":
            rows.append({"goal": context, "sol1": answer, "sol2": others[0], "label": number % 2})
        elif task == "boolq":
            rows.append({"question": context, "passage": f"{context} {answer}.", "idx": number, "label": number % 2})
        elif task == "social_iqa":
            rows.append({"context": context, "question": "What comes next?", "answerA": answer, "answerB": others[0],
                         "answerC": others[1], "label": str(1 + number % 3)})
        elif task == "hellaswag":
            half = len(context.split()) // 2
            rows.append({"ind": number, "activity_label": "Wikipedia", "ctx_a": " ".join(context.split()[:half]),
                         "ctx_b": " ".join(context.split()[half:]), "ctx": context, "endings": choices,
                         "source_id": f"wiki~{number}", "split": "val", "split_type": "indomain", "label": "0"})
        elif task == "winogrande":
            rows.append({"sentence": f"{context} _.", "option1": answer, "option2": others[0], "answer": "1"})
        elif task == "lambada_openai":
            rows.append({"text": f"{context} {answer}"})
        else:
            raise KeyError(f"no stand-in for zero-shot task {task!r}")
    return rows


def fill_datasets_cache(hf_home: Path, repo_id: str, config_name: str, splits: dict[str, list[dict]],
                        revision: str) -> Path:
    """Prepare ``splits`` as ``datasets`` prepares ``load_dataset(repo_id, config_name)`` online, under
    ``hf_home/datasets/<org>___<name>/<config_name>/0.0.0/<revision>/``; returns that folder."""
    import pyarrow
    import pyarrow.parquet
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    name = repo_id.split("/")[-1]
    with tempfile.TemporaryDirectory() as scratch:
        files = {}
        for split, rows in splits.items():
            files[split] = [str(Path(scratch) / f"{split}.parquet")]
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), files[split][0])
        builder = Parquet(cache_dir=str(Path(scratch) / "cache"), dataset_name=name, config_name=config_name,
                          data_files=DataFilesDict.from_patterns(files), hash=revision)
        builder.download_and_prepare()
        target = Path(hf_home) / "datasets" / repo_id.replace("/", "___") / config_name / "0.0.0" / revision
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(builder.cache_dir, target)
    return target


def rows_parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow
    import pyarrow.parquet

    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def fill_task_datasets(hf_home: Path, tasks, documents: list[str]) -> dict[str, Path]:
    """Every task of ``tasks`` with a stand-in (TASK_DATASETS): a hub snapshot of its repository
    (one per repository, all its configs) and the prepared ``datasets`` cache of its config, ITEMS
    rows per split; {task: cache folder}."""
    chosen = sorted(set(tasks) & set(TASK_DATASETS))
    splits = {}
    for seed, task in enumerate(chosen):
        items = sentence_items(documents, seed)
        splits[task] = {split: task_rows(task, items[index * ITEMS:(index + 1) * ITEMS])
                        for index, split in enumerate(SPLITS)}
    revisions = {}
    for repo_id in sorted({TASK_DATASETS[task][0] for task in chosen}):
        files = {f"{TASK_DATASETS[task][1]}/{split}-00000-of-00001.parquet": rows_parquet(rows)
                 for task in chosen if TASK_DATASETS[task][0] == repo_id for split, rows in splits[task].items()}
        revisions[repo_id] = add(hf_home, repo_id, files, repo_type="dataset").name
    return {task: fill_datasets_cache(hf_home, *TASK_DATASETS[task], splits[task], revisions[TASK_DATASETS[task][0]])
            for task in chosen}
