# Stage 5, on demand (`snakemake peers`): the peer recipes (a toolkit runs one of our recipes,
# ptqrepro.peers) are quantized by the quantize rule and evaluated like ours; here each one's grids
# are compared with those of the recipe it mirrors, and the peers table laid out.


rule grid_agreement:
    input:
        peer=f"results/quantized/{RUN_DIR}",
        ours=lambda w: f"results/quantized/{w.model}/{plan.recipes[w.recipe].mirrors}/s{w.seed}",
    output:
        f"results/metrics/{RUN_DIR}/agreement.json",
    log:
        f"results/logs/grid_agreement/{RUN_DIR}.log",
    wildcard_constraints:
        recipe=one_of(plan.peers),
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    shell:
        "ptqrepro agreement --ours {input.ours} --peer {input.peer} --out {output} > {log} 2>&1"


rule peers_table:
    input:
        plan.peers_table_inputs(),
    output:
        csv=report("results/tables/peers.csv", caption="../report/peers.rst", category="Tables"),
        md="results/tables/peers.md",
    log:
        "results/logs/peers.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    params:
        bootstrap=BOOTSTRAP,
    shell:
        "ptqrepro peers --out results/tables {params.bootstrap} {input} > {log} 2>&1"


if plan.peer_runs:

    rule peers:
        input:
            rules.peers_table.output,

else:

    rule peers:
        run:
            print("snakemake peers: no peer recipe to run (none in the config, or their toolkits are not installed)")
