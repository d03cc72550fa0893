# Stage 3: perplexity of every quantized model on every evaluation corpus (GPTQ protocol).

from ptqrepro.eval.zeroshot import staged_key

# The evaluations of one quantized model (perplexity on every dataset, zero-shot) form one group: on
# a cluster they run as one submission, one after another on one GPU (profiles/slurm merges the
# group's jobs with `group-components` and gives each submission the pool `gpu=1`).
EVALUATION_GROUP = "eval_{model}_{recipe}_s{seed}"


# The float model's top-k next-token log-probabilities on a dataset's test windows, once per model
# and dataset: every recipe's KL divergence and flips are computed from them (ptqrepro.eval.divergence).
rule float_reference:
    input:
        model="results/models/{model}",
        corpus="results/corpora/{dataset}",
    output:
        "results/reference/{model}/{dataset}.safetensors",
    log:
        "results/logs/float_reference/{model}/{dataset}.log",
    conda:
        CONDA_ENV
    threads: rule_threads(config, "eval_ppl")
    resources:
        **rule_resources(config, "eval_ppl"),
        placement=config["eval"]["placement"],
        # the command's device, as a resource: the param records its class (device_class)
        device=config["device"],
    params:
        max_windows=f"--max-windows {PPL['max_windows']}" if PPL.get("max_windows") else "",
        protocol={
            key: PPL[key] for key in ("seqlen", "nsamples", "seed", "tokenizer", "batch_size", "dtype", "kld_top_k")
        },
        device=lambda w: device_class(),
    shell:
        OFFLINE_JOB
        + "ptqrepro-gpu-slot {resources.gpu} {resources.device} ptqrepro float-reference --model {input.model} --corpus {input.corpus}"
        " --seqlen {params.protocol[seqlen]} {params.max_windows} --nsamples {params.protocol[nsamples]} --seed {params.protocol[seed]}"
        " --tokenizer {params.protocol[tokenizer]}"
        " --batch-size {params.protocol[batch_size]} --dtype {params.protocol[dtype]} --device {resources.device} --placement {resources.placement}"
        " --threads {threads} --top-k {params.protocol[kld_top_k]}"
        " --out {output} > {log} 2>&1"


rule eval_ppl:
    input:
        model="results/models/{model}",
        quantized=f"results/quantized/{RUN_DIR}",
        corpus="results/corpora/{dataset}",
        reference="results/reference/{model}/{dataset}.safetensors",
    output:
        f"results/metrics/{RUN_DIR}/ppl-{{dataset}}.json",
    log:
        f"results/logs/eval_ppl/{RUN_DIR}/{{dataset}}.log",
    group:
        EVALUATION_GROUP
    conda:
        CONDA_ENV
    threads: rule_threads(config, "eval_ppl")
    resources:
        **rule_resources(config, "eval_ppl"),
        # a resource, not a param: where the layers are changes no result (common.smk)
        placement=config["eval"]["placement"],
        # the command's device; the param records its class, as in the quantize rule
        device=config["device"],
    params:
        max_windows=f"--max-windows {PPL['max_windows']}" if PPL.get("max_windows") else "",
        protocol={key: PPL[key] for key in ("seqlen", "nsamples", "seed", "tokenizer", "batch_size", "dtype")},
        device=lambda w: device_class(),
    shell:
        OFFLINE_JOB
        + "ptqrepro-gpu-slot {resources.gpu} {resources.device} ptqrepro eval-ppl --model {input.model} --quantized {input.quantized} --corpus {input.corpus}"
        " --seqlen {params.protocol[seqlen]} {params.max_windows} --nsamples {params.protocol[nsamples]} --seed {params.protocol[seed]} --tokenizer {params.protocol[tokenizer]}"
        " --batch-size {params.protocol[batch_size]} --dtype {params.protocol[dtype]} --device {resources.device} --placement {resources.placement}"
        " --threads {threads} --reference {input.reference}"
        " --out {output} > {log} 2>&1"


