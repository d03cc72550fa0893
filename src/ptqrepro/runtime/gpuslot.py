"""``ptqrepro-gpu-slot GPUS DEVICE COMMAND [ARGUMENT...]``: a GPU job's command on a GPU of its own.

Runs COMMAND on one GPU of this machine that no other command started through it holds, waiting
while every GPU is held: CUDA_VISIBLE_DEVICES becomes that GPU, held (an flock on
``$PTQ_GPU_SLOTS/<gpu>``) until the command and its children exit, since the command replaces this
process and keeps the lock's descriptor. So ``--resources gpu=N`` on a workstation with N GPUs
(profiles/local) runs N jobs on N different GPUs, not all on the first.

GPUS is the job's ``gpu`` resource and DEVICE its ``--device``. The command runs as it is for a job
without a GPU (GPUS 0), on a device other than auto or cuda (cpu, a pinned cuda:N), under SLURM
(the allocation names the job's GPUs), or where no GPU shows (CUDA_VISIBLE_DEVICES where set, else
nvidia-smi's list). The rules start their GPU jobs through it (workflow/rules/quantize.smk,
evaluate.smk); it is a command of the package so that it is on PATH wherever ``ptqrepro`` is.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

USAGE = "usage: ptqrepro-gpu-slot GPUS DEVICE COMMAND [ARGUMENT...]"


def visible_gpus() -> list[str]:
    """The GPUs a job may take: CUDA_VISIBLE_DEVICES where set (empty: none), else nvidia-smi's
    indices (none without nvidia-smi)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        try:
            query = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]
            listed = subprocess.run(query, capture_output=True, text=True).stdout
        except OSError:
            listed = ""
    return [gpu.strip() for gpu in listed.replace("\n", ",").split(",") if gpu.strip()]


def slots_folder() -> Path:
    """Where the GPUs' lock files are: PTQ_GPU_SLOTS, else one folder per user in TMPDIR (or /tmp)."""
    user = pwd.getpwuid(os.getuid()).pw_name
    return Path(os.environ.get("PTQ_GPU_SLOTS") or Path(os.environ.get("TMPDIR") or "/tmp") / f"ptqrepro-gpu-slots-{user}")


def hold_free_gpu(gpus: list[str], slots: Path) -> str:
    """The first of ``gpus`` whose lock file is free, locked by a descriptor left open for the
    command that replaces this process; tries again each second while every one is held."""
    slots.mkdir(parents=True, exist_ok=True)
    while True:
        for gpu in gpus:
            lock = os.open(slots / gpu, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                continue
            os.set_inheritable(lock, True)
            return gpu
        time.sleep(1)


def main(argv: list[str] | None = None) -> None:
    """Run the command (replacing this process), on a GPU held for it where the job asks for one."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or not args[0].isdigit():
        sys.exit(USAGE)
    gpus, device, command = int(args[0]), args[1], args[2:]
    if gpus and device in ("auto", "cuda") and not os.environ.get("SLURM_JOB_ID"):
        visible = visible_gpus()
        if visible:
            os.environ["CUDA_VISIBLE_DEVICES"] = hold_free_gpu(visible, slots_folder())
    os.execvp(command[0], command)
