"""Cross-checks of an experiment config that a JSON schema cannot express.

The workflow (``workflow/rules/common.smk``) re-reads each config file with ``check_config_files``
first (Snakemake's own loader keeps the last of a key given twice), validates the config against
``workflow/schemas/config.schema.yaml`` (``check_schema``: every violation at once), then calls
``check_config`` so that a bad model source, an unknown corpus, a recipe naming a missing step or
an unparsable format string stops the DAG before any job runs: every such error at once, one line
each; what needs the models' shapes or the machine follows (``ptqrepro.checks.preflight``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ptqrepro.runtime.cluster import resource_errors
from ptqrepro.data.corpora import corpus_spec
from ptqrepro.data.windows import calibration_is_drawn
from ptqrepro.errors import PtqError
from ptqrepro.eval.zeroshot import LOCAL_TASKS
from ptqrepro.eval.zeroshot_vllm import BACKEND_SETTING, VLLM, export_format
from ptqrepro.runtime.io import load_yaml
from ptqrepro.models.sources import ModelSource, slow_tokenizer_problem
from ptqrepro.recipe.plugins import import_plugins
from ptqrepro.peers.recipes import is_peer, peer_from_spec, peer_spec
from ptqrepro.recipe.recipes import Recipe, is_reconstruction, recipe_from_config, reconstruction_from_config
from ptqrepro.report.claims import claims_from_config
from ptqrepro.recipe.steps import BUILTIN_STEPS, LqerStep

JOB_KEYS = ("models", "seeds", "calibration_dtype")
"""Keys of a recipe's entry that choose its jobs (on which models, at which calibration seeds, with
calibration forward passes in which dtype), not what its steps do: the DAG reads them and the
jobs get them as command-line options, never in the recipe's spec."""


def recipe_entry(entry: dict) -> dict:
    """A recipe's entry without ``JOB_KEYS``, as the quantize and DWR commands read it."""
    return {key: value for key, value in entry.items() if key not in JOB_KEYS}


def recipe_job_spec(config: dict, name: str) -> dict:
    """What recipe ``name``'s quantize or DWR job reads as its ``--spec``: the entry without
    ``JOB_KEYS``; a peer recipe's completed with the recipe it mirrors (``peers.recipes.peer_spec``); one
    that names a step from outside the package with the config's ``plugins``, which register it
    (``ptqrepro.recipe.plugins``)."""
    entry = recipe_entry(config["recipes"][name])
    if is_peer(entry):
        return peer_spec(name, entry, {key: recipe_entry(value) for key, value in config["recipes"].items()})
    if config.get("plugins") and not _step_names(entry) <= BUILTIN_STEPS:
        return {**entry, "plugins": list(config["plugins"])}
    return entry


def _step_names(entry: dict) -> set:
    """The names of the steps of a recipe's entry (a step is a name or ``{name: settings}``)."""
    return {step if isinstance(step, str) else next(iter(step), None) for step in entry.get("steps") or []
            if isinstance(step, (str, dict))}


def calibration_dtype(config: dict, name: str) -> str:
    """The dtype of recipe ``name``'s calibration forward passes: its entry's ``calibration_dtype``,
    else ``calibration.dtype`` (``auto``: see ``models.sources.compute_dtype``). A peer toolkit
    calibrates in float32 (``cli._quantize_with_peer``)."""
    if is_peer(config["recipes"][name]):
        return "float32"
    return config["recipes"][name].get("calibration_dtype", config["calibration"].get("dtype", "auto"))


def recipe_calibrates(config: dict, name: str, recipe: Recipe | None = None) -> bool:
    """Whether recipe ``name``'s job reads calibration windows: a reconstruction (DWR) and a peer
    toolkit's job always do, one of our recipes where a step needs activation statistics
    (``Recipe.needs_stats``; ``recipe``: the entry already parsed); fp16, RTN and LQER without
    activation statistics read none, so the calibration settings are no input of theirs."""
    entry = config["recipes"][name]
    if is_reconstruction(entry) or is_peer(entry):
        return True
    return (recipe or recipe_from_config(name, recipe_entry(entry))).needs_stats


def calibration_seeds(config: dict) -> list[int]:
    """The config's calibration seeds: ``calibration.seeds`` (a list), or the single
    ``calibration.seed`` (default 0); not both."""
    calibration = config["calibration"]
    if "seeds" in calibration and "seed" in calibration:
        raise PtqError("calibration: give 'seeds' (a list) or 'seed' (one), not both")
    seeds = calibration.get("seeds", [calibration.get("seed", 0)])
    return _checked_seeds(seeds, "calibration.seeds")


