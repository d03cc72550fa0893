# The config's checks, the job environment, the plan of the jobs (ptqrepro.plan: every list the
# rules read, each recipe parsed once) and the functions the rules call. Snakemake's lint wants
# the functions apart from the files that define rules.

import functools
import json
import os
import re
import sys

from snakemake.utils import validate

from ptqrepro.runtime.cluster import rule_resources, rule_threads
from ptqrepro.checks.config import (
    check_config,
    check_config_files,
    check_schema,
    single_draw_warnings,
)
from ptqrepro.errors import PtqError
from ptqrepro.runtime.hub import staging_environment
from ptqrepro.runtime.interrupts import stop_jobs_with_snakemake
from ptqrepro.models.sources import resolve_device
from ptqrepro.plan import RUN_DIR, build_plan
from ptqrepro.checks.preflight import preflight, snakemake_dry_run

# Each check lists every error it finds, one line each, and the next runs once it passes: it reads
# what the one before checked (duplicate keys, the schema, the config's consistency, then the models'
# shapes and this machine). Nothing is run, written or deleted before they all pass.
try:
    check_config_files(workflow.configfiles)
    check_schema(config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"))
    # fills in the schema's defaults
    validate(config, "../schemas/config.schema.yaml")
    check_config(config)
    # The Hugging Face cache (staging.hf_home) and the offline variables, set before the checks below
    # read the cache (see the stage-in below).
    os.environ.update(staging_environment(config["staging"]))
    if config["offline"]:
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if workflow.is_main_process:
        for warning in single_draw_warnings(config):
            print(f"config warning: {warning}", file=sys.stderr)
    # against the models' shapes and this machine, once: a cluster job's own Snakemake (on its node)
    # reads this file again
    if workflow.is_main_process:
        preflight(
            config, "results/models", log=lambda line: print(line, file=sys.stderr), dry_run=snakemake_dry_run(sys.argv)
        )
    # The jobs and targets; a peer recipe whose toolkit is not installed is left out, with a message.
    plan = build_plan(config)
except PtqError as error:
    sys.exit(f"config error: {error}")
for name, missing in plan.skipped_peers.items():
    print(f"peer recipe {name} skipped: {missing}", file=sys.stderr)


# Stage-in: the hub's files are fetched once, by the rules that prepare the models and corpora
# (target `stage`), which run where Snakemake runs (the submit host, where the network is:
# `localrules`). Every job after them reads the cache with the offline variables set (OFFLINE_JOB),
# whatever `offline` says, so no GPU job waits on the network.
localrules:
    stage,
    prepare_model,
    prepare_corpus,


OFFLINE_JOB = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "

# HF_HOME and `offline` (the default config: no job's hub library reaches the network, the stage-in
# included) are set above, not asked of the user, so not `envvars:` (which stops where one is unset):
# online, what the user set stays and nothing else is set (HF_DATASETS_OFFLINE=0 would override a
# user's HF_HUB_OFFLINE for datasets). A job's Snakemake on a cluster node reads the config and
# sets them again.

# glibc hands every freed block over 32 MB back to the kernel and faults in fresh zeroed pages on
# the next allocation; the jobs allocate and free such tensors (activations, logits) by the
# thousand. Keeping freed memory in the process cut a GPTQ job's system time from 11 s to 3 s on
# SmolLM2 at a 8 % higher peak RSS. A value already in the environment wins.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 34))


# GPUs are a per-node pool: on a cluster each submission (one job, or one group of evaluations) gets
# its own `--resources gpu=N`, and only SLURM counts them across jobs; locally it bounds the whole run.
resource_scopes:
    gpu="local",


wildcard_constraints:
    model="[^/]+",
    recipe="[A-Za-z0-9_.+@=-]+",
    corpus="[^/]+",
    dataset="[^/]+",
    seed="[0-9]+",


# SIGINT or SIGTERM to this Snakemake alone stops its running jobs too, so that a quantize job keeps
# its finished layers for the rerun (ptqrepro.runtime.interrupts; profiles/default: rerun-incomplete).
onstart:
    stop_jobs_with_snakemake()


# Every job's software for `--software-deployment-method conda`: this checkout and pyproject.toml's
# dependencies (envs/ptqrepro.yaml; tests/test_envs.py keeps the two in step). The path is relative
# to workflow/rules/, where the rules are written.
CONDA_ENV = "../../envs/ptqrepro.yaml"

# The rules other than quantize, dwr and the evaluations: no GPU; memory and wall time from
# `resources.other`, partition and account as every job (ptqrepro.runtime.cluster).
OTHER_RESOURCES = rule_resources(config, "other")

# Every setting that changes a result reaches its jobs through the rule's `params:` (or the output
# path), so that changing it reruns exactly the jobs it affects (Snakemake's default rerun triggers:
# params, code, input, mtime); Snakemake records a param's value without its name, so a rule's
# evaluation settings form one mapping (`protocol`) whose record names each. Where a job keeps its
# data (calibration.offload, eval.placement) gives the same results (docs/configuration.md,
# docs/cluster.md), so the rules pass it as a resource (`offload`, `placement`), which is no rerun trigger:
# changing it reruns nothing; nor do the threads and the other resources a job gets. `device` is a
# param: a GPU's arithmetic is not the CPU's.
PPL = config["eval"]["ppl"]
CALIB = config["calibration"]
# How the tables' and claims' intervals are computed (ptqrepro.report.uncertainty; the schema
# fills in its defaults).
BOOTSTRAP = "--bootstrap-samples {bootstrap_samples} --bootstrap-seed {seed} --level {level}".format(
    **config["uncertainty"]
)


def quantized_artifact(path):
    """A quantized model's folder: temp() under storage.temporary_artifacts, so Snakemake deletes it
    once every job that reads it (its evaluations, a DWR search on it) has finished."""
    return temp(directory(path)) if config["storage"]["temporary_artifacts"] else directory(path)


def recipe_spec(name):
    """A recipe's entry as the quantize/dwr command reads it (ptqrepro.checks.config.recipe_job_spec), as JSON."""
    return json.dumps(plan.recipes[name].spec)


def one_of(names):
    """A wildcard pattern matching exactly these names (none: matches nothing)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def longest_first(wildcards):
    """Priority of a quantize or dwr job: its cost plus that of the DWR searches waiting on it, so
    that the longest chains start first and the short evaluations (priority 0) fill the end."""
    return plan.recipes[wildcards.recipe].priority


def checkpoint_dir(wildcards):
    """Where a quantize or DWR job saves its finished layers."""
    return f"results/checkpoints/{wildcards.model}/{wildcards.recipe}/s{wildcards.seed}"


def calibration_input(wildcards):
    """The calibration windows of a quantize job whose recipe reads them (none for fp16, RTN, LQER)."""
    return (
        plan.calibration_file.format(model=wildcards.model, seed=wildcards.seed)
        if plan.recipes[wildcards.recipe].calibrates
        else []
    )


def calibration_arguments(wildcards):
    """The command's calibration arguments (file, batch size, dtype) for a recipe that reads
    calibration data; none for one that does not, so that they are no rerun trigger of its job.
    From the wildcards, not the job's input: Snakemake compares no param derived from the input."""
    calibration = calibration_input(wildcards)
    if not calibration:
        return ""
    return "--calibration {} --batch-size {} --dtype {}".format(
        calibration, CALIB["batch_size"], plan.recipes[wildcards.recipe].calibration_dtype
    )


@functools.cache
def device_class():
    """What the `device` param of the jobs records: the class of device they compute on, `cpu` or
    `cuda`, as config `device` resolves on this machine (`auto`: `cuda` where torch sees a GPU). A
    different spelling of the same device (`cpu` to `auto` without a GPU) reruns nothing; the
    command gets the config's own value, as a resource, and resolves it where it runs."""
    try:
        return resolve_device(config["device"]).split(":")[0]
    except PtqError:
        return config["device"]  # a GPU named that this machine lacks: the job says so where it runs
