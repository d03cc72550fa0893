"""Every method and the evaluation on CUDA against the CPU: does the GPU compute what the CPU does?

Builds tiny random-initialised LLaMA-, Mistral- and OPT-class models here (transformers' config
classes, a byte-level BPE tokenizer trained on synthetic text; nothing is downloaded), then runs,
through the command line's own functions (``ptqrepro.cli.main``: prepare-model, prepare-corpus,
calibrate, quantize, dwr, eval-ppl), every recipe of ``RECIPES`` once with ``--device cpu`` and once
with ``--device cuda``: RTN (integer and MX weights), GPTQ (groups, act-order with static groups,
true-sequential), AWQ, SmoothQuant, MagR + GPTQ (+ coordinate descent), LQER and L2QER, MX weights
with MX activations, DWR's search on a GPTQ base, plus GPTQ with the calibration activations
offloaded to the CPU and GPTQ calibrated and evaluated in bfloat16. Each quantized model is
evaluated (eval-ppl) on the CPU with the whole model placed there, and on CUDA both whole
(``--placement whole``) and streamed one decoder layer at a time (``--placement layers``).

Per model and recipe it reports, CUDA against CPU:

* max |ΔW|: the largest difference of the dequantized weights over all quantized linears (and,
  for LQER/L2QER, of the low-rank terms ``(A B)ᵀ``; for SmoothQuant/AWQ, of the rescaled norms);
* same grid point: the share of weight entries with the same code on both devices;
* the perplexity on each device and its relative difference |ppl_cuda − ppl_cpu| / ppl_cpu, for
  the whole and the streamed placement.

Precision and the tolerance expected. Everything runs in float32 (``--dtype float32``, the
steps' default float32 products) except the ``dtype=bfloat16`` row. TF32 is switched off for
cuBLAS and cuDNN (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``,
``float32_matmul_precision("highest")``) and the settings are recorded in the JSON: with TF32 a
float32 product keeps 10 mantissa bits, errors of about 1e-3 relative, which would swamp what
is checked here. What remains between the devices is the order of the reductions (cuBLAS and
the CPU's BLAS sum a dot product's terms in different orders and blockings; torch's CUDA and
CPU reductions, the Cholesky factorisations and SVDs differ too), about 1e-7 relative per product
in float32. Hence:

* data-free recipes (fp16, RTN on integer and MX grids): the grid fit and the rounding are
  elementwise, correctly rounded on both devices, so the codes should be identical
  (expected share on the same grid point 1; allowed ≥ 0.999) and the perplexities equal to
  float32 forward-pass rounding (relative difference ≤ 1e-3, activation quantization included,
  where one rounding flip of an activation moves a logit);
* calibrated recipes (GPTQ, AWQ, SmoothQuant, MagR, LQER/L2QER, DWR): the statistics (Gram
  matrices, activation maxima) differ at 1e-7 relative; an entry at a rounding boundary then
  lands on the other grid point, and GPTQ propagates that entry's error along its row, so a few
  per cent of the codes may differ (``benchmarks/README.md``: 1.6 % when only the precision of
  GPTQ's inverse-Hessian factor changes on one CPU); allowed ≥ 0.9 on the same grid point and a
  perplexity within 1e-2 relative (DWR may choose another rank where two candidates score
  within rounding: allowed ≥ 0.8 on the same grid point);
* bfloat16 (calibration and evaluation): 8 mantissa bits and different kernels on the two
  devices; allowed ≥ 0.8 on the same grid point and a perplexity within 5e-2.

These bounds are what the reasoning above predicts, not yet measured on a GPU. With
``--allow-cpu-only`` and no GPU the second run is the CPU again, and everything must be identical
(a self-test of the script and of the pipeline's determinism). Rows outside their bounds are
marked in the table and the script exits with status 1 after writing it.

    python benchmarks/gpu_check.py --out DIR                          # CUDA against the CPU
    python benchmarks/gpu_check.py --out DIR --allow-cpu-only         # CPU against CPU (self-test)
    python benchmarks/gpu_check.py --out DIR --allow-cpu-only --size smoke --models llama

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (and prints the table); the models,
artifacts and logs go to a temporary folder (``--work`` to keep them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SIZES = {
    # hidden, intermediate, layers, heads, kv heads; calibration windows x tokens; test windows x tokens
    "default": {"hidden": 128, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2,
                "nsamples": 16, "seqlen": 128, "eval_windows": 8, "eval_seqlen": 128, "paragraphs": 60},
    "smoke": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2,
              "nsamples": 4, "seqlen": 32, "eval_windows": 2, "eval_seqlen": 32, "paragraphs": 20},
}
"""``default`` for the GPU machine; ``smoke`` for the test. Group size 32 and MX blocks of 32
divide every input width of both."""

FAMILIES = ("llama", "mistral", "opt")

RECIPES = {
    "fp16": {"steps": []},
    "rtn@int4-g32": {"steps": ["rtn"], "weight": "int4-g32"},
    "rtn@mxint4_a=mxint8": {"steps": ["rtn"], "weight": "mxint4", "act": "mxint8"},
    "rtn@mxfp4_a=mxfp8": {"steps": ["rtn"], "weight": "mxfp4", "act": "mxfp8"},
    "gptq@int4-g32": {"steps": [{"gptq": {"groups": "reference"}}], "weight": "int4-g32"},
    "gptq-act@int4-g32": {"steps": [{"gptq": {"act_order": True, "groups": "static"}}], "weight": "int4-g32"},
    "gptq@int3": {"steps": [{"gptq": {"true_sequential": True}}], "weight": "int3"},
    "awq+rtn@int4-g32": {"steps": ["awq", "rtn"], "weight": "int4-g32"},
    "sq+rtn@int8_a=int8": {"steps": [{"smoothquant": {"alpha": 0.5}}, "rtn"], "weight": "int8", "act": "int8"},
    "sq+awq+gptq@mxint4_a=mxint8": {"steps": ["smoothquant", "awq", "gptq"], "weight": "mxint4", "act": "mxint8"},
    "magr+gptq@int3-beta0.9": {"steps": [{"magr": {"iterations": 30}}, "gptq"], "weight": "int3-beta0.9"},
    "magr+gptq+cd@int2-beta0.8": {"steps": [{"magr": {"iterations": 30}}, "gptq", {"cd": {"sweeps": 5}}],
                                  "weight": "int2-beta0.8"},
    "lqer-k8@mxint4_a=mxint8": {"steps": ["rtn", {"lqer": {"rank": 8}}], "weight": "mxint4", "act": "mxint8"},
    "l2qer-k8@mxint4_a=mxint8": {"steps": ["rtn", {"l2qer": {"rank": 8}}], "weight": "mxint4", "act": "mxint8"},
    "gptq+dwr@int3": {"base": "gptq@int3", "dwr": {"space": "svd", "ranks": [4, 8, 16], "windows": 2}},
}
"""The recipes checked, as config entries (``config/config.yaml``'s syntax), sized for the tiny models."""


@dataclass(frozen=True)
class Row:
    """One line of the check: a recipe, run with these quantize/eval options on both devices."""

    recipe: str
    dtype: str = "float32"
    offload: str = "device"

    @property
    def label(self) -> str:
        extra = [f"dtype={self.dtype}"] * (self.dtype != "float32") + [f"offload={self.offload}"] * (self.offload != "device")
        return " ".join([self.recipe, *extra])

    @property
    def kind(self) -> str:
        """Which tolerance applies (``TOLERANCES``)."""
        if self.dtype != "float32":
            return "bfloat16"
        if "base" in RECIPES[self.recipe]:
            return "search"
        steps = [step if isinstance(step, str) else next(iter(step)) for step in RECIPES[self.recipe]["steps"]]
        return "data-free" if set(steps) <= {"rtn"} else "calibrated"


ROWS = [Row(name) for name in RECIPES] + [Row("gptq@int4-g32", offload="cpu"), Row("gptq@int4-g32", dtype="bfloat16")]

TOLERANCES = {
    "data-free": {"same_grid": 0.999, "ppl_rel": 1e-3},
    "calibrated": {"same_grid": 0.9, "ppl_rel": 1e-2},
    "search": {"same_grid": 0.8, "ppl_rel": 1e-2},
    "bfloat16": {"same_grid": 0.8, "ppl_rel": 5e-2},
}
"""CUDA against CPU: the least share of codes on the same grid point and the largest relative
perplexity difference per kind of row (reasons in the module's docstring). CPU against CPU:
everything identical."""

EXACT = {"same_grid": 1.0, "ppl_rel": 0.0}

WORDS = ("the a of quantized weight grid scale error column row group channel token window corpus river "
         "mountain city history music language science king people north south early later small large "
         "first second known called model layer matrix value point block search rank").split()


def synthetic_text(rng: random.Random, paragraphs: int) -> str:
    """Pseudo-prose of sentences drawn from ``WORDS`` (the corpus the tokenizer and windows come from)."""
    lines = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        lines.append(" ".join(sentences))
    return "\n".join(lines)


def write_corpus(folder: Path, paragraphs: int) -> Path:
    """A local corpus (train/validation/test JSONL documents, as ``prepare-corpus`` reads them)."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for split, documents in {"train": 40, "validation": 4, "test": 8}.items():
        with open(folder / f"{split}.jsonl", "w") as handle:
            for _ in range(documents):
                handle.write(json.dumps({"text": synthetic_text(rng, paragraphs // 4 + 2)}) + "\n")
    return folder


def train_tokenizer(corpus: Path):
    """A byte-level BPE of 320 tokens trained on the corpus's train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def build_model(family: str, vocab: int, size: dict):
    """A random-initialised model of ``family`` (seeded), its matrices scaled by 8 so that the layers
    shape the predictions (at the default init the logits are near uniform). Mistral is saved in
    bfloat16 (the half-precision checkpoint a real model is), the others in float32."""
    import transformers

    torch.manual_seed(FAMILIES.index(family))
    common = {"vocab_size": vocab, "hidden_size": size["hidden"], "num_hidden_layers": size["layers"],
              "num_attention_heads": size["heads"], "max_position_embeddings": 512}
    if family == "opt":
        config = transformers.OPTConfig(**common, ffn_dim=size["intermediate"], word_embed_proj_dim=size["hidden"],
                                        pad_token_id=0, bos_token_id=0, eos_token_id=0)
        model = transformers.OPTForCausalLM(config)
    else:
        config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                     "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
        config = config_class(**common, intermediate_size=size["intermediate"], num_key_value_heads=size["kv_heads"],
                              tie_word_embeddings=family == "llama", rms_norm_eps=1e-5)
        model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(8.0)
    return model.to(torch.bfloat16 if family == "mistral" else torch.float32).eval()


class Runner:
    """Runs ``ptqrepro`` subcommands in this process (``ptqrepro.cli.main``), each one's output into
    its own log file; a failure stops the check with the command and the log's last line."""

    def __init__(self, logs: Path, threads: int | None):
        self.logs = logs
        self.threads = threads
        self.count = 0

    def __call__(self, *arguments: str) -> float:
        from ptqrepro.cli import main

        self.count += 1
        log = self.logs / f"{self.count:04d}-{arguments[0]}.log"
        threads = ["--threads", str(self.threads)] if self.threads and arguments[0] in {"quantize", "dwr", "eval-ppl"} else []
        started = time.perf_counter()
        with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            code = main([*arguments, *threads])
        seconds = time.perf_counter() - started
        if code != 0:
            last = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"gpu_check: `ptqrepro {' '.join(arguments)}` failed: {last}")
        return seconds


