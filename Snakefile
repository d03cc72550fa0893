# ptqrepro: calibration -> quantization -> evaluation -> tables and plots.
#
#   snakemake --cores 2 --configfile config/smoke.yaml       a first run, in minutes
#   snakemake --cores 2                                      the embedded default (offline)
#   snakemake --cores 2 --configfile config/papers/X.yaml    a paper's experiment
#   snakemake --report results/report.html                   the tables and figures, after a run
#
# Every job calls the `ptqrepro` command line, so each one can also be run by hand. The config is
# checked and the jobs are planned once in workflow/rules/common.smk (ptqrepro.plan); each stage's
# rules are in their own file under workflow/rules/.

from snakemake.utils import min_version

min_version("9.0")


# The default experiment, unless --configfile names another (configs are not merged: a paper
# config must not inherit the default's models and recipes).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/peers.smk"


# The tables and claims, the papers' tables where the config names them, and the figures; the
# on-request targets: `stage`, `peers`, `export_vllm` and results/export/... (workflow/rules/).
rule all:
    input:
        plan.targets(),
