# Stage 1: models, corpora and calibration windows, each made once and shared by every method.

import json


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
        "ptqrepro calibrate --model {input.model} --corpus {input.corpus} --nsamples {wildcards.nsamples}"
        " --seqlen {wildcards.seqlen} --seed {wildcards.seed} --tokenizer {params.tokenizer} --out {output} > {log} 2>&1"