def prepare(work: Path, run: Runner, families: tuple[str, ...], size: dict) -> dict[str, Path]:
    """The prepared corpus, and per family its prepared model and calibration windows (seed 0)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    corpus = write_corpus(work / "corpus-source", size["paragraphs"])
    tokenizer = train_tokenizer(corpus)
    run("prepare-corpus", "--name", "synthetic", "--spec", json.dumps({"source": "local", "path": str(corpus)}),
        "--out", str(work / "corpus"))
    prepared = {}
    for family in families:
        source = work / "source" / family
        build_model(family, len(tokenizer), size).save_pretrained(source)
        tokenizer.save_pretrained(source)
        run("prepare-model", "--name", f"tiny-{family}", "--spec", json.dumps({"hub": str(source)}),
            "--out", str(work / "models" / family))
        run("calibrate", "--model", str(work / "models" / family), "--corpus", str(work / "corpus"),
            "--nsamples", str(size["nsamples"]), "--seqlen", str(size["seqlen"]), "--out", str(work / "calib" / f"{family}.pt"))
        prepared[family] = work / "models" / family
    return prepared


def selected_rows(recipes: list[str] | None) -> list[Row]:
    """The rows of the named recipes (all rows when None); a DWR recipe brings its base along."""
    if recipes is None:
        return ROWS
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise SystemExit(f"gpu_check: unknown recipe(s) {', '.join(sorted(unknown))} (known: {', '.join(RECIPES)})")
    wanted = set(recipes) | {RECIPES[name]["base"] for name in recipes if "base" in RECIPES[name]}
    return [row for row in ROWS if row.recipe in wanted]


def quantize_all(work: Path, run: Runner, family: str, device: str, device_name: str, rows: list[Row]) -> dict[str, dict]:
    """Each row's artifact of ``family`` on ``device`` (DWR after its base): {label: {artifact, seconds, dwr}},
    ``dwr`` the rank each block chose (DWR rows only)."""
    model, calibration = work / "models" / family, work / "calib" / f"{family}.pt"
    done = {}
    for row in sorted(rows, key=lambda r: "base" in RECIPES[r.recipe]):
        folder = work / "quantized" / family / device_name / row.label.replace(" ", "_")
        common = ["--model", str(model), "--calibration", str(calibration), "--recipe", row.recipe,
                  "--spec", json.dumps(RECIPES[row.recipe]), "--device", device, "--dtype", row.dtype,
                  "--offload", row.offload, "--batch-size", "4", "--out", str(folder), "--metrics", f"{folder}.json"]
        if "base" in RECIPES[row.recipe]:
            base = done[Row(RECIPES[row.recipe]["base"], row.dtype, row.offload).label]["artifact"]
            seconds = run("dwr", "--base", str(base), *common)
        else:
            seconds = run("quantize", *common)
        chosen = [block["chosen_rank"] for block in json.loads(Path(f"{folder}.json").read_text()).get("dwr", [])]
        done[row.label] = {"artifact": folder, "seconds": seconds, "dwr": chosen or None}
    return done


def perplexity(work: Path, run: Runner, family: str, row: Row, artifact: Path, device: str, placement: str,
               size: dict) -> float:
    out = work / "ppl" / f"{artifact.parent.name}-{family}-{artifact.name}-{device}-{placement}.json"
    run("eval-ppl", "--model", str(work / "models" / family), "--quantized", str(artifact), "--corpus", str(work / "corpus"),
        "--seqlen", str(size["eval_seqlen"]), "--max-windows", str(size["eval_windows"]), "--batch-size", "4",
        "--dtype", row.dtype, "--device", device, "--placement", placement, "--out", str(out))
    return json.loads(out.read_text())["metrics"]["ppl"]


def artifact_differences(a: Path, b: Path) -> dict:
    """Max |ΔW| of the dequantized weights, of the low-rank terms and of the float parameters, and
    the share of weight codes that are equal, between two artifacts of the same recipe."""
    from ptqrepro.export.artifact import load_artifact

    first, second = load_artifact(a), load_artifact(b)
    if set(first.quantized) != set(second.quantized) or set(first.corrections) != set(second.corrections):
        raise SystemExit(f"gpu_check: {a} and {b} quantize different linears")
    weight, same, total, largest = 0.0, 0, 0, 0.0
    for name, quantized in first.quantized.items():
        other = second.quantized[name]
        values = quantized.dequantize()
        weight = max(weight, float((values - other.dequantize()).abs().max()))
        largest = max(largest, float(values.abs().max()))
        same += int((quantized.codes == other.codes).sum())
        total += quantized.codes.numel()
    lowrank = max((float((term.weight_delta() - second.corrections[name].weight_delta()).abs().max())
                   for name, term in first.corrections.items()), default=None)
    parameters = max((float((value.float() - second.float_parameters[name].float()).abs().max())
                      for name, value in first.float_parameters.items()), default=None)
    return {"max_abs_weight_diff": weight, "max_abs_weight": largest, "same_grid_share": same / total if total else 1.0,
            "max_abs_lowrank_diff": lowrank, "max_abs_float_parameter_diff": parameters}


def within(row: dict, bounds: dict) -> bool:
    """Whether a row's codes and perplexities are inside ``bounds`` (identical where they are exact,
    DWR's chosen ranks included)."""
    rel = [row["ppl_rel_diff_whole"], row["ppl_rel_diff_layers"]]
    if bounds is EXACT:
        return (row["same_grid_share"] == 1.0 and row["max_abs_weight_diff"] == 0.0 and max(rel) == 0.0
                and not row["max_abs_lowrank_diff"] and not row["max_abs_float_parameter_diff"]
                and row["dwr_ranks_cpu"] == row["dwr_ranks_second"])
    return row["same_grid_share"] >= bounds["same_grid"] and max(rel) <= bounds["ppl_rel"]


