# Stage 2: one job per (model, recipe, calibration seed); the recipe's steps run layer by layer. A
# reconstruction recipe (DWR) starts from its base recipe's artifact of the same seed, so the base
# is quantized once per seed. Each job
# saves every finished layer under results/checkpoints/ (deleted when it succeeds): killed and
# rerun by the same command (profiles/default sets rerun-incomplete), it resumes after its last
# finished layer (docs/interrupted-runs.md).


rule quantize:
    input:
        model="results/models/{model}",
        # only where the recipe reads it: changing the calibration reruns no fp16, RTN or plain LQER job
        calibration=calibration_input,
    output:
        artifact=quantized_artifact(f"results/quantized/{RUN_DIR}"),
        metrics=f"results/metrics/{RUN_DIR}/quantize.json",
    log:
        f"results/logs/quantize/{RUN_DIR}.log",
    wildcard_constraints:
        recipe=one_of(plan.quantizations),
    priority: longest_first
    conda:
        CONDA_ENV
    threads: rule_threads(config, "quantize")
    resources:
        **rule_resources(config, "quantize"),
        # a resource, not a param: where the activations are changes no result (common.smk)
        offload=CALIB["offload"],
        device=config["device"],
    params:
        spec=lambda w: recipe_spec(w.recipe),
        device=lambda w: device_class(),
        # the calibration's file, batch size and dtype, for a recipe that calibrates
        calibration=calibration_arguments,
        checkpoints=checkpoint_dir,
    shell:
        OFFLINE_JOB
        + "ptqrepro-gpu-slot {resources.gpu} {resources.device} ptqrepro quantize --model {input.model} {params.calibration}"
        " --recipe {wildcards.recipe:q} --spec {params.spec:q} --device {resources.device}"
        " --offload {resources.offload} --threads {threads}"
        " --out {output.artifact} --metrics {output.metrics}"
        " --checkpoint-dir {params.checkpoints:q} > {log} 2>&1"


rule dwr:
    input:
        model="results/models/{model}",
        base=lambda w: f"results/quantized/{w.model}/{plan.recipes[w.recipe].base}/s{w.seed}",
        calibration=plan.calibration_file,
    output:
        artifact=quantized_artifact(f"results/quantized/{RUN_DIR}"),
        metrics=f"results/metrics/{RUN_DIR}/quantize.json",
    log:
        f"results/logs/dwr/{RUN_DIR}.log",
    wildcard_constraints:
        recipe=one_of(plan.reconstructions),
    priority: longest_first
    conda:
        CONDA_ENV
    threads: rule_threads(config, "dwr")
    resources:
        **rule_resources(config, "dwr"),
        # a resource, not a param: where the activations are changes no result (common.smk)
        offload=CALIB["offload"],
        device=config["device"],
    params:
        spec=lambda w: recipe_spec(w.recipe),
        device=lambda w: device_class(),
        batch_size=CALIB["batch_size"],
        dtype=lambda w: plan.recipes[w.recipe].calibration_dtype,
        checkpoints=checkpoint_dir,
    shell:
        OFFLINE_JOB
        + "ptqrepro-gpu-slot {resources.gpu} {resources.device} ptqrepro dwr --model {input.model} --base {input.base} --calibration {input.calibration}"
        " --recipe {wildcards.recipe:q} --spec {params.spec:q} --device {resources.device}"
        " --batch-size {params.batch_size} --dtype {params.dtype} --offload {resources.offload} --threads {threads}"
        " --out {output.artifact} --metrics {output.metrics}"
        " --checkpoint-dir {params.checkpoints:q} > {log} 2>&1"
