"""Cross-checks of an experiment config that a JSON schema cannot express.

The Snakefile validates the config against ``workflow/schemas/config.schema.yaml`` first, then
calls ``check_config`` so that a bad model source, an unknown corpus, a recipe naming a missing
step or an unparsable format string stops the DAG before any job runs, in one line.
"""

from __future__ import annotations

from ptqrepro.data.corpora import corpus_spec
from ptqrepro.errors import PtqError
from ptqrepro.models.sources import ModelSource
from ptqrepro.recipes import recipe_from_config


def check_config(config: dict) -> None:
    for name, entry in config["models"].items():
        ModelSource.from_config(name, entry)
    corpora = set(config.get("corpora", {})) | {config["calibration"]["corpus"], *config["eval"]["ppl"]["datasets"]}
    for name in corpora:
        corpus_spec(name, config.get("corpora", {}).get(name))
    for name, entry in config["recipes"].items():
        recipe_from_config(name, entry)
    if not config["recipes"]:
        raise PtqError("config key 'recipes' is empty: name at least one recipe")
