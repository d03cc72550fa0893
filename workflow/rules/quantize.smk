# Stage 2: one job per (model, recipe, calibration seed); the recipe's steps run layer by layer. A
# reconstruction recipe (DWR) starts from its base recipe's artifact of the same seed, so the base
# is quantized once per seed. Each job
# saves every finished layer under results/checkpoints/ (deleted when it succeeds): killed and
# rerun (snakemake --rerun-incomplete), it resumes after its last finished layer.


def checkpoint_dir(wildcards):
    """Where a quantize or DWR job saves its finished layers."""
    return f"results/checkpoints/{wildcards.model}/{wildcards.recipe}/s{wildcards.seed}"


rule quantize:
    wildcard_constraints:
        recipe=one_of(QUANTIZATIONS),
    input:
        model="results/models/{model}",
        calibration=CALIBRATION_FILE,
    output:
        artifact=quantized_artifact(f"results/quantized/{RUN_DIR}"),
        metrics=f"results/metrics/{RUN_DIR}/quantize.json",
    params:
        spec=lambda w: recipe_spec(w.recipe),
        device=config["device"],
        batch_size=CALIB["batch_size"],
        dtype=lambda w: calibration_dtype(config, w.recipe),
        checkpoints=checkpoint_dir,
    threads: rule_threads(config, "quantize")
    priority: longest_first
    resources:
        **rule_resources(config, "quantize"),
    log:
        f"results/logs/quantize/{RUN_DIR}.log",
    conda:
        CONDA_ENV
    shell:
        "{GPU_SLOT} {resources.gpu} {params.device} ptqrepro quantize --model {input.model} --calibration {input.calibration}"
        " --recipe {wildcards.recipe:q} --spec {params.spec:q} --device {params.device}"
        " --batch-size {params.batch_size} --dtype {params.dtype} --offload {config[calibration][offload]} --threads {threads}"
        " --out {output.artifact} --metrics {output.metrics}"
        " --checkpoint-dir {params.checkpoints:q} > {log} 2>&1"


rule dwr:
    wildcard_constraints:
        recipe=one_of(RECONSTRUCTIONS),
    input:
        model="results/models/{model}",
        base=lambda w: f"results/quantized/{w.model}/{config['recipes'][w.recipe]['base']}/s{w.seed}",
        calibration=CALIBRATION_FILE,
    output:
        artifact=quantized_artifact(f"results/quantized/{RUN_DIR}"),
        metrics=f"results/metrics/{RUN_DIR}/quantize.json",
    params:
        spec=lambda w: recipe_spec(w.recipe),
        device=config["device"],
        batch_size=CALIB["batch_size"],
        dtype=lambda w: calibration_dtype(config, w.recipe),
        checkpoints=checkpoint_dir,
    threads: rule_threads(config, "dwr")
    priority: longest_first
    resources:
        **rule_resources(config, "dwr"),
    log:
        f"results/logs/dwr/{RUN_DIR}.log",
    conda:
        CONDA_ENV
    shell:
        "{GPU_SLOT} {resources.gpu} {params.device} ptqrepro dwr --model {input.model} --base {input.base} --calibration {input.calibration}"
        " --recipe {wildcards.recipe:q} --spec {params.spec:q} --device {params.device}"
        " --batch-size {params.batch_size} --dtype {params.dtype} --offload {config[calibration][offload]} --threads {threads}"
        " --out {output.artifact} --metrics {output.metrics}"
        " --checkpoint-dir {params.checkpoints:q} > {log} 2>&1"
