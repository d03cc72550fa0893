"""What the workflow runs for a config: each recipe parsed once, its jobs (one per model, recipe and
calibration seed), and the files each target of ``snakemake`` asks for.

``build_plan(config)`` reads a config that has passed ``config.check_config`` and carries the
schema's defaults (``workflow/rules/common.smk`` builds the plan once, after those checks); the
rules read the ``Plan`` it returns. It needs no Snakemake, so tests plan configs directly.

Where the results go (``RUN_DIR`` below the results folders)::

    results/quantized/<model>/<recipe>/s<seed>/           the quantize or dwr job's artifact
    results/metrics/<model>/<recipe>/s<seed>/*.json       its quantize record and evaluations
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ptqrepro.checks.config import calibration_dtype, recipe_calibrates, recipe_job_spec, recipe_seeds, zeroshot_export_format
from ptqrepro.eval.zeroshot import hub_tasks, staged_key
from ptqrepro.eval.zeroshot_vllm import VLLM, export_folder
from ptqrepro.peers import toolkit
from ptqrepro.peers.recipes import is_peer
from ptqrepro.recipe.recipes import is_reconstruction, recipe_from_config, reconstruction_from_config
from ptqrepro.report.claims import claims_from_config

RUN_DIR = "{model}/{recipe}/s{seed}"
"""Where a (model, recipe, seed) job's artifact and results go; {seed} is the calibration seed."""

Run = tuple[str, str, int]
"""(model, recipe, calibration seed): one quantize or dwr job and its evaluations."""

LOW_RANK_STEPS = frozenset({"lqer", "l2qer"})
"""Steps whose recipes the ``lqer_ranks`` figure compares."""


@dataclass(frozen=True)
class RecipePlan:
    """One recipe of the DAG, its entry parsed once.

    ``kind``: ``quantization`` (our steps, rule quantize), ``reconstruction`` (DWR's search on the
    artifact of recipe ``base``, rule dwr) or ``peer`` (a toolkit runs recipe ``mirrors``, rule
    quantize; ``ptqrepro.peers``)."""

    name: str
    kind: str
    spec: dict
    """What its job reads as ``--spec`` (``config.recipe_job_spec``)."""
    models: tuple[str, ...]
    """Every model, unless its entry lists ``models``."""
    seeds: tuple[int, ...]
    """Its calibration seeds, one job each (``config.recipe_seeds``)."""
    calibrates: bool
    """Whether its job reads calibration windows (``config.recipe_calibrates``)."""
    calibration_dtype: str
    steps: frozenset[str]
    """The names of its steps (our quantization recipes; empty for the others)."""
    priority: int
    """Its job's scheduling priority (``job_priorities``)."""
    base: str | None = None
    mirrors: str | None = None


