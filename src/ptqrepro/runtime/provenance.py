"""What every result JSON records about how it was made: config hash, versions, commit, cost."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("ptqrepro", "torch", "transformers", "datasets", "safetensors", "gguf", "snakemake", "lm_eval", "llmcompressor", "compressed-tensors")


def config_hash(obj) -> str:
    """First 12 hex digits of the SHA-256 of ``obj`` as canonical JSON."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, with ``-dirty`` if it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


@functools.cache
def cpu_description() -> dict[str, object]:
    """The CPU's model name and flags from the first processor of /proc/cpuinfo (``platform.processor()``
    and no flags where it cannot be read); read once per process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "flags": frozenset()}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return {"model": fields.get("model name") or platform.machine(), "flags": frozenset(fields.get("flags", "").split())}


def bf16_kernels() -> str:
    """Which hardware computes bfloat16 dot products on this CPU: ``AMX`` (Intel AMX tiles),
    ``AVX512-BF16``, or ``none`` (emulated through float32)."""
    flags = cpu_description()["flags"]
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "none"


@functools.cache
def onednn_version() -> str | None:
    """The oneDNN (MKL-DNN) version torch was built with, from its build configuration."""
    match = re.search(r"MKL-DNN v([0-9.]+)", torch.__config__.show())
    return match.group(1) if match else None


def hardware(device: str) -> dict[str, object]:
    """The machine a result was computed on, down to the kernel path that rounds its arithmetic:
    results in bfloat16 (and GPTQ at 3 bits even in float32) differ between CPUs whose kernels
    accumulate differently. On a CPU: its model, torch's vector ISA (``AVX512``, ``AVX2``, ...),
    the bfloat16 kernels (:func:`bf16_kernels`), oneDNN's version and an ``ONEDNN_MAX_CPU_ISA``
    cap if set; on CUDA: the GPU, its compute capability and the CUDA version. ``label`` is the
    one-line summary the tables show."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return {"gpu": name, "compute_capability": capability, "cuda": torch.version.cuda,
                "label": f"{name} (sm {capability}, CUDA {torch.version.cuda})"}
    cpu = cpu_description()["model"]
    isa = torch.backends.cpu.get_cpu_capability()
    info = {"cpu": cpu, "isa": isa, "bf16_kernels": bf16_kernels(),
            "onednn": onednn_version(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    info["label"] = f"{cpu} ({isa}, bf16 {info['bf16_kernels']})"
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Provenance:
    """Start a clock at construction; ``record(config, device)`` gives the provenance block."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def record(self, config, device: str) -> dict:
        return {
            "config_hash": config_hash(config),
            "git_commit": git_commit(),
            "packages": package_versions(),
            "python": platform.python_version(),
            "host": platform.node(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
            "hardware": hardware(device),
            "wall_time_s": round(time.perf_counter() - self.started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