# Zero-shot accuracy through lm-eval-harness on the in-memory quantized model (one job per model
# and recipe, one result and one per-item file per task). Local tasks are generated from a corpus's
# test split (plan.local_tasks_dir); hub tasks are staged once on the submit host (their datasets
# prepared where the network is: plan.staged_tasks) before any GPU job reads them.


rule zeroshot_tasks:
    input:
        corpus="results/corpora/{corpus}",
    output:
        directory("results/zeroshot/{corpus}-n{nitems}-s{seed}"),
    log:
        "results/logs/zeroshot_tasks/{corpus}-n{nitems}-s{seed}.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    shell:
        "ptqrepro zeroshot-tasks --corpus {input.corpus} --items {wildcards.nitems} --seed {wildcards.seed}"
        " --out {output} > {log} 2>&1"


# On the submit host (a local rule), where the network is: builds each hub task once, so that
# `datasets` prepares the cache the (offline) GPU jobs read; records what each task resolved.
rule stage_zeroshot_tasks:
    output:
        "results/zeroshot/staged-{key}.json",
    log:
        "results/logs/stage_zeroshot_tasks/{key}.log",
    wildcard_constraints:
        key=staged_key(list(plan.hub_tasks)),
    localrule: True
    conda:
        CONDA_ENV
    params:
        tasks=" ".join(plan.hub_tasks),
        metrics=plan.metric_option(),
    shell:
        "ptqrepro stage-tasks --tasks {params.tasks} {params.metrics} --out {output} > {log} 2>&1"


if plan.zeroshot:

    rule eval_zeroshot:
        input:
            model="results/models/{model}",
            quantized=f"results/quantized/{RUN_DIR}",
            tasks=[plan.local_tasks_dir] if plan.local_tasks_dir else [],
            staged=[plan.staged_tasks] if plan.staged_tasks else [],
            exported=lambda w: plan.zeroshot_export(w.model, w.recipe, w.seed),
        output:
            [f"results/metrics/{RUN_DIR}/zeroshot-{task}.json" for task in plan.zeroshot["tasks"]],
            [f"results/metrics/{RUN_DIR}/zeroshot-{task}.items.csv" for task in plan.zeroshot["tasks"]],
        log:
            f"results/logs/eval_zeroshot/{RUN_DIR}.log",
        wildcard_constraints:
            recipe=one_of(plan.zeroshot_recipes),
        group:
            EVALUATION_GROUP
        conda:
            CONDA_ENV
        threads: rule_threads(config, "eval_zeroshot")
        resources:
            **rule_resources(config, "eval_zeroshot"),
            # a resource, not a param: where the layers are changes no result (common.smk)
            placement=config["eval"]["placement"],
            # the command's device; the param records its class, as in the quantize rule
            device=config["device"],
        params:
            include=f"--include {plan.local_tasks_dir}" if plan.local_tasks_dir else "",
            staged=f"--staged {plan.staged_tasks}" if plan.staged_tasks else "",
            tasks=" ".join(plan.zeroshot["tasks"]),
            metrics=plan.metric_option(),
            limit=f"--limit {plan.zeroshot['limit']}" if plan.zeroshot.get("limit") else "",
            protocol=plan.zeroshot_protocol(),
            device=lambda w: device_class(),
            out_dir=lambda w, output: os.path.dirname(output[0]),
        shell:
            OFFLINE_JOB
            + "ptqrepro-gpu-slot {resources.gpu} {resources.device} ptqrepro eval-zeroshot --model {input.model} --quantized {input.quantized} --tasks {params.tasks}"
            " {params.include} {params.staged} {params.metrics} {params.limit} --num-fewshot {params.protocol[num_fewshot]}"
            " --batch-size {params.protocol[batch_size]} --max-length {params.protocol[max_length]}"
            " --dtype {params.protocol[dtype]} --device {resources.device} --placement {resources.placement} --threads {threads}"
            f"{plan.zeroshot_backend_options()} --out-dir {{params.out_dir}} > {{log}} 2>&1"