@dataclass(frozen=True)
class Plan:
    """The jobs and targets of one config (``build_plan``); lists keep the config's order."""

    models: tuple[str, ...]
    recipes: dict[str, RecipePlan]
    """The recipes in the DAG: every recipe of the config but the peer recipes whose toolkit is not
    installed (``skipped_peers``)."""
    skipped_peers: dict[str, str]
    """Peer recipe -> why it is left out of the DAG."""
    runs: tuple[tuple[str, str], ...]
    """(model, recipe) pairs, recipe by recipe."""
    seeded_runs: tuple[Run, ...]
    reported: tuple[str, ...]
    """The recipes of the report (rule all): all but the peer recipes (`snakemake peers`), unless a
    claim names them."""
    zeroshot_runs: tuple[Run, ...]
    """Scored zero-shot: ``eval.zeroshot.recipes`` (else every reported recipe) on
    ``eval.zeroshot.models`` (else every model), at each recipe's first seed."""
    staged_corpora: tuple[str, ...]
    """The corpora the jobs read: calibration, perplexity, local zero-shot tasks."""
    calibration_file: str
    """The calibration windows of a model and seed: a pattern with ``{model}`` and ``{seed}``."""
    ppl_datasets: tuple[str, ...]
    zeroshot: dict
    """``eval.zeroshot`` ({} where the config scores no zero-shot task)."""
    local_tasks_dir: str | None
    """The local zero-shot tasks' folder (rule zeroshot_tasks), where a corpus generates them."""
    hub_tasks: tuple[str, ...]
    staged_tasks: str | None
    """The staging record of the hub tasks (rule stage_zeroshot_tasks), where there are any."""
    averages: dict[str, dict[str, str]]
    """``eval.zeroshot.averages`` with each task's reported metric, where zero-shot runs."""
    zeroshot_exports: dict[str, str]
    """With ``eval.zeroshot.backend: vllm``: each zero-shot recipe's export folder that lm-eval's
    vllm model evaluates (``checks.config.zeroshot_export_format``); {} with the hf backend."""
    vllm_recipes: tuple[str, ...]
    paper_tables: bool
    """Whether the config names papers' tables (``reference``)."""

    def of_kind(self, *kinds: str) -> list[str]:
        return [name for name, recipe in self.recipes.items() if recipe.kind in kinds]

    @property
    def quantizations(self) -> list[str]:
        """The recipes of rule quantize: ours and the peers'."""
        return self.of_kind("quantization", "peer")

    @property
    def reconstructions(self) -> list[str]:
        return self.of_kind("reconstruction")

    @property
    def peers(self) -> list[str]:
        return self.of_kind("peer")

    @property
    def zeroshot_recipes(self) -> list[str]:
        return sorted({recipe for _, recipe, _ in self.zeroshot_runs})

    @property
    def magr_runs(self) -> list[tuple[str, str]]:
        """(model, recipe) pairs of the recipes with a MagR step (rule plot_magr)."""
        return [(model, recipe) for model, recipe in self.runs if "magr" in self.recipes[recipe].steps]

    @property
    def table_figures(self) -> list[str]:
        """The figures drawn from the tables (``ptqrepro plots --figure``)."""
        low_rank = any(recipe.steps & LOW_RANK_STEPS for recipe in self.recipes.values())
        return [
            "ppl_vs_bits",
            *(["accuracy_vs_bits"] if self.zeroshot_runs else []),
            *(["lqer_ranks"] if low_rank else []),
            "job_costs",
        ]

    @property
    def peer_runs(self) -> list[Run]:
        return [run for run in self.seeded_runs if run[1] in self.peers]

    @property
    def mirrored_runs(self) -> list[Run]:
        """The runs of the recipes the peer recipes mirror, at the same models and seeds."""
        return sorted({(model, self.recipes[recipe].mirrors, seed) for model, recipe, seed in self.peer_runs})

    @property
    def vllm_runs(self) -> list[Run]:
        """The runs that `snakemake export_vllm` exports and scores in vLLM."""
        return [run for run in self.seeded_runs if run[1] in self.vllm_recipes]

    @property
    def vllm_dataset(self) -> str:
        """The dataset whose windows vLLM scores: the first perplexity dataset."""
        return self.ppl_datasets[0]

    def metric_option(self) -> str:
        """``--metric TASK=METRIC ...`` for the zero-shot tasks whose reported accuracy is not acc."""
        metrics = " ".join(f"{task}={metric}" for task, metric in self.zeroshot.get("metrics", {}).items())
        return f"--metric {metrics}" if metrics else ""

    def zeroshot_export(self, model: str, recipe: str, seed) -> str | list:
        """The export of a zero-shot run that vLLM evaluates (none, [], for the hf backend)."""
        folder = self.zeroshot_exports.get(recipe)
        return f"results/export/{model}/{recipe}/s{seed}/{folder}" if folder else []

    def zeroshot_backend_options(self) -> str:
        """The eval-zeroshot options of the vllm backend, with ``{input.exported}`` and ``{log}``
        left for the rule's shell ("" for the hf backend)."""
        if not self.zeroshot_exports:
            return ""
        python = self.zeroshot.get("vllm_python")
        return " --backend vllm --exported {input.exported}" + (f" --vllm-python {python}" if python else "") + " --vllm-log {log}.vllm"

    def zeroshot_protocol(self) -> dict:
        """The zero-shot jobs' protocol param: the backend only where it is vllm, so that results
        of the hf backend keep their params (and do not rerun)."""
        protocol = {key: self.zeroshot[key] for key in ("batch_size", "max_length", "dtype", "num_fewshot")}
        return {**protocol, "backend": VLLM} if self.zeroshot_exports else protocol

    def first_seed(self, recipe: str) -> int:
        return self.recipes[recipe].seeds[0]

    def result_files(self, runs, *names: str) -> list[str]:
        """``results/metrics/<run>/<name>.json`` of each run, run by run."""
        return [f"results/metrics/{model}/{recipe}/s{seed}/{name}.json" for model, recipe, seed in runs for name in names]

    def table_inputs(self) -> list[str]:
        """The result files of rule tables: every reported run's quantize record and perplexities,
        then the zero-shot results."""
        reported = [run for run in self.seeded_runs if run[1] in self.reported]
        return [
            *self.result_files(reported, "quantize"),
            *self.result_files(reported, *(f"ppl-{dataset}" for dataset in self.ppl_datasets)),
            *self.result_files(self.zeroshot_runs, *(f"zeroshot-{task}" for task in self.zeroshot.get("tasks", []))),
        ]

    def peers_table_inputs(self) -> list[str]:
        """The result files of rule peers_table: quantize records and perplexities of the peer runs
        and of the runs they mirror, then the peers' grid agreements."""
        runs = self.peer_runs + self.mirrored_runs
        return [
            *self.result_files(runs, "quantize"),
            *self.result_files(runs, *(f"ppl-{dataset}" for dataset in self.ppl_datasets)),
            *self.result_files(self.peer_runs, "agreement"),
        ]

    def targets(self) -> list[str]:
        """What ``snakemake`` (rule all) makes: the tables and claims, the papers' tables where the
        config names them, DWR's and MagR's figures, the tables' figures."""
        return [
            "results/tables/all.csv",
            "results/tables/all.md",
            "results/tables/claims.csv",
            "results/tables/claims.md",
            *(["results/tables/papers"] if self.paper_tables else []),
            *(f"results/plots/dwr/{model}/{recipe}.png" for model, recipe in self.runs if recipe in self.reconstructions),
            *(f"results/plots/magr/{model}/{recipe}.png" for model, recipe in self.magr_runs),
            *(f"results/plots/{figure}.{extension}" for figure in self.table_figures for extension in ("png", "pdf")),
        ]


