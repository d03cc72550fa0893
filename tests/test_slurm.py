"""A paper config's slice through `--profile profiles/slurm` on a real single-node SLURM cluster with
accounting (Debian's slurm-wlm, slurmdbd, mariadb-server and munge, brought up in a temp folder by
tests/slurm/start_cluster.sh)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_dag import REPO
from test_rehearsal import check_rehearsal, rehearse

SLURM_REQUIRED = os.environ.get("PTQ_REQUIRE_SLURM") == "1"
"""Set by .ci/run, which installs SLURM: there a missing piece fails the test instead of skipping it."""
SCRIPTS = Path(__file__).resolve().parent / "slurm"
COMMANDS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mungekey", "mariadbd", "mariadb-install-db", "mariadb",
            "sbatch", "srun", "squeue", "scontrol", "sinfo", "sacct", "sacctmgr")
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def missing_pieces() -> list[str]:
    """What this test needs and the machine lacks: SLURM's commands, root, the executor plugin."""
    missing = [command for command in COMMANDS if not shutil.which(command, path=SBIN)]
    if os.geteuid() != 0:
        missing.append("root (the daemons run as root)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        missing.append("snakemake-executor-plugin-slurm (pip install -e '.[slurm]')")
    return missing


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster: its folder (``bin/`` holds its sbatch, squeue, ...); the
    daemons are stopped by PID afterwards. A skip naming what is missing (a failure where
    PTQ_REQUIRE_SLURM=1)."""
    missing = missing_pieces()
    if missing:
        message = ("the SLURM test needs " + ", ".join(missing)
                   + " (apt install slurm-wlm slurm-client slurmdbd mariadb-server munge; see .ci/run)")
        if SLURM_REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("slurm")
    try:
        start = subprocess.run([SCRIPTS / "start_cluster.sh", folder], capture_output=True, text=True, timeout=60)
        assert start.returncode == 0, start.stdout + start.stderr
        yield folder
    finally:
        subprocess.run([SCRIPTS / "stop_cluster.sh", folder], timeout=60)


def slurm_jobs(cluster: Path) -> list[dict]:
    """Every job the cluster ran or runs (kept MinJobAge = 600 s after its end), as `scontrol`'s
    key=value fields."""
    shown = subprocess.run([cluster / "bin" / "scontrol", "show", "job", "--oneliner"],
                           capture_output=True, text=True, check=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in shown.splitlines() if line.strip()]


def accounted_jobs(cluster: Path) -> dict[str, dict]:
    """Every job the accounting database holds: {job id: {State, Account, Partition}} from `sacct`."""
    fields = ("JobID", "State", "Account", "Partition")
    shown = subprocess.run([cluster / "bin" / "sacct", "--allusers", "--allocations", "--noheader", "--parsable2",
                            "--starttime", "now-1days", "--format", ",".join(fields)],
                           capture_output=True, text=True, check=True).stdout
    rows = [dict(zip(fields, line.split("|"))) for line in shown.splitlines() if line.strip()]
    return {row.pop("JobID"): row for row in rows}


SLICE = ("mxptq", ["llama-2-7b"], ["fp16", "sq+awq+gptq@mxint4_a=mxint8"])
"""The paper slice run through the cluster: the MX-PTQ config on Llama-2-7B, two recipes (one of
them SmoothQuant, AWQ and GPTQ composed), both of its corpora, GPU jobs asking for the config's A100."""
GPU_JOBS = ("rule_quantize", "rule_float_reference")
"""The submissions that compute on the model, besides the evaluation groups."""


@pytest.mark.slow
def test_a_paper_slice_runs_as_slurm_jobs(slurm_cluster, hub_home, tmp_path):
    """A slice of the MX-PTQ paper config, rehearsed offline (test_rehearsal), through the
    repository's profile with the environment a user sets (partition and account as SBATCH_*
    variables): the stage-in runs where Snakemake runs; every other job is a SLURM job in that
    partition and account (the plugin follows them through `sacct`, its default status command);
    the GPU jobs ask for the config's A100 and the tables none; each recipe's evaluations on both
    corpora are one submission, after which the model is deleted (storage.temporary_artifacts);
    no job reaches the network; the paper tables are filled."""
    paper, models, recipes = SLICE
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_"))}
    env.update(PATH=os.pathsep.join([str(slurm_cluster / "bin"), str(Path(sys.executable).parent), env["PATH"]]),
               SBATCH_PARTITION="ptqtest", SBATCH_ACCOUNT="ptqlab")
    rehearsal = rehearse(paper, tmp_path, hub_home, models, recipes, env=env, timeout=1200, extra=[
        "--profile", str(REPO / "profiles" / "slurm"), "--jobs", "4", "--retries", "0", "--latency-wait", "5",
        # the first status check after 1 s, not 40
        "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs"])
    print(f"rehearsal {paper} {models} {recipes} on SLURM: {rehearsal.jobs} jobs, {rehearsal.seconds:.0f} s")
    check_rehearsal(rehearsal)

    # the plugin logs each submission under .snakemake/slurm_logs/<rule_RULE | group_GROUP_RULES>/.../<job id>.log
    logs = (tmp_path / ".snakemake" / "slurm_logs").rglob("*.log")
    submitted = {path.stem: path.relative_to(tmp_path / ".snakemake" / "slurm_logs").parts[0] for path in logs}
    kinds = sorted(set(submitted.values()))
    assert not any(kind.startswith(("rule_prepare_", "rule_stage")) for kind in kinds), kinds
    evaluations = sorted(kind for kind in submitted.values() if kind.startswith("group_eval_"))
    assert evaluations == sorted(f"group_eval_llama-2-7b_{recipe}_s0_eval_ppl" for recipe in recipes), submitted
    assert {"rule_quantize", "rule_float_reference", "rule_calibrate", "rule_tables"} <= set(kinds), kinds
    jobs = {job["JobId"]: job for job in slurm_jobs(slurm_cluster)}
    assert set(jobs) == set(submitted)
    assert all(job["JobState"] == "COMPLETED" and job["Partition"] == "ptqtest" for job in jobs.values()), jobs
    accounted = accounted_jobs(slurm_cluster)
    assert set(accounted) == set(submitted)
    assert all(job == {"State": "COMPLETED", "Account": "ptqlab", "Partition": "ptqtest"} for job in accounted.values()), accounted
    for number, job in jobs.items():
        gpu = submitted[number] in GPU_JOBS or submitted[number] in evaluations
        assert job.get("TresPerJob") == ("gres:gpu:a100:1" if gpu else None), (submitted[number], job)
    assert not (tmp_path / f"results/quantized/llama-2-7b/{recipes[1]}/s0").exists()  # deleted after its evaluations
    assert (tmp_path / f"results/metrics/llama-2-7b/{recipes[1]}/s0/quantize.json").is_file()