def recipe_seeds(config: dict, name: str, calibrates: Callable[[str], bool] | None = None) -> list[int]:
    """The calibration seeds recipe ``name`` runs at, each a job of its own: its entry's ``seeds``,
    else the config's (``calibration_seeds``). A recipe that reads no calibration data (fp16,
    RTN; ``calibrates(name)``, by default ``recipe_calibrates``) gives the same model at every
    seed, so it runs at the first one only; a reconstruction (DWR) runs at seeds its base runs at;
    a peer recipe at the seeds of the recipe it mirrors, unless it lists its own."""
    calibrates = calibrates or (lambda recipe: recipe_calibrates(config, recipe))
    entry = config["recipes"][name]
    if is_peer(entry) and "seeds" not in entry:
        return recipe_seeds(config, entry["mirrors"], calibrates)
    seeds = _checked_seeds(entry["seeds"], f"recipe {name!r}: seeds") if "seeds" in entry else calibration_seeds(config)
    if is_reconstruction(entry):
        base_seeds = recipe_seeds(config, entry["base"], calibrates)
        outside = [seed for seed in seeds if seed not in base_seeds]
        if outside:
            raise PtqError(f"recipe {name!r}: seeds {outside} are not seeds of its base {entry['base']!r} ({base_seeds})")
        return seeds
    if is_peer(entry) or calibrates(name):
        return seeds
    return seeds[:1]


def _checked_seeds(seeds, key: str) -> list[int]:
    if isinstance(seeds, bool) or isinstance(seeds, int):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 for seed in seeds)):
        raise PtqError(f"{key} must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise PtqError(f"{key} lists a seed twice: {seeds}")
    return list(seeds)


def check_config_files(paths: list[str]) -> None:
    """Re-read each config file with ``io.load_yaml``, which refuses a key given twice in a mapping
    at any depth: Snakemake's loader keeps the last, so a recipe defined twice would silently be
    the second one. One ``PtqError`` names every such key of every file, one line each."""
    errors = []
    for path in paths:
        try:
            load_yaml(Path(path).read_text(), str(path))
        except PtqError as error:
            errors.append(str(error))
    if errors:
        raise PtqError("\n".join(errors))


def check_schema(config: dict, schema_path: str | Path) -> None:
    """Every violation of the config schema at once, one line each with its key (Snakemake's
    ``validate``, which then fills in the defaults, stops at the first)."""
    import jsonschema

    schema = load_yaml(Path(schema_path).read_text(), str(schema_path))
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda error: _key(error.absolute_path))
    if errors:
        lines = "\n".join(f"  {_key(error.absolute_path) or '(top level)'}: {error.message}" for error in errors)
        raise PtqError(f"{len(errors)} setting(s) break the schema {schema_path}:\n{lines}")


def _key(path) -> str:
    """A config key as the messages write it: ``recipes.gptq@int3.steps[0].gptq.blocksize``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


class ConfigError(PtqError):
    """Every error ``check_config`` found in a config, one per line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        lines = "\n".join(f"  {error}" for error in errors)
        super().__init__(f"{len(errors)} error(s) in the config:\n{lines}")


def check_config(config: dict) -> None:
    """The consistency of a schema-validated config: its plugins (imported first: they register
    steps the recipes name), model sources, corpora, calibration seeds, each
    recipe (the models it names; its steps and formats, then its seeds), the claims, zero-shot and
    the resources. Every check runs whatever the others found; one ``ConfigError`` lists each error
    once (a recipe's seeds are checked only where its steps passed: they read them)."""
    errors: list[str] = []

    def passes(check: Callable, *args) -> bool:
        """``check(*args)``; a ``PtqError`` it raises is one more error."""
        try:
            check(*args)
        except PtqError as error:
            errors.append(str(error))
            return False
        return True

    passes(import_plugins, config.get("plugins", []))
    for name, entry in config["models"].items():
        passes(ModelSource.from_config, name, entry)
    for name in _corpora(config):
        if passes(corpus_spec, name, config.get("corpora", {}).get(name)):
            passes(_check_corpus_splits, config, name)
    passes(calibration_seeds, config)
    passes(_check_tokenizers, config)
    if not config["recipes"]:
        errors.append("config key 'recipes' is empty: name at least one recipe")
    for name in config["recipes"]:
        passes(_check_recipe_models, config, name)
        if passes(_check_recipe_steps, config, name):
            passes(recipe_seeds, config, name)
    passes(claims_from_config, config.get("claims", []), config["recipes"])
    zeroshot = config["eval"].get("zeroshot") or {}
    passes(_check_zeroshot_recipes, zeroshot, config["recipes"])
    passes(_check_local_tasks, zeroshot)
    errors += _zeroshot_name_errors(zeroshot, config["models"])
    if zeroshot.get("backend") == VLLM:
        errors += [error for name in zeroshot_recipes(config) if (error := _vllm_export_error(config, name))]
    errors += resource_errors(config)
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))


