"""A stop signal to Snakemake stops its running ``ptqrepro`` jobs too, so that they keep their
checkpoints instead of running on unseen.

Ctrl-C in a terminal reaches every process of the foreground group, the jobs with Snakemake. A
``kill -INT`` or ``kill -TERM`` of the Snakemake process alone (a terminal multiplexer, a batch
system, a user's script) reaches only Snakemake: on SIGINT its local executor waits for the running
jobs, on SIGTERM it stops scheduling and waits too. A quantize job then runs to its end after
Snakemake has marked its outputs incomplete, and the rerun (``rerun-incomplete``) deletes them and
quantizes again from layer 0, the checkpoints having been removed with the job's success.
``stop_jobs_with_snakemake`` (the workflow's ``onstart``, in workflow/rules/common.smk) sends each
running ``ptqrepro`` command SIGTERM first: it stops at once (``cli.main``: exit code 130, nothing
half-written, the finished layers kept), and the rerun restores those layers.
"""

from __future__ import annotations

import signal
from pathlib import Path

COMMAND = "ptqrepro"


def _is_ptqrepro_command(cmdline: list[str]) -> bool:
    """Whether a process runs the ``ptqrepro`` command (not a shell whose script mentions it)."""
    return any(Path(part).name == COMMAND or part == "ptqrepro.cli" for part in cmdline[:3])


def stop_ptqrepro_jobs() -> list[int]:
    """Send SIGTERM to every ``ptqrepro`` command among this process's descendants; their PIDs."""
    import psutil

    stopped = []
    for process in psutil.Process().children(recursive=True):
        try:
            if _is_ptqrepro_command(process.cmdline()):
                process.send_signal(signal.SIGTERM)
                stopped.append(process.pid)
        except psutil.Error:  # ended meanwhile
            continue
    return stopped


def stop_jobs_with_snakemake() -> None:
    """Chain a handler before Snakemake's own for SIGINT and SIGTERM (call it once Snakemake has
    installed its handlers: the workflow's ``onstart``) that first stops the running jobs."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)

        def handler(received, frame, previous=previous):
            stop_ptqrepro_jobs()
            if callable(previous):
                previous(received, frame)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt

        signal.signal(signum, handler)
