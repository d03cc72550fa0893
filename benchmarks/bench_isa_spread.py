"""How far a calibrated recipe's perplexity moves when the CPU's kernels change, per calibration
dtype: a stand-in, on one machine, for running the same code on another CPU type.

Two CPUs differ in the kernels their libraries pick, not in the code: oneDNN computes bfloat16
products with AMX tiles on an Intel Xeon and with AVX-512 BF16 dot products on an AMD EPYC, and MKL
takes another code path on Intel than elsewhere. Each kernel sums in its own order, so the last bits
differ, and GPTQ turns a last-bit difference into other codes. The libraries can be told to use
narrower instruction sets by environment variables, which changes their blocking and summation
order the same way; ``ISA_SETTINGS`` lists the ones tried.

Part ``kernels``: which variable changes the bits of which operation in this torch build (a bf16
and a float32 product, the Gram matrix as ``statistics.add_gram_syrk`` and ``add_gram_blocks``
compute it, a Cholesky factor, bf16 and float32 SDPA, a bf16 RMS norm), each setting in a fresh
process on the same inputs. A cell is the first 10 hex digits of the SHA-1 of the result's bytes.

Part ``model``: for each recipe, calibration seed, calibration dtype and setting of
``--settings``, one ``ptqrepro quantize`` run under that setting's variables (the command the
Snakefile runs: 10 windows of 512 tokens in batches of 5, one thread); every distinct artifact
(SHA-256 of its tensor files) is then scored by ``ptqrepro eval-ppl`` under the native kernels and
``--eval-dtype`` (the default's 24 windows of wiki-mini), so that only the calibration's arithmetic
varies. Reported per recipe, dtype and seed: the perplexity under each setting, the largest
|delta ppl| between settings and the largest per-window NLL delta; and the quantize wall time per
dtype. Finally one artifact (the first recipe, seed and dtype under the native kernels) is scored
under every setting and in float32, which measures the evaluation's own contribution.

Every result is written to ``--out`` and reused when the script runs again (it resumes).

    python benchmarks/bench_isa_spread.py --part kernels
    python benchmarks/bench_isa_spread.py --part model --model results/models/smollm2-135m \\
        --corpus results/corpora/wiki-mini --out results/bench_isa_spread
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ISA_SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    # oneDNN's bf16 GEMM without AVX-512 BF16 dot products (bf16 converted and multiplied in
    # float32 FMA, other blocking): the stand-in for another CPU's bf16 kernel (AMX)
    "onednn-avx512core": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    # MKL's conditional numerical reproducibility, compatible branch: other float32 GEMM/LAPACK
    # kernels (MKL picks another code path on an Intel CPU than here)
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "onednn-avx512core+mkl-compatible": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "COMPATIBLE"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "openblas-haswell": {"OPENBLAS_CORETYPE": "Haswell"},
    "openblas-sapphirerapids": {"OPENBLAS_CORETYPE": "SapphireRapids"},
}
MODEL_SETTINGS = ("native", "onednn-avx512core", "onednn-avx512core+mkl-compatible")

CALIBRATION = {"nsamples": 10, "seqlen": 512, "batch_size": 5}
EVALUATION = {"seqlen": 512, "max_windows": 24, "nsamples": 256, "seed": 0, "batch_size": 4}


def kernel_hashes() -> dict[str, str]:
    """The operations of a calibration pass and of GPTQ on fixed inputs (NumPy's generator, so
    that torch's own vectorised sampling cannot change them), one thread."""
    import numpy as np
    import torch
    from torch.nn import functional

    from ptqrepro.layerwise.statistics import add_gram_blocks, add_gram_syrk

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    def randn(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    def digest(tensor) -> str:
        return hashlib.sha1(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()[:10]

    x, w = randn(2560, 576), randn(1536, 576)
    q, k, v = randn(1, 9, 512, 64), randn(1, 3, 512, 64), randn(1, 3, 512, 64)
    x_bf16 = x.bfloat16()
    x64 = x_bf16.double()
    spd = (x64.T @ x64 + 100 * torch.eye(576, dtype=torch.float64)).float()
    gram_syrk, gram_blocks = torch.zeros(576, 576), torch.zeros(576, 576)
    add_gram_syrk(gram_syrk, x_bf16.float())
    add_gram_blocks(gram_blocks, x_bf16.float())
    return {
        "bf16 linear": digest(functional.linear(x_bf16, w.bfloat16())),
        "f32 linear": digest(functional.linear(x, w)),
        "gram ssyrk (SciPy)": digest(gram_syrk),
        "gram addmm (torch)": digest(gram_blocks),
        "f32 cholesky": digest(torch.linalg.cholesky(spd)),
        "bf16 sdpa": digest(functional.scaled_dot_product_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True, enable_gqa=True)),
        "f32 sdpa": digest(functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        "bf16 rms norm": digest(x_bf16 * torch.rsqrt(x_bf16.pow(2).mean(-1, keepdim=True) + 1e-5)),
    }


def environment(setting: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in {
        variable for variables in ISA_SETTINGS.values() for variable in variables}}
    env.update(ISA_SETTINGS[setting])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def part_kernels() -> None:
    rows = {}
    for setting in ISA_SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--kernel-hashes"], env=environment(setting),
                             check=True, capture_output=True, text=True).stdout
        rows[setting] = json.loads(out)
    native = rows["native"]
    operations = list(native)
    print("| setting | " + " | ".join(operations) + " |")
    print("|---|" + "---|" * len(operations))
    for setting, row in rows.items():
        cells = [row[op] if setting == "native" else ("same" if row[op] == native[op] else "**differs**")
                 for op in operations]
        print(f"| {setting} | " + " | ".join(cells) + " |")


def run(command: list[str], setting: str, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(["nice", "-n", "10", *command], env=environment(setting), check=True,
                       stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def artifact_digest(directory: Path) -> str:
    """SHA-256 over the artifact's tensor files (the manifest also records times and the machine)."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def recipe_spec(config_path: Path, recipe: str) -> dict:
    import yaml

    from ptqrepro.checks.config import recipe_job_spec

    return recipe_job_spec(yaml.safe_load(config_path.read_text()), recipe)


def evaluate(args, artifact: Path, setting: str, dtype: str, out: Path) -> dict:
    if not out.exists():
        run(["ptqrepro", "eval-ppl", "--model", str(args.model), "--quantized", str(artifact), "--corpus", str(args.corpus),
             "--seqlen", str(EVALUATION["seqlen"]), "--max-windows", str(EVALUATION["max_windows"]),
             "--nsamples", str(EVALUATION["nsamples"]), "--seed", str(EVALUATION["seed"]), "--tokenizer", "fast",
             "--batch-size", str(EVALUATION["batch_size"]), "--dtype", dtype, "--device", "cpu",
             "--placement", "whole", "--threads", "1", "--out", str(out)], setting, out.with_suffix(".log"))
    result = json.loads(out.read_text())
    return {"ppl": result["metrics"]["ppl"], "window_nll": result["window_nll"]}


def part_model(args) -> None:
    out = args.out
    calibrations = {}
    for seed in args.seeds:
        path = out / "calibration" / f"s{seed}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            run(["ptqrepro", "calibrate", "--model", str(args.model), "--corpus", str(args.corpus),
                 "--nsamples", str(CALIBRATION["nsamples"]), "--seqlen", str(CALIBRATION["seqlen"]),
                 "--seed", str(seed), "--tokenizer", "fast", "--out", str(path)], "native", path.with_suffix(".log"))
        calibrations[seed] = path

    runs = []
    for recipe, seed, dtype, setting in itertools.product(args.recipes, args.seeds, args.dtypes, args.settings):
        directory = out / "quantized" / recipe / dtype / setting / f"s{seed}"
        record_path = directory.parent / f"s{seed}.json"
        if not record_path.exists():
            directory.parent.mkdir(parents=True, exist_ok=True)
            wall = run(["ptqrepro", "quantize", "--model", str(args.model), "--calibration", str(calibrations[seed]),
                        "--batch-size", str(CALIBRATION["batch_size"]), "--dtype", dtype, "--recipe", recipe,
                        "--spec", json.dumps(recipe_spec(args.config, recipe)), "--device", "cpu",
                        "--offload", "device", "--threads", "1", "--out", str(directory),
                        "--metrics", str(directory.parent / f"s{seed}.quantize.json")],
                       setting, directory.parent / f"s{seed}.log")
            metrics = json.loads((directory.parent / f"s{seed}.quantize.json").read_text())
            record_path.write_text(json.dumps({"wall_s": wall, "quantize_time_s": metrics["metrics"]["quantize_time_s"]
                                               if "metrics" in metrics else metrics.get("quantize_time_s"),
                                               "artifact_sha256": artifact_digest(directory)}))
        record = json.loads(record_path.read_text())
        runs.append({"recipe": recipe, "seed": seed, "dtype": dtype, "setting": setting, "directory": directory, **record})

    scores = {}
    for entry in runs:
        if entry["artifact_sha256"] not in scores:
            target = out / "ppl" / f"{entry['artifact_sha256'][:16]}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            scores[entry["artifact_sha256"]] = evaluate(args, entry["directory"], "native", args.eval_dtype, target)
        entry.update(scores[entry["artifact_sha256"]])

    print(f"Calibration under each setting; evaluation native, {args.eval_dtype}, {EVALUATION['max_windows']} windows.\n")
    print("| recipe | calibration dtype | seed | " + " | ".join(f"ppl {s}" for s in args.settings)
          + " | distinct artifacts | max abs delta ppl | max window NLL delta |")
    print("|---|---|---|" + "---|" * len(args.settings) + "---|---|---|")
    for recipe, dtype, seed in itertools.product(args.recipes, args.dtypes, args.seeds):
        group = [e for e in runs if (e["recipe"], e["dtype"], e["seed"]) == (recipe, dtype, seed)]
        ppls = [e["ppl"] for e in group]
        window_delta = max(abs(a - b) for e, f in itertools.combinations(group, 2)
                           for a, b in zip(e["window_nll"], f["window_nll"])) if len(group) > 1 else 0.0
        print(f"| {recipe} | {dtype} | {seed} | " + " | ".join(f"{p:.4f}" for p in ppls)
              + f" | {len({e['artifact_sha256'] for e in group})} | {max(ppls) - min(ppls):.4f}"
              f" ({(max(ppls) - min(ppls)) / min(ppls) * 100:.2f} %) | {window_delta:.4f} |")

    print("\n| recipe | calibration dtype | quantize wall time, mean (s) | min-max (s) | runs |")
    print("|---|---|---|---|---|")
    for recipe, dtype in itertools.product(args.recipes, args.dtypes):
        times = [e["quantize_time_s"] for e in runs if (e["recipe"], e["dtype"]) == (recipe, dtype)]
        print(f"| {recipe} | {dtype} | {sum(times) / len(times):.1f} | {min(times):.1f}-{max(times):.1f} | {len(times)} |")

    first = next(e for e in runs if e["setting"] == "native")
    print(f"\nEvaluation under each setting: {first['recipe']} s{first['seed']}, calibrated in {first['dtype']} natively.\n")
    print("| evaluation setting | dtype | ppl | delta ppl vs native | max window NLL delta |")
    print("|---|---|---|---|---|")
    base = first
    for setting, dtype in [*((s, args.eval_dtype) for s in args.settings), ("native", "float32")]:
        target = out / "ppl-eval" / f"{first['artifact_sha256'][:16]}-{setting}-{dtype}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        native = (setting, dtype) == ("native", args.eval_dtype)
        score = base if native else evaluate(args, first["directory"], setting, dtype, target)
        delta = max(abs(a - b) for a, b in zip(score["window_nll"], base["window_nll"]))
        print(f"| {setting} | {dtype} | {score['ppl']:.4f} | {score['ppl'] - base['ppl']:+.4f} | {delta:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("kernels", "model"), default="kernels")
    parser.add_argument("--kernel-hashes", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=Path("results/models/smollm2-135m"))
    parser.add_argument("--corpus", type=Path, default=Path("results/corpora/wiki-mini"))
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--out", type=Path, default=Path("results/bench_isa_spread"))
    parser.add_argument("--recipes", nargs="+", default=["gptq@int4-g64"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--settings", nargs="+", default=list(MODEL_SETTINGS), choices=list(ISA_SETTINGS))
    parser.add_argument("--eval-dtype", default="bfloat16")
    args = parser.parse_args()
    if args.kernel_hashes:
        print(json.dumps(kernel_hashes()))
    elif args.part == "kernels":
        part_kernels()
    else:
        part_model(args)


if __name__ == "__main__":
    main()
