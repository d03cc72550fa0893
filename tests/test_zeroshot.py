"""Local zero-shot tasks (built from a corpus's test split) and a real lm-eval-harness run on the
tiny model, quantized with activation quantization in place."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ptqrepro.errors import PtqError
from ptqrepro.eval.zeroshot import LOCAL_TASKS, last_word_items, paragraphs, write_local_tasks

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
    same metrics with the model streamed one decoder layer at a time (``--placement layers``)."""
    from ptqrepro.cli import main
    from ptqrepro.models.sources import load_tokenizer

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
               "--dtype", "float32", "--device", "cpu"]
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
    assert 0 <= lastword["metrics"]["acc"] <= 1 and lastword["metrics"]["perplexity"] > 1
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(choice["metrics"])
    assert 0 <= choice["metrics"]["acc"] <= 1 and choice["metrics"]["acc_stderr"] > 0
    assert choice["protocol"]["random_seed"] == 0 and choice["protocol"]["bootstrap_iters"] == 1000


def test_an_unknown_task_is_named(tmp_path, tiny_model_dir):
    from ptqrepro.eval.zeroshot import evaluate_zeroshot

    with pytest.raises(PtqError, match="unknown zero-shot task.*no_such_task"):
        evaluate_zeroshot(None, None, ["no_such_task"], str(tmp_path), 1, 64, "cpu")
