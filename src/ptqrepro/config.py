"""Cross-checks of an experiment config that a JSON schema cannot express.

The Snakefile validates the config against ``workflow/schemas/config.schema.yaml`` first, then
calls ``check_config`` so that a bad model source, an unknown corpus, a recipe naming a missing
step or an unparsable format string stops the DAG before any job runs, in one line.
"""

from __future__ import annotations

from ptqrepro.cluster import check_resources
from ptqrepro.data.corpora import corpus_spec
from ptqrepro.errors import PtqError
from ptqrepro.eval.zeroshot import LOCAL_TASKS
from ptqrepro.models.sources import ModelSource
from ptqrepro.recipes import is_reconstruction, recipe_from_config, reconstruction_from_config
from ptqrepro.report.claims import claims_from_config


def check_config(config: dict) -> None:
    for name, entry in config["models"].items():
        ModelSource.from_config(name, entry)
    zeroshot = config["eval"].get("zeroshot") or {}
    corpora = set(config.get("corpora", {})) | {config["calibration"]["corpus"], *config["eval"]["ppl"]["datasets"]}
    corpora |= {zeroshot["corpus"]} if zeroshot.get("corpus") else set()
    for name in corpora:
        corpus_spec(name, config.get("corpora", {}).get(name))
    for name, entry in config["recipes"].items():
        entry = dict(entry)
        models = entry.pop("models", None) or []
        unknown = [model for model in models if model not in config["models"]]
        if unknown:
            raise PtqError(f"recipe {name!r}: models {', '.join(unknown)} are not in the config's models")
        if is_reconstruction(entry):
            reconstruction_from_config(name, entry, config["recipes"])
            base_models = config["recipes"][entry["base"]].get("models")
            if base_models and set(models or config["models"]) - set(base_models):
                raise PtqError(f"recipe {name!r}: runs on models its base {entry['base']!r} does not")
        else:
            recipe_from_config(name, entry)
    if not config["recipes"]:
        raise PtqError("config key 'recipes' is empty: name at least one recipe")
    claims_from_config(config.get("claims", []), config["recipes"])
    _check_zeroshot(zeroshot, config["recipes"])
    check_resources(config)


def _check_zeroshot(zeroshot: dict, recipes: dict) -> None:
    unknown = [name for name in zeroshot.get("recipes") or [] if name not in recipes]
    if unknown:
        raise PtqError(f"eval.zeroshot.recipes: {', '.join(unknown)} not in the config's recipes")
    local = [task for task in zeroshot.get("tasks", []) if task in LOCAL_TASKS]
    if local and not zeroshot.get("corpus"):
        raise PtqError(f"eval.zeroshot: the local tasks {', '.join(local)} are generated from a corpus's test split: set eval.zeroshot.corpus")
