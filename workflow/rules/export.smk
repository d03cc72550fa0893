# Export, on request only (not part of `rule all`): a quantized model as a Hugging Face model
# directory that transformers and vLLM load, e.g.
#
#   snakemake --cores 1 results/export/smollm2-135m/rtn@int4-g64/s0/compressed-tensors
#
# {format}: compressed-tensors (the integer codes packed, with their scales and zero points) or
# dequantized (float weights, any recipe); what each holds and refuses: ptqrepro.export.hf_directory. A recipe
# with activation quantization is refused (see its log); `ptqrepro export
# --drop-activation-quantization` by hand exports its weights alone.


rule export:
    input:
        model="results/models/{model}",
        quantized=f"results/quantized/{RUN_DIR}",
    output:
        directory(f"results/export/{RUN_DIR}/{{format}}"),
    log:
        f"results/logs/export/{RUN_DIR}/{{format}}.log",
    wildcard_constraints:
        format="compressed-tensors|dequantized",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    shell:
        OFFLINE_JOB
        + "ptqrepro export --model {input.model} --quantized {input.quantized} --format {wildcards.format} --out {output} > {log} 2>&1"


# Exports that vLLM serves, on request only (`snakemake export_vllm`, config `export_vllm`): each
# recipe exported for vLLM's CPU build (`--target vllm-cpu`: what it cannot compute is refused at
# export, naming what it can), our perplexity evaluation repeated in vLLM's dtype, and vLLM (its
# own environment, `export_vllm.python` or $PTQ_VLLM_PYTHON) scoring the first windows of the same
# protocol: results/export/<model>/<recipe>/s<seed>/vllm-check.md, with vLLM's version.


rule export_for_vllm:
    input:
        model="results/models/{model}",
        quantized=f"results/quantized/{RUN_DIR}",
    output:
        directory(f"results/export/{RUN_DIR}/vllm-cpu"),
    log:
        f"results/logs/export/{RUN_DIR}/vllm-cpu.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    shell:
        "ptqrepro export --model {input.model} --quantized {input.quantized} --format compressed-tensors"
        " --target vllm-cpu --out {output} > {log} 2>&1"


rule eval_ppl_vllm_dtype:
    input:
        model="results/models/{model}",
        quantized=f"results/quantized/{RUN_DIR}",
        corpus="results/corpora/{dataset}",
    output:
        f"results/export/{RUN_DIR}/vllm-reference-ppl-{{dataset}}.json",
    log:
        f"results/logs/export/{RUN_DIR}/vllm-reference-ppl-{{dataset}}.log",
    conda:
        CONDA_ENV
    threads: rule_threads(config, "eval_ppl")
    resources:
        **rule_resources(config, "eval_ppl"),
    params:
        max_windows=f"--max-windows {PPL['max_windows']}" if PPL.get("max_windows") else "",
        protocol={
            **{key: PPL[key] for key in ("seqlen", "nsamples", "seed", "batch_size")},
            "dtype": config["export_vllm"]["dtype"],
        },
    shell:
        "ptqrepro eval-ppl --model {input.model} --quantized {input.quantized} --corpus {input.corpus}"
        " --seqlen {params.protocol[seqlen]} {params.max_windows} --nsamples {params.protocol[nsamples]} --seed {params.protocol[seed]}"
        " --batch-size {params.protocol[batch_size]} --dtype {params.protocol[dtype]} --device cpu --threads {threads}"
        " --out {output} > {log} 2>&1"


rule vllm_check:
    input:
        exported=f"results/export/{RUN_DIR}/vllm-cpu",
        result=f"results/export/{RUN_DIR}/vllm-reference-ppl-{plan.vllm_dataset}.json",
        corpus=f"results/corpora/{plan.vllm_dataset}",
    output:
        table=f"results/export/{RUN_DIR}/vllm-check.md",
        record=f"results/export/{RUN_DIR}/vllm-check.json",
    log:
        run=f"results/logs/export/{RUN_DIR}/vllm-check.log",
        vllm=f"results/logs/export/{RUN_DIR}/vllm-check-vllm.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    params:
        python=f"--vllm-python {config['export_vllm']['python']}" if config["export_vllm"].get("python") else "",
        windows=config["export_vllm"]["windows"],
        dtype=config["export_vllm"]["dtype"],
    shell:
        "ptqrepro vllm-check --exported {input.exported} --result {input.result} --corpus {input.corpus}"
        " {params.python} --windows {params.windows} --dtype {params.dtype} --log {log.vllm}"
        " --out {output.table} > {log.run} 2>&1"


if plan.vllm_runs:

    rule export_vllm:
        input:
            [f"results/export/{model}/{recipe}/s{seed}/vllm-check.md" for model, recipe, seed in plan.vllm_runs],

else:

    rule export_vllm:
        log:
            "results/logs/export/export_vllm.log",
        conda:
            CONDA_ENV
        shell:
            "echo 'snakemake export_vllm: no recipe to check (config export_vllm.recipes is empty or names none)'"
            " | tee {log}"
