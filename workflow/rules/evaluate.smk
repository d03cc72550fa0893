# Stage 3: perplexity of every quantized model on every evaluation corpus (GPTQ protocol).


rule eval_ppl:
    input:
        model="results/models/{model}",
        quantized="results/quantized/{model}/{recipe}",
        corpus="results/corpora/{dataset}",
    output:
        "results/metrics/{model}/{recipe}/ppl-{dataset}.json",
    params:
        max_windows=f"--max-windows {PPL['max_windows']}" if PPL.get("max_windows") else "",
        device=config["device"],
    threads: config["threads"]
    resources:
        gpu=lambda w: int(config["device"] != "cpu"),
    log:
        "results/logs/eval_ppl/{model}/{recipe}/{dataset}.log",
    shell:
        "ptqrepro eval-ppl --model {input.model} --quantized {input.quantized} --corpus {input.corpus}"
        " --seqlen {PPL[seqlen]} {params.max_windows} --nsamples {PPL[nsamples]} --seed {PPL[seed]}"
        " --batch-size {PPL[batch_size]} --dtype {PPL[dtype]} --device {params.device} --threads {threads}"
        " --out {output} > {log} 2>&1"