MIN_CLAIM_DRAWS = 3
"""Calibration seeds a calibrated recipe named by a claim should run at."""


def single_draw_warnings(config: dict) -> list[str]:
    """One line per recipe that a claim names, reads calibration data and runs at fewer than
    ``MIN_CLAIM_DRAWS`` calibration seeds (none where the calibration protocol draws nothing). A warning, not an error: its comparisons are marked
    "single draw" (or rest on few draws) in claims.md and all.md rather than judged, so nothing is
    misread, and a quick look at one draw stays possible."""
    named = dict.fromkeys(name for claim in claims_from_config(config.get("claims", []), config["recipes"])
                          for name in claim.recipes)
    corpus = config["calibration"].get("corpus")
    if corpus and not calibration_is_drawn(corpus_spec(corpus, config.get("corpora", {}).get(corpus))):
        return []  # the same windows at every seed: no draw to replicate
    warnings = []
    for name in named:
        entry = config["recipes"][name]
        calibrated = (is_peer(entry) or is_reconstruction(entry)
                      or recipe_from_config(name, recipe_entry(entry)).needs_stats)
        seeds = recipe_seeds(config, name)
        if calibrated and len(seeds) < MIN_CLAIM_DRAWS:
            warnings.append(f"recipe {name!r} is named by a claim and reads calibration data, but runs at "
                            f"{len(seeds)} calibration seed(s) {seeds}: its claims cannot hold or fail on fewer than "
                            f"2 draws and are thin on fewer than {MIN_CLAIM_DRAWS} (set calibration.seeds or its seeds)")
    return warnings


def _corpora(config: dict) -> set[str]:
    """Every corpus the config names: defined under ``corpora``, calibrated on, evaluated on, or the
    source of the local zero-shot tasks."""
    zeroshot = config["eval"].get("zeroshot") or {}
    corpora = set(config.get("corpora", {})) | {config["calibration"]["corpus"], *config["eval"]["ppl"]["datasets"]}
    return corpora | ({zeroshot["corpus"]} if zeroshot.get("corpus") else set())


def _check_corpus_splits(config: dict, name: str) -> None:
    """Corpus ``name`` has the splits the jobs read from it: train to calibrate on, test to evaluate
    on (perplexity, local zero-shot tasks); slimpajama, for one, has only train."""
    spec = corpus_spec(name, config.get("corpora", {}).get(name))
    zeroshot = config["eval"].get("zeroshot") or {}
    reads = [("calibration.corpus", "train")] if name == config["calibration"]["corpus"] else []
    reads += [("eval.ppl.datasets", "test")] if name in config["eval"]["ppl"]["datasets"] else []
    reads += [("eval.zeroshot.corpus", "test")] if name == zeroshot.get("corpus") else []
    for key, split in reads:
        if split not in spec.splits:
            raise PtqError(f"{key}: corpus {name!r} has no {split} split (has: {', '.join(spec.splits)})")


def _check_tokenizers(config: dict) -> None:
    """A ``slow`` tokenizer (calibration, eval.ppl) that the installed transformers cannot load is
    refused before any job runs, rather than replaced by the fast one (``models.sources``)."""
    slow = [key for key, section in (("calibration.tokenizer", config["calibration"]),
                                     ("eval.ppl.tokenizer", config["eval"]["ppl"])) if section.get("tokenizer") == "slow"]
    problem = slow_tokenizer_problem() if slow else None
    if problem:
        raise PtqError(f"{' and '.join(slow)}: slow cannot be honoured: {problem}; set fast")


