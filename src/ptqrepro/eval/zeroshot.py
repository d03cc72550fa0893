"""Zero-shot evaluation through lm-eval-harness on the in-memory (quantized) model, and two local
tasks built from a corpus's test split for offline runs.

The harness runs for real: ``HFLM`` wraps our model object (activation quantization hooks and
low-rank terms included) and ``simple_evaluate`` scores the tasks; paper task names (arc_easy,
piqa, ...) resolve from lm-eval's registry where the hub is reachable, the local tasks from the
YAMLs ``write_local_tasks`` puts in a folder given as ``include_path``.

Local tasks (documents: the test split's articles; sentences split at ``. ! ?`` before a capital):

* ``ptq_lastword`` (LAMBADA-style, ``loglikelihood``): a passage of consecutive sentences of one
  paragraph, at least ``MIN_PASSAGE_WORDS`` words, whose last word is alphabetic; the context is
  the passage up to that word, the target the word. Metrics: ``acc`` (the word is the greedy
  continuation) and ``perplexity`` of the word, as lm-eval's lambada_openai.
* ``ptq_nextsentence`` (``multiple_choice``, 4-way): up to three sentences of a paragraph as the
  context; the choices are the sentence that follows and three sentences drawn from other
  articles, in a seeded random order. Metrics: ``acc`` and ``acc_norm`` (length-normalised).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ptqrepro.errors import PtqError

LOCAL_TASKS = ("ptq_lastword", "ptq_nextsentence")
HARNESS_SETTINGS = {"random_seed": 0, "numpy_random_seed": 0, "torch_random_seed": 0, "bootstrap_iters": 1000}
"""What ``simple_evaluate`` is given beyond the tasks (its seeds, and the bootstrap that estimates
the standard error of the perplexity metric); every zero-shot result records them."""
MIN_PASSAGE_WORDS = 30
MAX_PASSAGE_WORDS = 120
CONTEXT_SENTENCES = 3
CHOICES = 4
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
HEADING = re.compile(r"^\s*=.*=\s*$")
LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{2,})([.!?\"')]*)$", re.DOTALL)

TASK_YAML = {
    "ptq_lastword": """task: ptq_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "ptq_nextsentence": """task: ptq_nextsentence
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def paragraphs(document: str) -> list[list[str]]:
    """The sentences of each prose paragraph (headings and one-sentence lines dropped)."""
    result = []
    for line in document.split("\n"):
        line = line.strip()
        if not line or HEADING.match(line):
            continue
        sentences = [s.strip() for s in SENTENCE_END.split(line) if s.strip()]
        if len(sentences) >= 2:
            result.append(sentences)
    return result


def last_word_items(documents: list[str]) -> list[dict]:
    """Every candidate passage: the last sentences of a paragraph prefix, MIN..MAX words."""
    items = []
    for document in documents:
        for sentences in paragraphs(document):
            for end in range(1, len(sentences) + 1):
                start = end
                while start > 0 and len(" ".join(sentences[start:end]).split()) < MIN_PASSAGE_WORDS:
                    start -= 1
                passage = " ".join(sentences[start:end])
                if not MIN_PASSAGE_WORDS <= len(passage.split()) <= MAX_PASSAGE_WORDS:
                    continue
                match = LAST_WORD.match(passage)
                if match:
                    items.append({"context": match.group(1), "target": match.group(2)})
    return items


def next_sentence_items(documents: list[str], rng: random.Random) -> list[dict]:
    """Every (context, next sentence) of a paragraph, with three sentences of other documents."""
    sentences_of = [[s for p in paragraphs(d) for s in p] for d in documents]
    if sum(1 for sentences in sentences_of if sentences) < 2:
        raise PtqError("next-sentence task: the test split needs at least two documents with prose")
    items = []
    for index, document in enumerate(documents):
        others = [s for other, sentences in enumerate(sentences_of) if other != index for s in sentences]
        for sentences in paragraphs(document):
            for position in range(1, len(sentences)):
                context = " ".join(sentences[max(0, position - CONTEXT_SENTENCES) : position])
                choices = [sentences[position], *rng.sample(others, CHOICES - 1)]
                order = list(range(CHOICES))
                rng.shuffle(order)
                items.append({"context": context, "choices": [choices[i] for i in order], "label": order.index(0)})
    return items


def write_local_tasks(documents: list[str], out_dir: str | Path, items: int, seed: int = 0,
                      located_at: str | Path | None = None) -> dict[str, int]:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` for ``LOCAL_TASKS`` into ``out_dir``: ``items``
    of each, drawn with ``seed`` from every candidate. The YAMLs name their data by absolute path,
    in ``located_at`` when the folder will be moved there (an atomic write). Returns the number
    written per task."""
    rng = random.Random(seed)
    candidates = {"ptq_lastword": last_word_items(documents), "ptq_nextsentence": next_sentence_items(documents, rng)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for task, pool in candidates.items():
        if not pool:
            raise PtqError(f"{task}: the test split gives no item (paragraphs of prose are needed)")
        chosen = rng.sample(pool, min(items, len(pool)))
        data = out_dir / f"{task}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in chosen))
        final = Path(located_at or out_dir).resolve() / data.name
        (out_dir / f"{task}.yaml").write_text(TASK_YAML[task].format(data=json.dumps(str(final))))
        written[task] = len(chosen)
    return written


def evaluate_zeroshot(model, tokenizer, tasks: list[str], include_path: str | None, batch_size: int,
                      max_length: int, device: str, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval's ``simple_evaluate`` on ``model`` for ``tasks``; ``{task: {metric: value}}``
    with lm-eval's metric names without the filter suffix (``acc``, ``acc_stderr``, ``acc_norm``,
    ``perplexity``, ...)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):  # indexing lm-eval's registry takes ~12 s
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise PtqError(f"unknown zero-shot task(s) {', '.join(unknown)} (not local, not in lm-eval's registry)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    output = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                             **HARNESS_SETTINGS)
    results = {}
    for task in tasks:
        metrics = output["results"][task]
        results[task] = {
            name.split(",")[0]: float(value) for name, value in metrics.items()
            if "," in name and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return results
