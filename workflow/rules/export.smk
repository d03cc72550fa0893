# Export, on request only (not part of `rule all`): a quantized model as a Hugging Face model
# directory that transformers and vLLM load, e.g.
#
#   snakemake --cores 1 results/export/smollm2-135m/rtn@int4-g64/s0/compressed-tensors
#
# {format}: compressed-tensors (the integer codes packed, with their scales and zero points) or
# dequantized (float weights, any recipe); what each holds and refuses: ptqrepro.export. A recipe
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
        OFFLINE_JOB + "ptqrepro export --model {input.model} --quantized {input.quantized} --format {wildcards.format}"
        " --out {output} > {log} 2>&1"