def compare(work: Path, run: Runner, family: str, second: str, size: dict, selected: list[Row]) -> list[dict]:
    """The ``selected`` rows of ``family``: quantized and evaluated on the CPU and on ``second``, compared."""
    second_name = "cpu-again" if second == "cpu" else second
    artifacts = {"cpu": quantize_all(work, run, family, "cpu", "cpu", selected),
                 second_name: quantize_all(work, run, family, second, second_name, selected)}
    rows = []
    for row in selected:
        a, b = artifacts["cpu"][row.label], artifacts[second_name][row.label]
        ppl_cpu = perplexity(work, run, family, row, a["artifact"], "cpu", "whole", size)
        ppl_whole = perplexity(work, run, family, row, b["artifact"], second, "whole", size)
        ppl_layers = perplexity(work, run, family, row, b["artifact"], second, "layers", size)
        result = {"model": family, "recipe": row.label, "kind": row.kind, **artifact_differences(a["artifact"], b["artifact"]),
                  "ppl_cpu": ppl_cpu, "ppl_second_whole": ppl_whole, "ppl_second_layers": ppl_layers,
                  "ppl_rel_diff_whole": abs(ppl_whole - ppl_cpu) / ppl_cpu,
                  "ppl_rel_diff_layers": abs(ppl_layers - ppl_cpu) / ppl_cpu,
                  "quantize_s_cpu": round(a["seconds"], 3), "quantize_s_second": round(b["seconds"], 3),
                  "dwr_ranks_cpu": a["dwr"], "dwr_ranks_second": b["dwr"]}
        bounds = EXACT if second == "cpu" else TOLERANCES[row.kind]
        result["within_tolerance"] = within(result, bounds)
        rows.append(result)
        print(f"  {family:8s} {row.label:36s} same grid {result['same_grid_share']:.4f}  "
              f"ppl {ppl_cpu:.4f} / {ppl_whole:.4f} / {ppl_layers:.4f}", flush=True)
    return rows


