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

Hub tasks (every task not local) read their datasets through ``datasets``, which offline reads
only what it prepared before: ``stage_tasks`` builds each task once where the network is, and
records what it resolved (dataset path, name, revision; the task's version; lm-eval's version);
``load_tasks`` builds them again in the job and names the task whose data is not there.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
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


def hub_tasks(tasks: list[str]) -> list[str]:
    """The tasks that are not local (lm-eval's registry; their data comes from the hub)."""
    return [task for task in tasks if task not in LOCAL_TASKS]


def staged_key(tasks: list[str]) -> str:
    """The name of a staging record of the hub tasks among ``tasks`` (order and local tasks aside):
    ``results/zeroshot/staged-<key>.json``."""
    return hashlib.sha256(" ".join(sorted(set(hub_tasks(tasks)))).encode()).hexdigest()[:12]


def lm_eval_version() -> str:
    return package_version("lm_eval")


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's ``TaskManager`` knowing ``tasks``: the local folder alone where it holds them all
    (indexing lm-eval's registry takes ~12 s), else the registry too. Raises ``PtqError`` naming
    the tasks neither knows."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise PtqError(f"unknown zero-shot task(s) {', '.join(unknown)} (not local, not in lm-eval's registry)")
    return manager


def load_tasks(tasks: list[str], include_path: str | None) -> tuple[object, dict]:
    """lm-eval's ``TaskManager`` and ``{task: Task}``, each task built with its data (``datasets``
    downloads it, or reads the cache it prepared). A task whose data cannot be had is one line
    naming it and what to do; so is a group or tag name (its tasks are to be named)."""
    import datasets

    datasets.disable_progress_bars()  # a job's log and a bad input's one line carry no progress bars
    manager = task_manager(tasks, include_path)
    loaded = {}
    for task in tasks:
        try:
            built = manager.load([task])["tasks"]
        except Exception as error:  # datasets/hub errors have no common base class
            reason = (str(error).strip().splitlines() or [""])[0]
            raise PtqError(
                f"zero-shot task {task}: its dataset cannot be loaded here ({type(error).__name__}: {reason}); "
                f"stage it where the network is (`ptqrepro stage-tasks --tasks {task} --out FILE`, which "
                "rule stage_zeroshot_tasks runs) with the HF_HOME the jobs read"
            ) from error
        if task not in built:
            raise PtqError(f"zero-shot task {task}: a group or tag of lm-eval ({', '.join(sorted(built))}): name its tasks")
        loaded[task] = built[task]
    return manager, loaded


def task_record(task) -> dict:
    """What a built lm-eval task reads and how it scores: its dataset (path, name, the revision it
    pins or the hub snapshot ``datasets`` resolved, None where neither is known), its version,
    output type and metrics."""
    config = task.config
    kwargs = config.dataset_kwargs or {}
    return {
        "dataset_path": config.dataset_path,
        "dataset_name": config.dataset_name,
        "dataset_revision": kwargs.get("revision") or _hub_snapshot(config.dataset_path, kwargs.get("revision")),
        "version": (config.metadata or {}).get("version"),
        "output_type": config.output_type,
        "metrics": [entry["metric"] for entry in config.metric_list or [] if isinstance(entry.get("metric"), str)],
    }


def _hub_snapshot(dataset_path: str | None, revision: str | None) -> str | None:
    """The commit of a hub dataset's cached snapshot (``HF_HUB_CACHE/datasets--org--name/refs``)."""
    if not dataset_path or "/" not in dataset_path:
        return None
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"datasets--{dataset_path.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def stage_tasks(tasks: list[str], include_path: str | None = None) -> dict:
    """Build every hub task of ``tasks`` once (``datasets`` prepares its cache) and return the
    staging record: lm-eval's version and each task's ``task_record``. ``include_path``: a folder
    of more task YAMLs (stand-ins of hub tasks)."""
    loaded = load_tasks(hub_tasks(tasks), include_path)[1] if hub_tasks(tasks) else {}
    return {"lm_eval": lm_eval_version(), "tasks": {task: task_record(loaded[task]) for task in sorted(loaded)}}


def check_metrics(records: dict[str, dict], metrics: dict[str, str]) -> None:
    """Each task's reported metric (``eval.zeroshot.metrics``) is one the task computes."""
    wrong = [f"{task} has no {metric} (it scores {', '.join(records[task]['metrics'])})"
             for task, metric in metrics.items() if task in records and metric not in records[task]["metrics"]]
    if wrong:
        raise PtqError(f"eval.zeroshot.metrics: {'; '.join(wrong)}")


@dataclass(frozen=True)
class TaskResult:
    """One task's scores: lm-eval's aggregate ``metrics`` (filter suffix dropped), the task's
    ``record`` (``task_record``), the shots used, ``items``: per scored document its id and its
    0/1 per accuracy metric (``acc``, ``acc_norm`` where the task has it), and
    ``loglikelihoods``: per document id the log-likelihood of each of its requests (the target;
    each choice), which the items' accuracies are decided on."""

    metrics: dict[str, float]
    record: dict
    num_fewshot: int
    items: list[dict]
    loglikelihoods: dict[int, list[float]] = field(default_factory=dict)


ITEM_METRICS = ("acc", "acc_norm")


def evaluate_zeroshot(model, tokenizer, tasks: list[str], include_path: str | None, batch_size: int,
                      max_length: int, device: str, limit: int | None = None, num_fewshot: int = 0,
                      loaded: tuple | None = None) -> dict[str, TaskResult]:
    """Run lm-eval's ``simple_evaluate`` on ``model`` for ``tasks`` (``num_fewshot`` examples per
    prompt, the per-item results logged); ``{task: TaskResult}``. ``loaded``: what ``load_tasks``
    returned for ``tasks`` (built here if None)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager, built = loaded if loaded is not None else load_tasks(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    output = simple_evaluate(model=lm, tasks=[built[task] for task in tasks], task_manager=manager, limit=limit,
                             log_samples=True, num_fewshot=num_fewshot, **HARNESS_SETTINGS)
    return task_results(output, tasks, {task: task_record(built[task]) for task in tasks}, num_fewshot)


def task_results(output: dict, tasks: list[str], records: dict[str, dict], num_fewshot: int) -> dict[str, TaskResult]:
    """``{task: TaskResult}`` from lm-eval's ``simple_evaluate`` output (``results``, ``n-shot``,
    and ``samples`` logged: each with ``doc_id``, its accuracy metrics and ``filtered_resps``, per
    request ``(log-likelihood, is_greedy)``) and each task's ``task_record``; the same for every
    model type lm-eval ran."""
    results = {}
    for task in tasks:
        metrics = {
            name.split(",")[0]: float(value) for name, value in output["results"][task].items()
            if "," in name and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        samples = sorted(output["samples"][task], key=lambda sample: int(sample["doc_id"]))
        items = [{"doc_id": int(sample["doc_id"]), **{name: int(sample[name]) for name in ITEM_METRICS if name in sample}}
                 for sample in samples]
        loglikelihoods = {int(sample["doc_id"]): [float(response[0]) for response in sample["filtered_resps"]]
                          for sample in samples}
        shots = output.get("n-shot", {}).get(task, num_fewshot)
        results[task] = TaskResult(metrics, records[task], int(shots), items, loglikelihoods)
    return results


def write_items(path: str | Path, items: list[dict]) -> None:
    """The per-item results as CSV: ``doc_id`` and each accuracy metric (0/1) the items carry."""
    columns = ["doc_id", *[name for name in ITEM_METRICS if items and name in items[0]]]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(items)