def _check_recipe_models(config: dict, name: str) -> None:
    """Recipe ``name``'s ``models`` are models of the config."""
    unknown = [model for model in config["recipes"][name].get("models") or [] if model not in config["models"]]
    if unknown:
        raise PtqError(f"recipe {name!r}: models {', '.join(unknown)} are not in the config's models")


def _check_recipe_steps(config: dict, name: str) -> None:
    """Recipe ``name`` parses: its steps and formats; a peer's toolkit and the recipe it mirrors; a
    reconstruction's base and settings, and no model its base does not run on."""
    entry = recipe_entry(config["recipes"][name])
    if is_peer(entry):
        peer_from_spec(name, recipe_job_spec(config, name))
    elif is_reconstruction(entry):
        reconstruction_from_config(name, entry, config["recipes"])
        models = config["recipes"][name].get("models") or config["models"]
        base_models = config["recipes"][entry["base"]].get("models")
        if base_models and set(models) - set(base_models):
            raise PtqError(f"recipe {name!r}: runs on models its base {entry['base']!r} does not")
    else:
        recipe_from_config(name, entry)


def _check_zeroshot_recipes(zeroshot: dict, recipes: dict) -> None:
    """``eval.zeroshot.recipes`` are recipes of the config."""
    unknown = [name for name in zeroshot.get("recipes") or [] if name not in recipes]
    if unknown:
        raise PtqError(f"eval.zeroshot.recipes: {', '.join(unknown)} not in the config's recipes")


def _zeroshot_name_errors(zeroshot: dict, models: dict) -> list[str]:
    """``eval.zeroshot.metrics`` and ``averages`` name tasks of ``eval.zeroshot.tasks``; an average
    is not named as a task; ``eval.zeroshot.models`` are models of the config. One error each."""
    tasks = zeroshot.get("tasks", [])
    problems = [f"eval.zeroshot.metrics: {task} is not in eval.zeroshot.tasks" for task in zeroshot.get("metrics") or {} if task not in tasks]
    for name, members in (zeroshot.get("averages") or {}).items():
        missing = [task for task in members if task not in tasks]
        if missing:
            problems.append(f"eval.zeroshot.averages.{name}: {', '.join(missing)} not in eval.zeroshot.tasks")
        if name in tasks:
            problems.append(f"eval.zeroshot.averages.{name}: the name of a task; name the average otherwise")
    unknown = [model for model in zeroshot.get("models") or [] if model not in models]
    if unknown:
        problems.append(f"eval.zeroshot.models: {', '.join(unknown)} not in the config's models")
    return problems


def _check_local_tasks(zeroshot: dict) -> None:
    """The local zero-shot tasks have a corpus to be generated from."""
    local = [task for task in zeroshot.get("tasks", []) if task in LOCAL_TASKS]
    if local and not zeroshot.get("corpus"):
        raise PtqError(f"eval.zeroshot: the local tasks {', '.join(local)} are generated from a corpus's test split: set eval.zeroshot.corpus")


def zeroshot_recipes(config: dict) -> list[str]:
    """The recipes ``eval.zeroshot`` scores: its ``recipes``, else every recipe but the peer recipes
    (which the report leaves to ``snakemake peers``)."""
    zeroshot = config["eval"].get("zeroshot") or {}
    return list(zeroshot.get("recipes") or [name for name, entry in config["recipes"].items() if not is_peer(entry)])


def zeroshot_export_format(config: dict, name: str) -> str:
    """The export of recipe ``name`` that ``eval.zeroshot.backend: vllm`` evaluates
    (``eval.zeroshot_vllm.export_format``): a peer recipe's is that of the recipe it mirrors; a
    reconstruction (DWR) carries low-rank terms."""
    entry = recipe_entry(config["recipes"][name])
    if is_peer(entry):
        return zeroshot_export_format(config, entry["mirrors"])
    if is_reconstruction(entry):
        return export_format(name, None, None, low_rank=True)
    recipe = recipe_from_config(name, recipe_job_spec(config, name))
    return export_format(name, recipe.weight, recipe.act, any(isinstance(step, LqerStep) for step in recipe.steps))


def _vllm_export_error(config: dict, name: str) -> str | None:
    """Why vLLM cannot evaluate recipe ``name`` zero-shot; None where it can, and where the recipe
    is not the config's or does not parse (their own checks report those)."""
    if name not in config["recipes"]:
        return None
    try:
        zeroshot_export_format(config, name)
    except PtqError as error:
        return str(error) if str(error).startswith(BACKEND_SETTING) else None
    return None
