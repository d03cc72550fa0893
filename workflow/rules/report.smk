# Stage 4: every result JSON gathered into one tidy table and a Markdown table; the claims, the
# papers' tables and the figures.

import json
import shlex


rule tables:
    input:
        plan.table_inputs(),
    output:
        csv=report("results/tables/all.csv", caption="../report/all_csv.rst", category="Tables"),
        md="results/tables/all.md",
        replicates="results/tables/replicates.csv",
        windows="results/tables/windows.csv",
    log:
        "results/logs/tables.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    params:
        bootstrap=BOOTSTRAP,
        # eval.zeroshot.averages with each task's reported metric: {name: {task: acc|acc_norm}}
        averages=f"--averages {shlex.quote(json.dumps(plan.averages))}" if plan.averages else "",
    shell:
        "ptqrepro tables --out results/tables {params.bootstrap} {params.averages} {input} > {log} 2>&1"


rule plot_table_figure:
    input:
        # the cost of every job, one bar per result file: the per-seed table
        lambda w: "results/tables/replicates.csv" if w.figure == "job_costs" else "results/tables/all.csv",
    output:
        png=report("results/plots/{figure}.png", caption="../report/table_figure.rst", category="Figures"),
        pdf="results/plots/{figure}.pdf",
    log:
        "results/logs/plot_{figure}.log",
    wildcard_constraints:
        figure=one_of(plan.table_figures),
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    shell:
        "ptqrepro plots --table {input} --figure {wildcards.figure} --out results/plots/{wildcards.figure} > {log} 2>&1"


rule claims:
    input:
        table="results/tables/all.csv",
        windows="results/tables/windows.csv",
    output:
        csv=report("results/tables/claims.csv", caption="../report/claims.rst", category="Tables"),
        md="results/tables/claims.md",
    log:
        "results/logs/claims.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    params:
        claims=json.dumps(config["claims"]),
        bootstrap=BOOTSTRAP,
    shell:
        "ptqrepro claims --table {input.table} --windows {input.windows} --claims {params.claims:q} {params.bootstrap}"
        " --out results/tables > {log} 2>&1"


rule paper_tables:
    input:
        table="results/tables/all.csv",
        reference=config["reference"],
    output:
        report(
            directory("results/tables/papers"),
            caption="../report/paper_tables.rst",
            category="Tables",
            patterns=["{paper}.md"],
        ),
    log:
        "results/logs/paper_tables.log",
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    shell:
        "ptqrepro paper-tables --table {input.table} --reference {input.reference} --out {output} > {log} 2>&1"


rule plot_dwr:
    input:
        # the search of the recipe's first calibration seed
        lambda w: f"results/metrics/{w.model}/{w.recipe}/s{plan.first_seed(w.recipe)}/quantize.json",
    output:
        png=report("results/plots/dwr/{model}/{recipe}.png", caption="../report/dwr.rst", category="Figures"),
        pdf="results/plots/dwr/{model}/{recipe}.pdf",
    log:
        "results/logs/plot_dwr/{model}/{recipe}.log",
    wildcard_constraints:
        recipe=one_of(plan.reconstructions),
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    shell:
        "ptqrepro plots --dwr {input} --out results/plots/dwr/{wildcards.model}/{wildcards.recipe} > {log} 2>&1"


rule plot_magr:
    input:
        # MagR's records of the recipe's first calibration seed
        lambda w: f"results/metrics/{w.model}/{w.recipe}/s{plan.first_seed(w.recipe)}/quantize.json",
    output:
        png=report("results/plots/magr/{model}/{recipe}.png", caption="../report/magr.rst", category="Figures"),
        pdf="results/plots/magr/{model}/{recipe}.pdf",
    log:
        "results/logs/plot_magr/{model}/{recipe}.log",
    wildcard_constraints:
        recipe=one_of([recipe for _, recipe in plan.magr_runs]),
    conda:
        CONDA_ENV
    resources:
        **OTHER_RESOURCES,
    shell:
        "ptqrepro plots --magr {input} --out results/plots/magr/{wildcards.model}/{wildcards.recipe} > {log} 2>&1"