def _number(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def markdown(report: dict) -> str:
    second = report["second_device"]
    lines = [
        f"# GPU check: {second} against cpu",
        "",
        f"{report['environment']['device_name']}; torch {report['environment']['torch']}; "
        f"TF32 matmul {report['environment']['tf32_matmul']}, cuDNN TF32 {report['environment']['tf32_cudnn']}, "
        f"float32 matmul precision {report['environment']['float32_matmul_precision']}; size {report['size']}; "
        f"{report['wall_time_s']:.0f} s.",
        "",
        f"| model | recipe | max abs ΔW | max abs W | same grid point | max abs Δ low-rank | max abs Δ norms "
        f"| ppl cpu | ppl {second} whole | ppl {second} layers | rel. diff whole | rel. diff layers "
        f"| quantize s cpu / {second} | within tolerance |",
        "|" + "---|" * 14,
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | `{row['recipe']}` | {_number(row['max_abs_weight_diff'])} | {_number(row['max_abs_weight'])} "
            f"| {row['same_grid_share']:.4f} | {_number(row['max_abs_lowrank_diff'])} "
            f"| {_number(row['max_abs_float_parameter_diff'])} | {row['ppl_cpu']:.4f} | {row['ppl_second_whole']:.4f} "
            f"| {row['ppl_second_layers']:.4f} | {_number(row['ppl_rel_diff_whole'])} | {_number(row['ppl_rel_diff_layers'])} "
            f"| {row['quantize_s_cpu']:.1f} / {row['quantize_s_second']:.1f} | {'yes' if row['within_tolerance'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def precision_settings() -> dict:
    """Switch TF32 off (cuBLAS and cuDNN) and say what the float32 products run as."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def offline_environment(work: Path) -> None:
    """Hugging Face caches inside the work folder, and no network."""
    for variable, value in {"HF_HOME": work / "hf", "HF_DATASETS_CACHE": work / "hf" / "datasets"}.items():
        os.environ[variable] = str(value)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[variable] = "1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--allow-cpu-only", action="store_true", help="without CUDA, compare the CPU with itself")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--recipes", nargs="+", help="only these recipes of RECIPES (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads of each job (default: torch's)")
    parser.add_argument("--work", help="keep the models, artifacts and logs in this folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    selected = selected_rows(args.recipes)
    second = "cuda" if torch.cuda.is_available() else "cpu"
    if second == "cpu" and not args.allow_cpu_only:
        print(f"gpu_check: CUDA is not available (torch {torch.__version__} sees no GPU); "
              "--allow-cpu-only compares the CPU with itself", file=sys.stderr)
        return 1
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    offline_environment(work)
    environment = {"torch": torch.__version__, "cuda": torch.version.cuda, **precision_settings(),
                   "device_name": torch.cuda.get_device_name() if second == "cuda" else "no GPU: cpu against cpu"}
    size = SIZES[args.size]
    run = Runner(work / "logs", args.threads)
    try:
        prepare(work, run, tuple(args.models), size)
        rows = [row for family in args.models for row in compare(work, run, family, second, size, selected)]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report = {"second_device": second, "size": args.size, "settings": size, "environment": environment,
              "tolerances": {"cpu": EXACT} if second == "cpu" else TOLERANCES,
              "recipes": RECIPES, "rows": rows, "wall_time_s": round(time.perf_counter() - started, 1)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    outside = [f"{row['model']} {row['recipe']}" for row in rows if not row["within_tolerance"]]
    if outside:
        print(f"gpu_check: {len(outside)} row(s) outside the expected tolerance: {', '.join(outside)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
