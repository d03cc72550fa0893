"""What each Snakemake job asks of a scheduler: GPUs, CPUs, memory and wall time from the config's
``resources``, and the SLURM partition and account from the environment or the config's ``slurm``.

The rules read these through :func:`rule_resources` and :func:`rule_threads`, under the names
Snakemake and snakemake-executor-plugin-slurm read: ``gpu`` (``sbatch --gpus=N``; locally the pool
that ``--resources gpu=N`` bounds), ``gpu_model`` (``--gpus=MODEL:N``), ``mem_mb`` (``--mem``),
``runtime`` in minutes (``--time``), ``slurm_partition`` (``-p``), ``slurm_account`` (``-A``), and
the job's threads (``--cpus-per-task``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

GPU_RULES = ("quantize", "dwr", "eval_ppl", "eval_zeroshot")
"""The rules that compute on the model (on ``device``); every other rule asks for no GPU."""

OTHER = "other"
"""The ``resources`` entry of every other rule: data preparation, tables, claims and plots."""

SIZED = ("mem_mb", "runtime")
"""Resources Snakemake converts (a size, a duration): a job has one only where its rule's entry
sets it, since a function of the wildcards cannot answer "unset" for them."""

GROUPED_EVALUATIONS = ("eval_ppl", "eval_zeroshot")
"""The rules of one quantized model's evaluation group: one submission, so one GPU model."""

ENVIRONMENT = {"partition": "SBATCH_PARTITION", "account": "SBATCH_ACCOUNT"}
"""The variables (those ``sbatch`` itself reads) that win over the config's ``slurm`` entry."""


def job_request(config: dict, rule: str, model: str | None = None) -> dict:
    """The rule's request for one model: ``gpus``, ``gpu_model``, ``cpus``, ``mem_mb``, ``runtime``
    (``None`` where the config leaves it to the executor). The rule's entry, overridden by
    ``resources.by_model.<model>.<rule>``; ``gpus`` 1 unless set, and 0 where ``device`` is ``cpu``;
    ``cpus`` is ``threads`` unless set; every other rule runs on one CPU without a GPU."""
    gpu_rule = rule in GPU_RULES
    entry = dict(_entry(config, rule))
    if gpu_rule and model is not None:
        entry.update(_by_model(config).get(model, {}).get(rule) or {})
    gpus = entry.get("gpus", 1) if gpu_rule and config["device"] != "cpu" else 0
    return {
        "gpus": gpus,
        "gpu_model": entry.get("gpu_model") if gpus else None,
        "cpus": entry.get("cpus", config["threads"]) if gpu_rule else 1,
        "mem_mb": entry.get("mem_mb"),
        "runtime": entry.get("runtime"),
    }


def slurm_target(config: dict, environ: Mapping[str, str] | None = None) -> dict:
    """``slurm_partition`` and ``slurm_account`` for every job: ``SBATCH_PARTITION`` /
    ``SBATCH_ACCOUNT`` where set and not empty, else ``slurm.partition`` / ``slurm.account``;
    neither: absent, and the plugin falls back to the cluster's default partition and account."""
    environ = os.environ if environ is None else environ  # the environment at the call, not at import
    slurm = config.get("slurm") or {}
    target = {}
    for key, variable in ENVIRONMENT.items():
        value = environ.get(variable) or slurm.get(key)
        if value:
            target[f"slurm_{key}"] = value
    return target


def rule_resources(config: dict, rule: str, environ: Mapping[str, str] | None = None) -> dict:
    """The ``resources:`` of a rule as Snakemake keyword arguments, functions of the job's wildcards
    (its ``model``, where it has one): ``gpu`` and ``gpu_model`` for the GPU rules (``None``, so
    absent, without a GPU model), ``mem_mb`` and ``runtime`` where the rule's entry sets them (else
    the executor's defaults), and the partition and account."""
    environ = os.environ if environ is None else environ  # the environment at the call, not at import

    def resource(key: str) -> Callable:
        return lambda wildcards: job_request(config, rule, getattr(wildcards, "model", None))[key]

    names = {"gpu": "gpus", "gpu_model": "gpu_model"} if rule in GPU_RULES else {}
    names |= {key: key for key in SIZED if key in _entry(config, rule)}
    return {**{name: resource(key) for name, key in names.items()}, **slurm_target(config, environ)}


def rule_threads(config: dict, rule: str) -> Callable:
    """The ``threads:`` of a GPU rule: its ``cpus`` for the job's model (the job's torch threads and,
    on SLURM, its ``--cpus-per-task``)."""
    return lambda wildcards: job_request(config, rule, getattr(wildcards, "model", None))["cpus"]


def resource_errors(config: dict) -> list[str]:
    """What the schema cannot see, one message each: ``resources.by_model`` naming a model the config
    does not have, or setting a size or time that its rule's own entry leaves unset; and the
    evaluations of one quantized model (one submission) asking for different GPU models."""
    by_model = _by_model(config)
    unknown = sorted(set(by_model) - set(config["models"]))
    errors = [f"resources.by_model: {', '.join(unknown)} not in the config's models"] if unknown else []
    errors += [
        f"resources.by_model.{model}.{rule}.{key}: set resources.{rule}.{key} too, the value for the other models"
        for model, rules in by_model.items() for rule, entry in rules.items()
        for key in SIZED if key in (entry or {}) and key not in _entry(config, rule)
    ]
    if not config["eval"].get("zeroshot"):
        return errors
    for model in config["models"]:
        gpu_models = {rule: job_request(config, rule, model)["gpu_model"] for rule in GROUPED_EVALUATIONS}
        if len(set(gpu_models.values())) > 1:
            errors.append(
                f"resources: eval_ppl and eval_zeroshot of model {model!r} ask for GPU models "
                f"{gpu_models['eval_ppl']!r} and {gpu_models['eval_zeroshot']!r}, but the evaluations "
                "of one quantized model run as one submission: give them the same gpu_model"
            )
    return errors


def _entry(config: dict, rule: str) -> dict:
    """The rule's own entry of ``resources`` (``other`` for the rules without a GPU)."""
    return (config.get("resources") or {}).get(rule if rule in GPU_RULES else OTHER) or {}


def _by_model(config: dict) -> dict:
    return (config.get("resources") or {}).get("by_model") or {}
