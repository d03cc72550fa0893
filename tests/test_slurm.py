"""The tiny DAG through `--profile profiles/slurm` on a real single-node SLURM cluster with accounting
(Debian's slurm-wlm, slurmdbd, mariadb-server and munge, brought up in a temp folder by
tests/slurm/start_cluster.sh)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas
import pytest

from test_dag import REPO, tiny_config, write_config

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


@pytest.mark.slow
def test_tiny_dag_runs_as_slurm_jobs(slurm_cluster, tmp_path, tiny_model_dir, tiny_corpus):
    """One recipe scored on two corpora, submitted through the plugin with the repository's profile:
    every job a SLURM job in the config's partition and account (the plugin follows them through
    `sacct`, its default status command), the GPU jobs asking for the config's GPU model, both
    evaluations in one submission, the quantized model deleted after them
    (storage.temporary_artifacts), the table complete."""
    config = tiny_config(tiny_model_dir, tiny_corpus, {"rtn@int4-g16": {"steps": ["rtn"], "weight": "int4-g16"}})
    config["device"] = "auto"  # asks for a GPU (the cluster's stand-in A100); computes on the CPU
    config["corpora"]["tiny2"] = config["corpora"]["tiny"]
    config["eval"]["ppl"]["datasets"] = ["tiny", "tiny2"]
    gpu_job = {"gpus": 1, "gpu_model": "a100", "mem_mb": 1500, "runtime": 30}  # minutes: ample on a busy machine
    config["resources"] = {"quantize": gpu_job, "eval_ppl": gpu_job, "other": {"mem_mb": 1000, "runtime": 30}}
    config["slurm"] = {"partition": "ptqtest", "account": "ptqlab"}  # without them sbatch refuses or bills root
    config["storage"] = {"temporary_artifacts": True}
    write_config(tmp_path, config)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_"))}
    env["PATH"] = os.pathsep.join([str(slurm_cluster / "bin"), str(Path(sys.executable).parent), env["PATH"]])
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--profile", str(REPO / "profiles" / "slurm"), "--jobs", "4", "--retries", "0", "--latency-wait", "5",
         # the first status check after 1 s, not 40
         "--slurm-init-seconds-before-status-checks", "1",
         "--slurm-keep-successful-logs", "results/tables/all.csv"],
        capture_output=True, text=True, env=env, timeout=900,  # 2-4 min; a hung status check fails, not hangs
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # the plugin logs each submission under .snakemake/slurm_logs/<rule_RULE | group_GROUP_RULES>/.../<job id>.log
    logs = (tmp_path / ".snakemake" / "slurm_logs").rglob("*.log")
    submitted = {path.stem: path.relative_to(tmp_path / ".snakemake" / "slurm_logs").parts[0] for path in logs}
    # the stage-in (prepare_model, prepare_corpus) runs where Snakemake runs; RTN reads no calibration
    assert sorted(submitted.values()) == sorted([
        "rule_float_reference", "rule_float_reference", "rule_quantize", "group_eval_tiny_rtn@int4-g16_s0_eval_ppl",
        "rule_tables"]), submitted
    jobs = {job["JobId"]: job for job in slurm_jobs(slurm_cluster)}
    assert set(jobs) == set(submitted)
    assert all(job["JobState"] == "COMPLETED" and job["Partition"] == "ptqtest" for job in jobs.values()), jobs
    accounted = accounted_jobs(slurm_cluster)
    assert set(accounted) == set(submitted)
    assert all(job == {"State": "COMPLETED", "Account": "ptqlab", "Partition": "ptqtest"} for job in accounted.values()), accounted
    gpus = {submitted[number]: job.get("TresPerJob") for number, job in jobs.items()}
    assert gpus["rule_quantize"] == gpus["group_eval_tiny_rtn@int4-g16_s0_eval_ppl"] == "gres:gpu:a100:1", gpus
    assert gpus["rule_float_reference"] == "gres:gpu:a100:1" and gpus["rule_tables"] is None, gpus

    table = pandas.read_csv(tmp_path / "results/tables/all.csv")
    ppl = table[(table.kind == "perplexity") & (table.metric == "ppl")]
    assert sorted(zip(ppl.recipe, ppl.dataset)) == [("rtn@int4-g16", "tiny"), ("rtn@int4-g16", "tiny2")]
    assert not (tmp_path / "results/quantized/tiny/rtn@int4-g16/s0").exists()  # deleted after its evaluations
    assert (tmp_path / "results/metrics/tiny/rtn@int4-g16/s0/quantize.json").is_file()
