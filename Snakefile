# ptqrepro: calibration -> quantization -> evaluation -> tables and plots.
#
#   snakemake --cores 2                                      the embedded default (offline)
#   snakemake --cores 2 --configfile config/papers/X.yaml    a paper's experiment
#
# Every job calls the `ptqrepro` command line, so each one can also be run by hand.

import os
import sys

from snakemake.utils import min_version, validate

from ptqrepro.config import check_config
from ptqrepro.errors import PtqError

min_version("9.0")


# The default experiment, unless --configfile names another (configs are not merged: a paper
# config must not inherit the default's models and recipes).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")
try:
    check_config(config)
except PtqError as error:
    sys.exit(f"config error: {error}")

if config["offline"]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"

MODELS = list(config["models"])
RECIPES = list(config["recipes"])
PPL = config["eval"]["ppl"]
CALIB = config["calibration"]
CALIBRATION_FILE = "results/calibration/{model}/" + "{corpus}-n{nsamples}-l{seqlen}-s{seed}.pt".format(**CALIB)


wildcard_constraints:
    model="[^/]+",
    recipe="[A-Za-z0-9_.+@=-]+",
    corpus="[^/]+",
    dataset="[^/]+",


include: "workflow/rules/data.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "results/tables/all.csv",
        "results/tables/all.md",
        "results/plots/ppl_vs_bits.png",
        "results/plots/ppl_vs_bits.pdf",
