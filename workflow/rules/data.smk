# Stage 1: models, corpora and calibration windows, each made once and shared by every method.
# prepare_model and prepare_corpus are the stage-in (local rules, common.smk): a hub model's
# snapshot and a hub corpus's files are downloaded there once into the Hugging Face cache, with the
# commit each resolved to; every later job reads them from the cache, offline.

import json


# Everything the jobs read from the hub, staged: `snakemake --cores 4 stage --configfile X.yaml`;
# the zero-shot tasks' datasets too (rule stage_zeroshot_tasks, workflow/rules/evaluate.smk).
rule stage:
    input:
        expand("results/models/{model}", model=plan.models),
        expand("results/corpora/{corpus}", corpus=plan.staged_corpora),
        [plan.staged_tasks] if plan.staged_tasks else [],


rule prepare_model:
    output:
        directory("results/models/{model}"),
    log:
        "results/logs/prepare_model/{model}.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    params:
        spec=lambda w: json.dumps(config["models"][w.model]),
    shell:
        "ptqrepro prepare-model --name {wildcards.model} --spec {params.spec:q} --out {output} > {log} 2>&1"


rule prepare_corpus:
    output:
        directory("results/corpora/{corpus}"),
    log:
        "results/logs/prepare_corpus/{corpus}.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    params:
        spec=lambda w: json.dumps(config.get("corpora", {}).get(w.corpus) or {}),
    shell:
        "ptqrepro prepare-corpus --name {wildcards.corpus} --spec {params.spec:q} --out {output} > {log} 2>&1"


rule calibrate:
    input:
        model="results/models/{model}",
        corpus="results/corpora/{corpus}",
    output:
        "results/calibration/{model}/{corpus}-n{nsamples}-l{seqlen}-s{seed}.pt",
    log:
        "results/logs/calibrate/{model}/{corpus}-n{nsamples}-l{seqlen}-s{seed}.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    params:
        tokenizer=config["calibration"]["tokenizer"],
    shell:
        OFFLINE_JOB
        + "ptqrepro calibrate --model {input.model} --corpus {input.corpus} --nsamples {wildcards.nsamples}"
        " --seqlen {wildcards.seqlen} --seed {wildcards.seed} --tokenizer {params.tokenizer} --out {output} > {log} 2>&1"
