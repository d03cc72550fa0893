# ptqrepro: calibration -> quantization -> evaluation -> tables and plots.
#
#   snakemake --cores 2                                      the embedded default (offline)
#   snakemake --cores 2 --configfile config/papers/X.yaml    a paper's experiment
#
# Every job calls the `ptqrepro` command line, so each one can also be run by hand.

import os
import sys

from snakemake.utils import min_version, validate

from ptqrepro.cluster import rule_resources, rule_threads
from ptqrepro.config import (
    calibration_dtype,
    check_config,
    check_config_files,
    check_schema,
    recipe_calibrates,
    recipe_job_spec,
    recipe_seeds,
    single_draw_warnings,
)
from ptqrepro.errors import PtqError
from ptqrepro.hub import staging_environment
from ptqrepro.interrupts import stop_jobs_with_snakemake
from ptqrepro.peers import toolkit
from ptqrepro.preflight import preflight, snakemake_dry_run
from ptqrepro.report.claims import claims_from_config
from ptqrepro.peers.recipes import is_peer
from ptqrepro.recipes import is_reconstruction, recipe_from_config, reconstruction_from_config

min_version("9.0")


# The default experiment, unless --configfile names another (configs are not merged: a paper
# config must not inherit the default's models and recipes).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Each check lists every error it finds, one line each, and the next runs once it passes: it reads
# what the one before checked (duplicate keys, the schema, the config's consistency, then the models'
# shapes and this machine). Nothing is run, written or deleted before they all pass.
try:
    check_config_files(workflow.configfiles)
    check_schema(config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"))
    validate(config, "workflow/schemas/config.schema.yaml")
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
except PtqError as error:
    sys.exit(f"config error: {error}")


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


# Every rule other than quantize, dwr and the evaluations: no GPU; memory and wall time from
# `resources.other`, partition and account as every job (ptqrepro.cluster).
OTHER_RESOURCES = rule_resources(config, "other")

MODELS = list(config["models"])
# Peer recipes (a toolkit runs one of our recipes: ptqrepro.peers) whose toolkit is installed; the
# others are left out of the DAG, each with a message.
PEERS = []
for name, entry in config["recipes"].items():
    if is_peer(entry):
        missing = toolkit(entry["toolkit"]).missing()
        if missing:
            print(f"peer recipe {name} skipped: {missing}", file=sys.stderr)
        else:
            PEERS.append(name)
RECIPES = [name for name, entry in config["recipes"].items() if not is_peer(entry) or name in PEERS]
# A reconstruction recipe (DWR) is made by its own rule from its base recipe's artifact.
RECONSTRUCTIONS = [name for name, entry in config["recipes"].items() if is_reconstruction(entry)]
QUANTIZATIONS = [name for name in RECIPES if name not in RECONSTRUCTIONS]
# (model, recipe) pairs to run: every model, unless a recipe lists its `models`.
RUNS = [(model, recipe) for recipe in RECIPES for model in config["recipes"][recipe].get("models", MODELS)]
# The calibration seeds of each recipe (ptqrepro.config.recipe_seeds): one quantize or DWR job per
# (model, recipe, seed), and its evaluations; a recipe that reads no calibration data runs at the first.
SEEDS = {recipe: recipe_seeds(config, recipe) for recipe in RECIPES}
SEEDED_RUNS = [(model, recipe, seed) for model, recipe in RUNS for seed in SEEDS[recipe]]


# Every setting that changes a result reaches its jobs through the rule's `params:` (or the output
# path), so that changing it reruns exactly the jobs it affects (Snakemake's default rerun triggers:
# params, code, input, mtime); Snakemake records a param's value without its name, so a rule's
# evaluation settings form one mapping (`protocol`) whose record names each. Where a job keeps its
# data (calibration.offload, eval.placement) gives the same results (docs/configuration.md,
# docs/cluster.md), so the rules pass it as a resource (`offload`, `placement`), which is no rerun trigger:
# changing it reruns nothing; nor do the threads and the other resources a job gets. `device` is a
# param: a GPU's arithmetic is not the CPU's.
PPL = config["eval"]["ppl"]
# The recipes of the report (`snakemake`, rule all): every recipe but the peer recipes, which
# `snakemake peers` runs (workflow/rules/peers.smk), unless a claim names them.
CLAIMED = {name for claim in claims_from_config(config["claims"]) for name in claim.recipes}
REPORTED = [name for name in RECIPES if name not in PEERS or name in CLAIMED]
REPORTED_RUNS = [(model, recipe, seed) for model, recipe, seed in SEEDED_RUNS if recipe in REPORTED]
# Recipes scored zero-shot: eval.zeroshot.recipes, or every reported recipe, on eval.zeroshot.models
# or every model; at each recipe's first seed.
ZEROSHOT_RUNS = (
    [
        (m, r, SEEDS[r][0])
        for m, r in RUNS
        if r in (config["eval"]["zeroshot"].get("recipes") or REPORTED)
        and m in (config["eval"]["zeroshot"].get("models") or MODELS)
    ]
    if config["eval"].get("zeroshot")
    else []
)
ZEROSHOT_RECIPES = sorted({recipe for _, recipe, _ in ZEROSHOT_RUNS})
STEP_NAMES = {
    name: {step.name for step in recipe_from_config(name, recipe_job_spec(config, name)).steps}
    for name in QUANTIZATIONS
    if name not in PEERS
}
MAGR_RUNS = [(model, recipe) for model, recipe in RUNS if "magr" in STEP_NAMES.get(recipe, ())]
HAS_LOW_RANK = any(names & {"lqer", "l2qer"} for names in STEP_NAMES.values())
CALIB = config["calibration"]
# The corpora the jobs read: calibration, perplexity, local zero-shot tasks.
ZEROSHOT_CORPUS = (config["eval"].get("zeroshot") or {}).get("corpus")
STAGED_CORPORA = sorted({CALIB["corpus"], *PPL["datasets"], *([ZEROSHOT_CORPUS] if ZEROSHOT_CORPUS else [])})
CALIBRATION_FILE = "results/calibration/{model}/" + "{corpus}-n{nsamples}-l{seqlen}-s".format(**CALIB) + "{seed}.pt"
# Where a (model, recipe, seed) job's artifact and results go; {seed} is the calibration seed.
RUN_DIR = "{model}/{recipe}/s{seed}"
# How the tables' and claims' intervals are computed (ptqrepro.report.uncertainty; the schema
# fills in its defaults).
BOOTSTRAP = "--bootstrap-samples {bootstrap_samples} --bootstrap-seed {seed} --level {level}".format(
    **config["uncertainty"]
)


wildcard_constraints:
    model="[^/]+",
    recipe="[A-Za-z0-9_.+@=-]+",
    corpus="[^/]+",
    dataset="[^/]+",
    seed="[0-9]+",


# Figures drawn from results/tables/all.csv (`ptqrepro plots --figure`).
TABLE_FIGURES = [
    "ppl_vs_bits",
    *(["accuracy_vs_bits"] if ZEROSHOT_RUNS else []),
    *(["lqer_ranks"] if HAS_LOW_RANK else []),
    "job_costs",
]


# Every job's software for `--software-deployment-method conda`: this checkout and pyproject.toml's
# dependencies (envs/ptqrepro.yaml; tests/test_envs.py keeps the two in step). The path is relative
# to workflow/rules/, where the rules are written.
CONDA_ENV = "../../envs/ptqrepro.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/peers.smk"


# SIGINT or SIGTERM to this Snakemake alone stops its running jobs too, so that a quantize job keeps
# its finished layers for the rerun (ptqrepro.interrupts; profiles/default: rerun-incomplete).
onstart:
    stop_jobs_with_snakemake()


rule all:
    input:
        "results/tables/all.csv",
        "results/tables/all.md",
        "results/tables/claims.csv",
        "results/tables/claims.md",
        ["results/tables/papers"] if config["reference"] else [],
        [f"results/plots/dwr/{model}/{recipe}.png" for model, recipe in RUNS if recipe in RECONSTRUCTIONS],
        [f"results/plots/magr/{model}/{recipe}.png" for model, recipe in MAGR_RUNS],
        [f"results/plots/{figure}.{extension}" for figure in TABLE_FIGURES for extension in ("png", "pdf")],
