"""What every result JSON records about how it was made: config hash, versions, commit, cost."""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("ptqrepro", "torch", "transformers", "datasets", "safetensors", "gguf", "snakemake", "lm_eval")


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
            "wall_time_s": round(time.perf_counter() - self.started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
