"""A paper config shrunk in sizes only, for a rehearsal on the tiny models of ``rehearsal.hub``.

Shrunk: calibration samples, sequence lengths and seeds (the first seed only), the evaluation's
windows and C4 documents, zero-shot items, DWR's ranks and search windows, LQER/L2QER ranks, the
memory each job asks of a scheduler (the local SLURM test node has a few GB, not 96) and each job's
threads (one: a tiny model gains nothing from more, and two jobs then run at once on two cores).
Kept: models (hub ids), corpora, recipes (methods, formats, steps and their other settings),
claims, references, resources other than memory and CPUs, `offline`, `device`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

NSAMPLES = 4
SEQLEN = 64
MAX_WINDOWS = 4
C4_EVAL_DOCUMENTS = 8
DWR_WINDOWS = 2
ZEROSHOT_ITEMS = 8
RANK_DIVISOR = 64
"""A rank r becomes max(1, r // 64): the paper configs' ranks are set for widths 4096-8192, the tiny
models' is 128 (rehearsal.hub.HIDDEN), so DWR's largest rank (8192 on Llama-2-70B) becomes 128."""
MEM_MB = 1000
THREADS = 1


def shrunk_rank(rank: int) -> int:
    return max(1, rank // RANK_DIVISOR)


def shrink_ranks(ranks: list[int]) -> list[int]:
    """Each rank shrunk, duplicates dropped, order kept."""
    return list(dict.fromkeys(shrunk_rank(rank) for rank in ranks))


def shrink_step(step):
    """A recipe step with its LQER/L2QER rank shrunk; any other step as it is."""
    if isinstance(step, dict):
        return {name: ({**settings, "rank": shrunk_rank(settings["rank"])}
                       if name in ("lqer", "l2qer") and isinstance(settings, dict) and "rank" in settings else settings)
                for name, settings in step.items()}
    return step


def shrink_recipe(entry: dict) -> dict:
    entry = copy.deepcopy(entry)
    if "seeds" in entry:
        entry["seeds"] = entry["seeds"][:1]
    if "steps" in entry:
        entry["steps"] = [shrink_step(step) for step in entry["steps"]]
    if "dwr" in entry:
        dwr = entry["dwr"]
        if "ranks" in dwr:
            dwr["ranks"] = shrink_ranks(dwr["ranks"])
        if dwr.get("windows"):
            dwr["windows"] = min(dwr["windows"], DWR_WINDOWS)
    return entry


def shrink_resources(resources: dict) -> dict:
    """Every ``mem_mb`` (per rule and per model) set to MEM_MB, every ``cpus`` to THREADS."""
    shrunk = {"mem_mb": MEM_MB, "cpus": THREADS}
    return {key: (shrunk[key] if key in shrunk else shrink_resources(value) if isinstance(value, dict) else value)
            for key, value in resources.items()}


def shrink_config(config: dict) -> dict:
    """``config`` (a paper config as read from YAML) with only its sizes shrunk (module docstring)."""
    config = copy.deepcopy(config)
    config["threads"] = THREADS
    calibration = config["calibration"]
    calibration["nsamples"] = min(calibration.get("nsamples", NSAMPLES), NSAMPLES)
    calibration["seqlen"] = SEQLEN
    if "seeds" in calibration:
        calibration["seeds"] = calibration["seeds"][:1]
    if "batch_size" in calibration:
        calibration["batch_size"] = min(calibration["batch_size"], calibration["nsamples"])
    ppl = config["eval"]["ppl"]
    ppl.update(seqlen=SEQLEN, max_windows=MAX_WINDOWS)
    if "nsamples" in ppl:
        ppl["nsamples"] = C4_EVAL_DOCUMENTS
    zeroshot = config["eval"].get("zeroshot")
    if zeroshot:
        if "items" in zeroshot:
            zeroshot["items"] = min(zeroshot["items"], ZEROSHOT_ITEMS)
        zeroshot["limit"] = min(zeroshot.get("limit") or ZEROSHOT_ITEMS, ZEROSHOT_ITEMS)
        if "max_length" in zeroshot:
            zeroshot["max_length"] = min(zeroshot["max_length"], 4 * SEQLEN)
    config["recipes"] = {name: shrink_recipe(entry) for name, entry in config["recipes"].items()}
    if "resources" in config:
        config["resources"] = shrink_resources(config["resources"])
    return config


def write_shrunk_config(paper_config: Path, out: Path, repository: Path, models: list[str] | None = None,
                        recipes: list[str] | None = None) -> Path:
    """Read ``paper_config``, shrink it (and keep only ``models`` and ``recipes``, where given:
    ``only``), make its reference tables' paths absolute (they are relative to ``repository``, and
    the run happens elsewhere), and write it to ``out``."""
    config = shrink_config(yaml.safe_load(Path(paper_config).read_text()))
    if models or recipes:
        config = only(config, models or list(config["models"]), recipes or list(config["recipes"]))
    config["reference"] = [str(repository / path) for path in config.get("reference", [])]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def only(config: dict, models: list[str], recipes: list[str]) -> dict:
    """A slice of ``config``, not a shrink: only ``models`` and those of ``recipes`` that run on one
    of them (each recipe's ``models`` list cut to them), the claims about those recipes alone, the
    zero-shot ``recipes`` and ``models`` among them and the models' ``resources.by_model`` entries."""
    from ptqrepro.report.claims import claims_from_config

    config = copy.deepcopy(config)
    config["models"] = {name: entry for name, entry in config["models"].items() if name in models}
    kept = {}
    for name, entry in config["recipes"].items():
        if name not in recipes:
            continue
        if "models" in entry:
            entry["models"] = [model for model in entry["models"] if model in models]
            if not entry["models"]:
                continue
        kept[name] = entry
    config["recipes"] = kept
    claims = claims_from_config(config.get("claims", []))
    config["claims"] = [entry for entry, claim in zip(config.get("claims", []), claims) if set(claim.recipes) <= set(kept)]
    zeroshot = config["eval"].get("zeroshot") or {}
    for key, names in (("recipes", kept), ("models", models)):
        if zeroshot.get(key):
            zeroshot[key] = [name for name in zeroshot[key] if name in names]
            if not zeroshot[key]:
                del config["eval"]["zeroshot"]
                break
    by_model = config.get("resources", {}).get("by_model")
    if by_model:
        config["resources"]["by_model"] = {name: entry for name, entry in by_model.items() if name in models}
    return config