def installed_toolkit(name: str) -> str | None:
    """Why peer toolkit ``name`` cannot run here, or None (``peers.Toolkit.missing``)."""
    return toolkit(name).missing()


def build_plan(config: dict, missing_toolkit: Callable[[str], str | None] = installed_toolkit) -> Plan:
    """The plan of a checked config; ``missing_toolkit(name)`` says why a peer toolkit cannot run
    here (its recipes are then left out), or None."""
    entries = config["recipes"]
    skipped = {name: missing_toolkit(entry["toolkit"]) for name, entry in entries.items() if is_peer(entry)}
    skipped = {name: why for name, why in skipped.items() if why}
    names = [name for name in entries if name not in skipped]
    specs = {name: recipe_job_spec(config, name) for name in names}
    kinds = {
        name: "reconstruction" if is_reconstruction(entries[name]) else "peer" if is_peer(entries[name]) else "quantization"
        for name in names
    }
    parsed = {name: recipe_from_config(name, specs[name]) for name in names if kinds[name] == "quantization"}
    calibrates = {name: recipe_calibrates(config, name, parsed.get(name)) for name in names}
    priorities = job_priorities(config, specs, kinds, parsed)
    models = tuple(config["models"])
    recipes = {
        name: RecipePlan(
            name=name,
            kind=kinds[name],
            spec=specs[name],
            models=tuple(entries[name].get("models", models)),
            seeds=tuple(recipe_seeds(config, name, calibrates.__getitem__)),
            calibrates=calibrates[name],
            calibration_dtype=calibration_dtype(config, name),
            steps=frozenset(step.name for step in parsed[name].steps) if name in parsed else frozenset(),
            priority=priorities[name],
            base=entries[name].get("base") if kinds[name] == "reconstruction" else None,
            mirrors=specs[name]["mirrors"] if kinds[name] == "peer" else None,
        )
        for name in names
    }
    runs = tuple((model, name) for name in names for model in recipes[name].models)
    seeded_runs = tuple((model, name, seed) for model, name in runs for seed in recipes[name].seeds)
    claimed = {name for claim in claims_from_config(config["claims"]) for name in claim.recipes}
    reported = tuple(name for name in names if kinds[name] != "peer" or name in claimed)
    zeroshot = config["eval"].get("zeroshot") or {}
    zeroshot_runs = (
        tuple(
            (model, name, recipes[name].seeds[0])
            for model, name in runs
            if name in (zeroshot.get("recipes") or reported) and model in (zeroshot.get("models") or models)
        )
        if zeroshot
        else ()
    )
    calibration = config["calibration"]
    ppl = config["eval"]["ppl"]
    corpus = zeroshot.get("corpus")
    hub = tuple(hub_tasks(zeroshot["tasks"])) if zeroshot else ()
    return Plan(
        models=models,
        recipes=recipes,
        skipped_peers=skipped,
        runs=runs,
        seeded_runs=seeded_runs,
        reported=reported,
        zeroshot_runs=zeroshot_runs,
        staged_corpora=tuple(sorted({calibration["corpus"], *ppl["datasets"], *([corpus] if corpus else [])})),
        calibration_file="results/calibration/{model}/"
        + "{corpus}-n{nsamples}-l{seqlen}-s".format(**calibration)
        + "{seed}.pt",
        ppl_datasets=tuple(ppl["datasets"]),
        zeroshot=zeroshot,
        local_tasks_dir="results/zeroshot/{corpus}-n{items}-s{seed}".format(**zeroshot) if corpus else None,
        hub_tasks=hub,
        staged_tasks=f"results/zeroshot/staged-{staged_key(list(hub))}.json" if hub else None,
        averages=(
            {name: {task: zeroshot["metrics"].get(task, "acc") for task in tasks} for name, tasks in zeroshot["averages"].items()}
            if zeroshot and zeroshot["averages"] and zeroshot_runs
            else {}
        ),
        zeroshot_exports=(
            {name: export_folder(zeroshot_export_format(config, name)) for name in {recipe for _, recipe, _ in zeroshot_runs}}
            if zeroshot.get("backend") == VLLM
            else {}
        ),
        vllm_recipes=tuple(config["export_vllm"]["recipes"]),
        paper_tables=bool(config["reference"]),
    )


def job_priorities(config: dict, specs: dict, kinds: dict, parsed: dict) -> dict[str, int]:
    """Each recipe's job priority, longest chains first: 1 + 10 x (its job's rough run time in
    calibration passes, ``Recipe.relative_cost`` / ``DwrSettings.relative_cost``; a peer's that of
    the recipe it mirrors, plus that of the DWR searches that wait on its artifact), rounded; the
    evaluations (priority 0) fill the end."""
    nsamples = config["calibration"]["nsamples"]
    cost = {name: parsed[name].relative_cost() for name in parsed}
    for name, kind in kinds.items():
        if kind == "reconstruction":
            cost[name] = reconstruction_from_config(name, specs[name]).settings.relative_cost(nsamples)
        elif kind == "peer":
            cost[name] = cost[specs[name]["mirrors"]]
    waiting = {name: [other for other in specs if kinds[other] == "reconstruction" and specs[other]["base"] == name] for name in specs}
    return {name: 1 + round(10 * sum(cost[other] for other in [name, *waiting[name]])) for name in specs}
