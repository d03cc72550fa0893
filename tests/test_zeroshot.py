"""Local zero-shot tasks (built from a corpus's test split) and a real lm-eval-harness run on the
tiny model, quantized with activation quantization in place."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ptqrepro.errors import PtqError
from ptqrepro.eval.zeroshot import (
    LOCAL_TASKS,
    check_metrics,
    hub_tasks,
    last_word_items,
    load_tasks,
    paragraphs,
    stage_tasks,
    staged_key,
    task_record,
    write_local_tasks,
)

DOCUMENTS = [
    " = Rivers = \n" + " ".join(f"The river number {i} flows past the old mill towards the sea." for i in range(8)),
    "Mountains rise above the plain. " * 3 + "\n" + " ".join(f"Climbers reach summit {i} before noon today." for i in range(6)),
    "Ships sail along the coast. Harbours shelter them in winter. Sailors mend the nets at dawn.",
]


def read_items(folder, task):
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def test_paragraphs_drop_headings_and_split_sentences():
    first = paragraphs(DOCUMENTS[0])
    assert len(first) == 1 and len(first[0]) == 8 and first[0][0].startswith("The river number 0")


def test_last_word_items_end_a_passage_with_an_alphabetic_word():
    items = last_word_items(DOCUMENTS)
    assert items
    for item in items:
        assert item["target"].isalpha() and len(item["target"]) >= 2
        assert 30 <= len((item["context"] + " " + item["target"]).split()) <= 120
    assert {"context": items[0]["context"], "target": "sea"} == items[0]


def test_written_tasks_are_seeded_and_well_formed(tmp_path):
    written = write_local_tasks(DOCUMENTS, tmp_path / "a", items=5, seed=3)
    again = write_local_tasks(DOCUMENTS, tmp_path / "b", items=5, seed=3)
    assert written == again and set(written) == set(LOCAL_TASKS)
    assert read_items(tmp_path / "a", "ptq_nextsentence") == read_items(tmp_path / "b", "ptq_nextsentence")
    sentences = {i: {s for p in paragraphs(d) for s in p} for i, d in enumerate(DOCUMENTS)}
    for item in read_items(tmp_path / "a", "ptq_nextsentence"):
        assert len(item["choices"]) == 4 and 0 <= item["label"] < 4
        home = next(i for i, s in sentences.items() if item["choices"][item["label"]] in s)
        distractors = [c for j, c in enumerate(item["choices"]) if j != item["label"]]
        assert not any(c in sentences[home] for c in distractors)  # the other three come from other articles
    yaml_text = (tmp_path / "a" / "ptq_lastword.yaml").read_text()
    assert "output_type: loglikelihood" in yaml_text and str((tmp_path / "a" / "ptq_lastword.jsonl").resolve()) in yaml_text


def test_a_test_split_without_prose_is_a_clear_error(tmp_path):
    with pytest.raises(PtqError, match="at least two documents with prose"):
        write_local_tasks([" = Title = ", "One."], tmp_path, items=5)


@pytest.mark.slow
def test_lm_eval_scores_a_quantized_model_on_the_local_tasks(tmp_path, tiny_model_dir, tiny_corpus):
    """The real harness through the CLI: tasks from the corpus, an int4 model with int8 activations; the
    same metrics with the model streamed one decoder layer at a time (``--placement layers``); the
    per-item file beside each result, whose items give lm-eval's accuracies; the versions recorded;
    and the results through ``tables --averages`` and ``paper-tables`` into a paper's zero-shot cells."""
    from ptqrepro.cli import main
    from ptqrepro.models.sources import load_tokenizer
    from ptqrepro.report.result_format import undeclared_keys

    calibration, corpus, model = tmp_path / "calib.pt", tmp_path / "corpus", tmp_path / "model"
    assert main(["prepare-model", "--name", "tiny", "--spec", json.dumps({"hub": str(tiny_model_dir)}), "--out", str(model)]) == 0
    assert main(["prepare-corpus", "--name", "tiny", "--spec", f"{{source: local, path: {tiny_corpus}}}", "--out", str(corpus)]) == 0
    assert main(["calibrate", "--model", str(model), "--corpus", str(corpus), "--nsamples", "2",
                 "--seqlen", "16", "--out", str(calibration)]) == 0
    assert main(["quantize", "--model", str(model), "--calibration", str(calibration), "--recipe", "r",
                 "--spec", '{steps: [rtn], weight: int4, act: int8}', "--out", str(tmp_path / "q"),
                 "--metrics", str(tmp_path / "q.json"), "--device", "cpu"]) == 0
    assert main(["zeroshot-tasks", "--corpus", str(corpus), "--items", "12", "--out", str(tmp_path / "tasks")]) == 0
    command = [sys.executable, "-m", "ptqrepro.cli", "eval-zeroshot", "--model", str(model), "--quantized", str(tmp_path / "q"),
               "--tasks", *LOCAL_TASKS, "--include", str(tmp_path / "tasks"), "--batch-size", "4", "--max-length", "256",
               "--dtype", "float32", "--device", "cpu", "--metric", "ptq_nextsentence=acc_norm"]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **__import__("os").environ}
    run = subprocess.run([*command, "--out-dir", str(tmp_path / "metrics")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    lastword = json.loads((tmp_path / "metrics" / "zeroshot-ptq_lastword.json").read_text())
    choice = json.loads((tmp_path / "metrics" / "zeroshot-ptq_nextsentence.json").read_text())
    assert choice["provenance"]["placement"] == "whole"
    # a local model folder and corpus: no hub revisions; the tokenizer that tokenized the items
    assert (choice["provenance"]["model_revision"], choice["provenance"]["dataset_revision"]) == (None, None)
    assert choice["provenance"]["tokenizer_class"] == type(load_tokenizer(model)).__name__
    streamed = subprocess.run([*command, "--placement", "layers", "--out-dir", str(tmp_path / "streamed")],
                              capture_output=True, text=True, env=env)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    for task, result in (("ptq_lastword", lastword), ("ptq_nextsentence", choice)):
        layered = json.loads((tmp_path / "streamed" / f"zeroshot-{task}.json").read_text())
        assert layered["metrics"] == result["metrics"] and layered["provenance"]["placement"] == "layers"
    assert lastword["kind"] == "zeroshot" and lastword["dataset"] == "ptq_lastword" and lastword["act_format"] == "int8"
    assert undeclared_keys(lastword) == [] and undeclared_keys(choice) == []  # the format of report.result_format
    assert 0 <= lastword["metrics"]["acc"] <= 1 and lastword["metrics"]["perplexity"] > 1
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(choice["metrics"])
    assert 0 <= choice["metrics"]["acc"] <= 1 and choice["metrics"]["acc_stderr"] > 0
    assert choice["protocol"]["random_seed"] == 0 and choice["protocol"]["bootstrap_iters"] == 1000
    assert choice["protocol"]["num_fewshot"] == 0 and choice["task"]["n_shot"] == 0
    assert choice["reported_metric"] == "acc_norm" and lastword["reported_metric"] == "acc"
    assert choice["task"]["version"] == 1.0 and choice["task"]["lm_eval"] == __import__("lm_eval").__version__
    assert choice["task"]["output_type"] == "multiple_choice" and choice["task"]["metrics"] == ["acc", "acc_norm"]
    # per item: one row per scored document, whose mean is lm-eval's accuracy
    for task, result, columns in (("ptq_lastword", lastword, ["doc_id", "acc"]),
                                  ("ptq_nextsentence", choice, ["doc_id", "acc", "acc_norm"])):
        assert result["task"]["items"] == f"zeroshot-{task}.items.csv"
        items = pd.read_csv(tmp_path / "metrics" / result["task"]["items"])
        assert list(items.columns) == columns and list(items["doc_id"]) == list(range(12))
        for metric in columns[1:]:
            assert set(items[metric]) <= {0, 1} and items[metric].mean() == pytest.approx(result["metrics"][metric])
    # the paper tables: a stand-in paper reporting both tasks and their average
    results = [str(tmp_path / "metrics" / f"zeroshot-{task}.json") for task in LOCAL_TASKS]
    averages = json.dumps({"avg2": {"ptq_lastword": "acc", "ptq_nextsentence": "acc_norm"}})
    assert main(["tables", "--out", str(tmp_path / "tables"), "--averages", averages, *results]) == 0
    reference = tmp_path / "paper.csv"
    rows = [("ptq_lastword", "acc_pct", 10.0), ("ptq_nextsentence", "acc_norm_pct", 50.0), ("avg2", "acc+acc_norm_pct", 30.0)]
    with open(reference, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["paper", "table", "model", "method", "setting", "dataset", "metric", "value", "recipe", "source"])
        writer.writerows([("Stand-in", "T1", lastword["model"], "rtn", "W4A8", task, metric, value, "r", "T1") for task, metric, value in rows])
    assert main(["paper-tables", "--table", str(tmp_path / "tables" / "all.csv"), "--reference", str(reference),
                 "--out", str(tmp_path / "papers")]) == 0
    ours = [100 * lastword["metrics"]["acc"], 100 * choice["metrics"]["acc_norm"]]
    ours.append(sum(ours) / 2)
    markdown = (tmp_path / "papers" / "stand-in.md").read_text()
    cells = [f"{paper:.2f} / {value:.2f} ({value - paper:+.2f})" for (_, _, paper), value in zip(rows, ours)]
    assert f"| W4A8 | rtn | {' | '.join(cells)} |" in markdown


def test_an_unknown_task_is_named(tmp_path, tiny_model_dir):
    from ptqrepro.eval.zeroshot import evaluate_zeroshot

    with pytest.raises(PtqError, match="unknown zero-shot task.*no_such_task"):
        evaluate_zeroshot(None, None, ["no_such_task"], str(tmp_path), 1, 64, "cpu")


STAND_IN = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def stand_in_task(folder, name, rows=True):
    """A hub-like lm-eval task read through ``datasets`` (a JSON file, absent where ``rows`` is False)."""
    data = folder / f"{name}.jsonl"
    if rows:
        data.write_text("".join(json.dumps({"question": f"Q{i}?", "choices": ["yes", "no"], "label": i % 2}) + "\n" for i in range(4)))
    (folder / f"{name}.yaml").write_text(STAND_IN.format(name=name, data=json.dumps(str(data))))


def test_staging_records_each_hub_task_and_lm_evals_version(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    stand_in_task(tmp_path, "standin_qa")
    staged = stage_tasks(["ptq_lastword", "standin_qa"], str(tmp_path))
    assert staged["lm_eval"] == __import__("lm_eval").__version__
    assert staged["tasks"] == {"standin_qa": {"dataset_path": "json", "dataset_name": None, "dataset_revision": None,
                                              "version": 2.0, "output_type": "multiple_choice", "metrics": ["acc"]}}
    with pytest.raises(PtqError, match="standin_qa has no acc_norm"):
        check_metrics(staged["tasks"], {"standin_qa": "acc_norm"})
    check_metrics(staged["tasks"], {"standin_qa": "acc"})
    assert stage_tasks(list(LOCAL_TASKS)) == {"lm_eval": staged["lm_eval"], "tasks": {}}


def test_a_task_whose_data_is_not_there_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    stand_in_task(tmp_path, "standin_missing", rows=False)
    with pytest.raises(PtqError) as error:
        load_tasks(["standin_missing"], str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and message.startswith("zero-shot task standin_missing: its dataset cannot be loaded here")
    assert "ptqrepro stage-tasks --tasks standin_missing" in message


def test_a_hub_datasets_revision_is_the_cached_snapshots(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "datasets--allenai--ai2_arc" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("210d026faf9955653af8916fad021475a3f00453\n")

    class Config:
        dataset_path, dataset_name, dataset_kwargs = "allenai/ai2_arc", "ARC-Easy", None
        metadata, output_type, metric_list = {"version": 1.0}, "multiple_choice", [{"metric": "acc"}, {"metric": "acc_norm"}]

    record = task_record(type("Task", (), {"config": Config})())
    assert record["dataset_revision"] == "210d026faf9955653af8916fad021475a3f00453"
    Config.dataset_kwargs = {"revision": "pinned"}
    assert task_record(type("Task", (), {"config": Config})())["dataset_revision"] == "pinned"


def test_the_staging_key_names_the_hub_tasks_only():
    assert hub_tasks(["arc_easy", "ptq_lastword", "piqa"]) == ["arc_easy", "piqa"]
    assert staged_key(["piqa", "arc_easy", "ptq_lastword"]) == staged_key(["arc_easy", "piqa"]) != staged_key(["piqa"])


@pytest.mark.slow
def test_the_stage_command_fails_in_one_line_offline(tmp_path):
    """A hub task whose dataset is neither cached nor reachable: one line, exit code 2, nothing written."""
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "ptqrepro.cli", "stage-tasks", "--tasks", "arc_easy", "--out", str(tmp_path / "s.json")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2 and not (tmp_path / "s.json").exists()
    (line,) = run.stderr.strip().splitlines()[-1:]
    assert line.startswith("ptqrepro: error: zero-shot task arc_easy: its dataset cannot be loaded here")


@pytest.mark.slow
def test_a_hub_task_is_staged_by_a_local_job_before_the_evaluations(tmp_path, tiny_model_dir, tiny_corpus):
    """A configured hub task adds one local staging job, whose record each eval_zeroshot job reads."""
    from test_dag import snakemake, tiny_config, write_config

    config = tiny_config(tiny_model_dir, tiny_corpus)
    config["eval"]["zeroshot"] |= {"tasks": ["ptq_lastword", "arc_easy"], "metrics": {"arc_easy": "acc_norm"}}
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n", "-p")
    assert run.returncode == 0, run.stderr[-3000:]
    staged = f"results/zeroshot/staged-{staged_key(['arc_easy'])}.json"
    assert f"ptqrepro stage-tasks --tasks arc_easy --metric arc_easy=acc_norm --out {staged}" in run.stdout
    evaluations = [line for line in run.stdout.splitlines() if "ptqrepro eval-zeroshot" in line]
    assert evaluations and all(f"--staged {staged}" in line and "--num-fewshot 0" in line for line in evaluations)
    # a local rule: on a cluster it runs where Snakemake runs, not in a (GPU, offline) job
    local = subprocess.run([sys.executable, "-c", LOCAL_RULES, str(Path(__file__).resolve().parents[1] / "Snakefile")],
                           cwd=tmp_path, capture_output=True, text=True)
    assert local.returncode == 0, local.stderr[-3000:]
    assert json.loads(local.stdout.splitlines()[-1]) == ["prepare_corpus", "prepare_model", "stage", "stage_zeroshot_tasks"]


LOCAL_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    workflow = api.workflow(snakefile=Path(sys.argv[1]), resource_settings=ResourceSettings(cores=1), workdir=Path("."))
    print(json.dumps(sorted(workflow._workflow._localrules)))
"""


def test_an_evaluation_refuses_tasks_staged_by_another_lm_eval(tmp_path, capsys):
    from ptqrepro.cli import main

    staged = tmp_path / "staged.json"
    staged.write_text(json.dumps({"lm_eval": "0.3.0", "tasks": {}}))
    code = main(["eval-zeroshot", "--model", str(tmp_path / "m"), "--quantized", str(tmp_path / "q"), "--tasks", "ptq_lastword",
                 "--staged", str(staged), "--out-dir", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert "staged with lm-eval 0.3.0, this job has" in capsys.readouterr().err
