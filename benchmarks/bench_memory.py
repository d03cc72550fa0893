"""Memory of the layer-by-layer pipeline: one quantize job on SmolLM2-135M against the model's size,
the per-layer quantities behind it, and from them the projection to LLaMA-2-70B on one 80 GB A100.

1. The job: ``ptqrepro quantize`` (GPTQ, int4-g64) as a subprocess, once per place for the
   calibration activations (``--offload device`` and ``cpu``; once without CUDA, where the two are
   the same). Its peak RSS (``ru_maxrss``) and peak CUDA memory come from its result's provenance;
   a sampler reads the job's ``/proc/<pid>/status`` every 20 ms for the peaks of its private memory
   (RssAnon) and of its resident file pages (RssFile: the memory-mapped model being read).
2. One decoder layer, in a subprocess whose allocator gives every allocation of 64 KiB or more its
   own mapping, returned on free (``MALLOC_MMAP_THRESHOLD_``), so that resident memory follows the
   live tensors. Sizes: layer 0's weights as the pipeline holds them, its calibration activations,
   its Gram matrices. Peaks above what was there before (CUDA: ``max_memory_allocated``; CPU: the
   high-water mark ``VmHWM`` after resetting it through ``/proc/self/clear_refs``): the statistics
   pass, GPTQ on each linear, and the whole job cut to its first layer (capture, statistics, GPTQ,
   the next layer's inputs). GPTQ's working set is also measured on LLaMA-7B's shapes (the
   synthetic Gram matrices of ``bench_gptq.py``), and fitted there as ``a·4·in² + b·out·in`` bytes.
3. The projection: each per-layer quantity scaled to LLaMA-2-70B (80 layers, hidden 8192,
   intermediate 28672, 8 kv heads of 128, vocabulary 32000) with the papers' calibration
   (128 windows of 2048 tokens, batches of 8) by how it grows, per phase of a layer's step; and the
   host memory of the lazy load.

    python benchmarks/bench_memory.py                # about 15 minutes on 2 busy cores
    python benchmarks/bench_memory.py --part layer   # parts 2 and 3 only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "results" / "models" / "smollm2-135m"
CALIBRATION = REPO / "results" / "calibration" / "smollm2-135m" / "wiki-mini-n16-l512-s0.pt"
FORMAT = "int4-g64"
"""GPTQ's format here (SmolLM2's hidden size 576 is not a multiple of 128)."""
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
LLAMA7B_CASE = "LLaMA-7B shape, synthetic Gram"
THREADS = 2
MIB = 2**20
GB = 1e9

LLAMA2_70B = {"layers": 80, "hidden": 8192, "intermediate": 28672, "kv_heads": 8, "head_dim": 128,
              "vocab": 32000, "nsamples": 128, "seqlen": 2048, "batch_size": 8, "group": 128}
"""LLaMA-2-70B's shapes and the papers' calibration (config/papers/*.yaml: 128 x 2048, batches of 8)."""


def status_mib() -> dict[str, float]:
    """This process's resident memory (VmRSS), its high-water mark (VmHWM), private and file pages."""
    return read_status(Path("/proc/self/status"))


def read_status(path: Path) -> dict[str, float]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(value.split()[0]) / 1024
    return values


class Peak:
    """The peak memory (bytes) a block adds on ``device`` above what was there when it started:
    CUDA's ``max_memory_allocated``, or on the CPU the resident high-water mark, reset through
    ``/proc/self/clear_refs`` (Linux)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.bytes = 0

    def __enter__(self) -> "Peak":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = status_mib()["VmRSS"] * MIB
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = status_mib()["VmHWM"] * MIB - self.start


def nbytes(tensors) -> int:
    """Bytes of distinct tensors (shared ones once)."""
    unique = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in unique.values())


# -- part 1: the job ------------------------------------------------------------------------------


def run_job(offload: str, device: str, folder: Path) -> dict:
    """One ``ptqrepro quantize`` job, its result's provenance and the sampled peaks of its memory."""
    metrics = folder / f"quantize-{offload}.json"
    command = [sys.executable, "-m", "ptqrepro.cli", "quantize", "--model", str(MODEL), "--calibration", str(CALIBRATION),
               "--recipe", f"gptq@{FORMAT}", "--spec", json.dumps({"steps": ["gptq"], "weight": FORMAT}),
               "--device", device, "--offload", offload, "--threads", str(THREADS),
               "--out", str(folder / f"artifact-{offload}"), "--metrics", str(metrics)]
    started = time.perf_counter()
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}

    def sample() -> None:
        while job.poll() is None:
            try:
                now = read_status(Path(f"/proc/{job.pid}/status"))
            except (OSError, ValueError):
                break
            for key in peaks:
                peaks[key] = max(peaks[key], now.get(key, 0.0))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, errors = job.communicate()
    sampler.join()
    if job.returncode:
        raise RuntimeError(f"quantize job failed:\n{errors[-3000:]}")
    provenance = json.loads(metrics.read_text())["provenance"]
    return {"offload": offload, "device": provenance["device"], "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mib": provenance["peak_rss_mb"], "peak_cuda_mib": provenance["peak_cuda_mb"],
            "peak_anon_mib": round(peaks["RssAnon"], 1), "peak_file_mib": round(peaks["RssFile"], 1),
            "artifact_mib": round((folder / f"artifact-{offload}" / "quantized.safetensors").stat().st_size / MIB, 1)}


def model_config() -> dict:
    return json.loads((MODEL / "config.json").read_text())


def model_size() -> dict:
    """The prepared model's file and parameter count, from its manifest and config."""
    config = model_config()
    return {"file_mib": round((MODEL / "model.safetensors").stat().st_size / MIB, 1),
            "parameters": json.loads((MODEL / "model.json").read_text())["parameters"],
            "dtype": config.get("dtype") or config.get("torch_dtype"),
            "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "intermediate": config["intermediate_size"], "vocab": config["vocab_size"]}


# -- part 2: one layer (run in a child process) ----------------------------------------------------


def measure_layer(device: str, batch_size: int) -> dict:
    """Sizes and peaks of decoder layer 0 (see the module docstring, part 2)."""
    from bench_gptq import make_case
    from torch import nn

    from ptqrepro.formats import parse_format
    from ptqrepro.methods.gptq import gptq
    from ptqrepro.models.adapters import architecture_of, decoder_layers, layer_linears
    from ptqrepro.models.sources import compute_dtype, load_model, torch_dtype
    from ptqrepro.layerwise.pipeline import capture_layer_inputs, observe, quantize_model
    from ptqrepro.layerwise.placement import fetch
    from ptqrepro.recipe.recipes import recipe_from_config
    from ptqrepro.layerwise.statistics import collect_input_statistics

    torch.set_num_threads(THREADS)
    runtime = status_mib()
    model, _ = load_model(MODEL, "auto")
    loaded = status_mib()
    arch = architecture_of(model)
    layers = decoder_layers(model, arch)
    data = torch.load(CALIBRATION)["input_ids"]
    dtype_name = compute_dtype("auto", device)
    dtype = torch_dtype(dtype_name)
    fmt = parse_format(FORMAT)

    inputs = capture_layer_inputs(model, arch, data, device, batch_size, dtype)
    layer = layers[0]
    fetch(layer, device)
    linears = layer_linears(layer, arch)
    collect_input_statistics(lambda: observe(layer, inputs), linears, True)  # first-use allocations out of the peak
    with Peak(device) as statistics_peak:
        stats = collect_input_statistics(lambda: observe(layer, inputs), linears, True)
    gptq_runs = []
    for name, linear in linears.items():
        with Peak(device) as peak:
            gptq(linear.weight.data, stats[name].gram, fmt)
        gptq_runs.append({"case": f"SmolLM2 {name.split('.')[-1]}", "out": linear.out_features,
                          "in": linear.in_features, "bytes": peak.bytes})
    sizes = {
        "layer_parameters": sum(p.numel() for p in layer.parameters()),
        "layer_bytes": nbytes(layer.parameters()),
        "linear_parameters": sum(linear.weight.numel() for linear in linears.values()),
        "activation_bytes": nbytes(inputs.hidden),
        "activation_elements": sum(h.numel() for h in inputs.hidden),
        "kwargs_bytes": nbytes(v for kwargs in inputs.kwargs for value in kwargs.values()
                               for v in (value if isinstance(value, tuple) else (value,))),
        "gram_bytes": nbytes(s.gram for s in stats.values()),
        "gram_elements": sum(s.gram.numel() for s in {id(s): s for s in stats.values()}.values()),
        "batch_tokens": int(inputs.hidden[0].shape[0] * inputs.hidden[0].shape[1]),
        "statistics_pass_peak_bytes": statistics_peak.bytes,
    }
    del stats, inputs, linears
    layer.to("cpu")

    model.model.layers = nn.ModuleList([layers[0]])
    recipe = recipe_from_config(f"gptq@{FORMAT}", {"steps": ["gptq"], "weight": FORMAT})
    steps = {}
    for offload in ("device", "cpu") if device.startswith("cuda") else ("device",):
        with Peak(device) as step_peak:
            quantize_model(model, recipe, data, device=device, batch_size=batch_size, dtype=dtype, offload=offload,
                           release_layers=False)
        steps[offload] = step_peak.bytes
    del model, layers

    for out_features, in_features in LLAMA7B_SHAPES:
        case = {key: value.to(device) for key, value in make_case(out_features, in_features).items()}
        with Peak(device) as peak:
            gptq(case["weight"], case["gram"], parse_format("int4-g128"))
        gptq_runs.append({"case": LLAMA7B_CASE, "out": out_features, "in": in_features, "bytes": peak.bytes})
        del case
    config = model_config()
    return {"device": device, "calibration_dtype": dtype_name, "batch_size": batch_size,
            "nsamples": int(data.shape[0]), "seqlen": int(data.shape[1]), "hidden": config["hidden_size"],
            "intermediate": config["intermediate_size"],
            "kv_dim": config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"],
            "runtime_anon_mib": round(runtime["RssAnon"], 1), "after_load_anon_mib": round(loaded["RssAnon"], 1),
            "after_load_file_mib": round(loaded["RssFile"], 1),
            "sizes": sizes, "layer_step_peak_bytes": steps, "gptq": gptq_runs}


def layer_in_child(device: str, batch_size: int, folder: Path) -> dict:
    """``measure_layer`` in a fresh process whose allocator maps every allocation >= 64 KiB."""
    out = folder / "layer.json"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run([sys.executable, __file__, "--child", device, str(batch_size), str(out)], check=True, env=env)
    return json.loads(out.read_text())


# -- part 3: the projection -------------------------------------------------------------------------


def fit_gptq(runs: list[dict]) -> tuple[float, float]:
    """``a, b`` of the working set ``a·4·in² + b·out·in`` (bytes), least squares on the relative
    error of the LLaMA-7B shapes (SmolLM2's small ones carry fixed overheads of the allocator)."""
    runs = [r for r in runs if r["case"] == LLAMA7B_CASE]
    features = torch.tensor([[4.0 * r["in"] ** 2, float(r["out"] * r["in"])] for r in runs], dtype=torch.float64)
    measured = torch.tensor([float(r["bytes"]) for r in runs], dtype=torch.float64)
    solution = torch.linalg.lstsq(features / measured[:, None], torch.ones_like(measured)[:, None]).solution
    return float(solution[0]), float(solution[1])


def layer_shapes(hidden: int, intermediate: int, kv: int) -> dict:
    """A LLaMA decoder layer's linears [out, in] and the inputs of its distinct Gram matrices
    (q/k/v share one, gate/up share one)."""
    linears = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
               "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    return {"linears": linears, "gram_inputs": [hidden, hidden, hidden, intermediate]}


def components(layer: dict, hidden: int, intermediate: int, kv: int, nsamples: int, seqlen: int,
               batch_size: int, group: int) -> dict[str, float]:
    """What one layer's step holds on the device (bytes), for a LLaMA layer of these shapes and this
    calibration, from the per-layer measurements: each measured size divided by its element count
    and multiplied by the new one; the forward working set per token of a batch and channel of
    the intermediate size; GPTQ's working set from its fit, for the linear where it is largest."""
    s = layer["sizes"]
    a, b = fit_gptq(layer["gptq"])
    shapes = layer_shapes(hidden, intermediate, kv)
    linear_parameters = sum(o * i for o, i in shapes["linears"].values())
    forward_per_unit = (s["statistics_pass_peak_bytes"] - s["gram_bytes"]) / (s["batch_tokens"] * layer["intermediate"])
    per_activation = s["activation_bytes"] / s["activation_elements"]
    return {
        "weights": (linear_parameters + 2 * hidden) * s["layer_bytes"] / s["layer_parameters"],
        "activations": nsamples * seqlen * hidden * per_activation,
        "batch": batch_size * seqlen * hidden * per_activation,
        "grams": sum(i * i for i in shapes["gram_inputs"]) * s["gram_bytes"] / s["gram_elements"],
        "forward": batch_size * seqlen * intermediate * forward_per_unit,
        "gptq": max(a * 4 * i * i + b * o * i for o, i in shapes["linears"].values()),
        "copies": 2 * linear_parameters * 4,  # float32 copies of the weights before any step and before the quantizer
        "codes": linear_parameters * (1 + 8 / group),  # uint8 codes, a float32 scale and zero per group
    }


def phases(c: dict[str, float], offload: str = "device") -> dict[str, float]:
    """Peak device memory (bytes) of each phase of one layer's step (``pipeline.quantize_model``):
    the layer W, the activations A (with ``offload="cpu"`` one batch of them), the Gram matrices G,
    a batch's forward working set F, the weight copies C, GPTQ's working set Q, the codes K and one
    batch of outputs O: statistics pass W + A + G + F; quantization W + A + G + C + Q + K; the next
    layer's inputs W + A + O + F."""
    resident = c["activations"] if offload == "device" else c["batch"]
    return {
        "statistics pass": c["weights"] + resident + c["grams"] + c["forward"],
        "quantization (GPTQ)": c["weights"] + resident + c["grams"] + c["copies"] + c["gptq"] + c["codes"],
        "next layer's inputs": c["weights"] + resident + c["batch"] + c["forward"],
    }


def projection(layer: dict) -> dict:
    """LLaMA-2-70B: one layer's step on the device per phase, and the host memory (GB)."""
    m = LLAMA2_70B
    c = components(layer, m["hidden"], m["intermediate"], m["kv_heads"] * m["head_dim"], m["nsamples"], m["seqlen"],
                   m["batch_size"], m["group"])
    linear_parameters = sum(o * i for o, i in layer_shapes(m["hidden"], m["intermediate"],
                                                           m["kv_heads"] * m["head_dim"])["linears"].values())
    return {
        "components_gb": {name: value / GB for name, value in c.items()},
        "phases_gb": {name: value / GB for name, value in phases(c).items()},
        "device_peak_gb": {offload: max(phases(c, offload).values()) / GB for offload in ("device", "cpu")},
        "host_gb": {
            "model file, float16, memory-mapped": (m["layers"] * (linear_parameters + 2 * m["hidden"])
                                                   + 2 * m["vocab"] * m["hidden"]) * 2 / GB,
            "codes and group parameters of all layers": m["layers"] * c["codes"] / GB,
            "activations, offload cpu": c["activations"] / GB,
        },
    }


def smollm2_check(layer: dict) -> float:
    """The peak ``phases`` gives for SmolLM2's own layer and calibration (bytes), to compare with
    the measured peak of the job cut to its first layer."""
    c = components(layer, layer["hidden"], layer["intermediate"], layer["kv_dim"], layer["nsamples"], layer["seqlen"],
                   layer["batch_size"], int(FORMAT.split("-g")[1]))
    return max(phases(c).values())


# -- report -------------------------------------------------------------------------------------------


def report(jobs: list[dict], layer: dict, size: dict) -> str:
    """The measurements and the projection as Markdown."""
    s = layer["sizes"]
    lines = [f"model: {size['parameters']:,} parameters, {size['file_mib']} MiB file ({size['dtype']}), "
             f"{size['layers']} layers; calibration {layer['nsamples']} x {layer['seqlen']} tokens in batches of "
             f"{layer['batch_size']}, forward passes in {layer['calibration_dtype']}", "",
             "| offload | device | wall (s) | peak RSS (MiB) | peak private (MiB) | peak file pages (MiB) | peak CUDA (MiB) | artifact (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {j['offload']} | {j['device']} | {j['wall_s']} | {j['peak_rss_mib']} | {j['peak_anon_mib']} | "
              f"{j['peak_file_mib']} | {j['peak_cuda_mib']} | {j['artifact_mib']} |" for j in jobs]
    lines += ["", f"runtime before loading: {layer['runtime_anon_mib']} MiB private; after load_model: "
              f"{layer['after_load_anon_mib']} MiB private, {layer['after_load_file_mib']} MiB file pages", "",
              "| one layer (SmolLM2 layer 0) | MiB |", "|---|---|"]
    lines += [f"| {name} | {value / MIB:.1f} |" for name, value in (
        ("weights, float32", s["layer_bytes"]), ("calibration activations", s["activation_bytes"]),
        ("other layer arguments (position embeddings...)", s["kwargs_bytes"]), ("Gram matrices", s["gram_bytes"]),
        ("statistics pass: peak above the layer and activations", s["statistics_pass_peak_bytes"]),
        *((f"job cut to layer 0 (offload {k}): peak", v) for k, v in layer["layer_step_peak_bytes"].items()),
        ("the same by the per-phase model", smollm2_check(layer)))]
    a, b = fit_gptq(layer["gptq"])
    lines += ["", f"GPTQ working set, fitted on the LLaMA-7B shapes: {a:.3f} x 4 in^2 + {b:.3f} x out x in bytes", "",
              "| case | out x in | measured (MiB) | fit (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['out']} x {r['in']} | {r['bytes'] / MIB:.1f} | "
              f"{(a * 4 * r['in'] ** 2 + b * r['out'] * r['in']) / MIB:.1f} |" for r in layer["gptq"]]
    projected = projection(layer)
    lines += ["", "LLaMA-2-70B, one layer's step on the device (GB):", ""]
    lines += [f"* {name}: {value:.2f}" for name, value in projected["components_gb"].items()]
    lines += [f"* phase '{name}': {value:.1f}" for name, value in projected["phases_gb"].items()]
    lines += [f"* peak, offload {name}: {value:.1f}" for name, value in projected["device_peak_gb"].items()]
    lines += ["", "LLaMA-2-70B on the host (GB):", ""]
    lines += [f"* {name}: {value:.1f}" for name, value in projected["host_gb"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("DEVICE", "BATCH", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("all", "layer"), default="all", help="layer: parts 2 and 3 only, no job")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the measurements there")
    args = parser.parse_args()
    if args.child:
        device, batch, out = args.child
        Path(out).write_text(json.dumps(measure_layer(device, int(batch))))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = model_size()
    with tempfile.TemporaryDirectory() as folder:
        offloads = ("device", "cpu") if device == "cuda" else ("device",)
        jobs = [run_job(offload, device, Path(folder)) for offload in offloads] if args.part == "all" else []
        layer = layer_in_child(device, args.batch_size, Path(folder))
    print(report(jobs, layer, size))
    if args.json:
        args.json.write_text(json.dumps({"model": size, "jobs": jobs, "layer": layer, "projection": projection(layer)},
                                        indent=2))


if __name__ == "__main__":
    main()
