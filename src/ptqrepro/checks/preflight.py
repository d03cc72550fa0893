"""Start-up checks of an experiment config against the models it names and this machine.

The schema checks each setting alone and ``config.check_config`` the config's own consistency;
what needs a model's shapes or the environment is checked here, once, before the DAG is planned:
the models' shapes come from their configs (``models.shapes``: ``config.json`` or a GGUF file's
metadata, never the weights). Every problem is collected and one ``PreflightError`` lists them all,
each as ``key: value: what is wrong; allowed: what would do``. Nothing is written.

* models: a GGUF source's package installed with its file; a supported architecture. A hub model
  whose ``config.json`` cannot be had here (offline and not in the cache) is not checked: a note
  says so; the stage-in's own problems (a local folder that does not exist, a hub model not in the
  cache while offline, a gated one without a token, the cache's room) are ``staging_problems``;
* recipes, on every model they run on: the weight and activation formats' groups or blocks divide
  the inputs of every linear, and so does MagR's ``group_size``; an LQER/L2QER rank is at most
  min(in, out) of every linear, and its factors' format fits the inputs and the rank as
  ``lowrank.quantize_low_rank`` stores them; a DWR rank is at most the largest min(in, out) (beyond
  it every candidate is the full correction: ``reconstruction``);
* sequence lengths (``calibration.seqlen``, ``eval.ppl.seqlen``, ``eval.zeroshot.max_length``)
  within every model's context;
* a local corpus: the file of each split a job reads exists and holds at least one window (a token
  is at least one byte);
* zero-shot task names: local, or known to lm-eval;
* ``eval.zeroshot.backend: vllm``: the python of vLLM's environment runs and has vLLM and this
  environment's lm-eval (``eval.zeroshot_vllm.harness_versions``); every linear a recipe exports
  as 4-bit weights for vLLM is a multiple of 32 in both sizes (``export.check_vllm_cpu_shapes``);
* ``device``: ``cuda[:N]`` needs that GPU here;
* the stage-in (``staging_problems``): the Hugging Face home ``staging.hf_home`` exists and is
  writable, with room for the hub models not yet in its cache beside ``staging.min_free_gb``; a
  hub model or corpus not in the cache while offline, a gated model not in it without a token, and
  a model folder that does not exist.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ptqrepro.checks.config import recipe_entry, zeroshot_export_format, zeroshot_recipes
from ptqrepro.data.corpora import corpus_spec
from ptqrepro.errors import PtqError
from ptqrepro.eval.zeroshot import LOCAL_TASKS
from ptqrepro.formats import GroupedFormat, parse_format
from ptqrepro.formats.lowrank import fit_reduction
from ptqrepro.runtime.hub import (TOKEN_STEPS, cached_revision, has_weights, hub_cache, is_gated, is_local_path, repo_folder,
                          staging_environment, token_available)
from ptqrepro.models.shapes import KNOWN_PARAMETERS, ModelShapes, checkpoint_bytes, read_model_config, shapes_of
from ptqrepro.models.sources import ModelSource
from ptqrepro.peers.recipes import is_peer
from ptqrepro.recipe.recipes import is_reconstruction, recipe_from_config, reconstruction_from_config
from ptqrepro.recipe.steps import LqerStep, MagrStep


@dataclass(frozen=True)
class Problem:
    """One setting that cannot work: its config key, its value, what is wrong and what is allowed."""

    key: str
    value: object
    problem: str
    allowed: str

    def __str__(self) -> str:
        return f"{self.key}: {self.value!r}: {self.problem}; allowed: {self.allowed}"


class PreflightError(PtqError):
    """Every ``Problem`` of a config, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(f"{len(problems)} setting(s) cannot work, found before any job ran:\n{lines}")


def preflight(config: dict, prepared_models: str | Path, log: Callable[[str], None] = print,
              cuda_devices: int | None = None, dry_run: bool = False) -> None:
    """Check ``config`` (schema-validated, ``check_config`` passed) against its models' shapes and
    this machine; raise one ``PreflightError`` listing every problem. ``prepared_models``: the folder
    of the prepared models (``<folder>/<model>``, only read); ``cuda_devices``: the GPUs torch sees
    (None: ask torch); ``dry_run``: only planned, so the stage-in's problems are notes, not errors
    (a dry run reads no model)."""
    problems: list[Problem] = []
    shapes, model_configs = {}, {}
    for name, entry in config["models"].items():
        try:
            model_configs[name] = read_model_config(ModelSource.from_config(name, entry), Path(prepared_models) / name)
            shapes[name] = shapes_of(model_configs[name])
        except PtqError as error:
            problems.append(Problem(f"models.{name}", entry, str(error), "an installed package with the file, and a model_type the adapters know"))
        except OSError as error:
            log(f"preflight: model {name!r}: shapes not checked, its config cannot be read here ({str(error).splitlines()[0]})")
    problems += device_problems(config["device"], cuda_devices)
    for name, entry in config["recipes"].items():
        for model in entry.get("models") or config["models"]:
            if model in shapes:
                problems += recipe_problems(name, entry, model, shapes[model])
    problems += sequence_problems(config, shapes)
    problems += corpus_problems(config)
    problems += zeroshot_problems(config)
    problems += zeroshot_backend_problems(config, shapes)
    staging = staging_problems(config, model_configs, log)
    if dry_run:
        for problem in staging:
            log(f"preflight: before a real run: {problem}")
    else:
        problems += staging
    if problems:
        raise PreflightError(problems)


def snakemake_dry_run(argv: list[str]) -> bool:
    """Whether the Snakemake of command line ``argv`` only plans (``-n``): its own parser's reading,
    since ``workflow.dryrun`` is not known while the Snakefile is read. False for another command line."""
    from snakemake.cli import get_argument_parser

    try:
        return bool(get_argument_parser().parse_known_args(argv[1:])[0].dryrun)
    except SystemExit:  # not Snakemake's command line (the API)
        return False


def device_problems(device: str, cuda_devices: int | None = None) -> list[Problem]:
    """``cuda`` or ``cuda:N`` where torch sees no such GPU (``auto`` and ``cpu`` always work)."""
    if not device.startswith("cuda"):
        return []
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index < cuda_devices:
        return []
    seen = f"torch sees {cuda_devices} CUDA device(s) on this machine"
    allowed = "auto (a GPU where the job runs, else the CPU) or cpu" + (f", or cuda:0..cuda:{cuda_devices - 1}" if cuda_devices else "")
    return [Problem("device", device, seen, allowed)]


def _gcd(widths: dict[str, int]) -> int:
    return math.gcd(*widths.values())


def grouping_problem(key: str, value, fmt: GroupedFormat | None, widths: dict[str, int], model: str,
                     allowed: str | None = None) -> list[Problem]:
    """A problem when ``fmt``'s group or block does not divide one of ``widths`` (a linear's name
    -> its reduction dimension), as ``GroupedFormat.groups`` finds it; ``allowed`` says what would
    do (default: a size dividing every width)."""
    if fmt is None:
        return []
    for linear, width in widths.items():
        try:
            fmt.groups(width, f"{linear} of model {model}")
        except PtqError as error:
            return [Problem(key, value, str(error), allowed or f"a size dividing {_gcd(widths)}, which divides the inputs of every linear")]
    return []


def recipe_problems(name: str, entry: dict, model: str, shapes: ModelShapes) -> list[Problem]:
    """What recipe ``name`` (its config entry) cannot do on ``model``."""
    entry = recipe_entry(entry)
    if is_peer(entry):
        return []  # the recipe it mirrors, checked as a recipe of its own, holds its formats and steps
    largest_rank = max(min(shape) for shape in shapes.linears.values())
    if is_reconstruction(entry):
        ranks = reconstruction_from_config(name, entry).settings.ranks
        return [Problem(f"recipes.{name}.dwr.ranks", rank, f"above {largest_rank}, the largest min(in, out) of model {model}'s linears",
                        f"ranks 1..{largest_rank}") for rank in ranks if rank > largest_rank]
    recipe = recipe_from_config(name, entry)
    problems = grouping_problem(f"recipes.{name}.weight", entry.get("weight"), recipe.weight, shapes.inputs, model)
    problems += grouping_problem(f"recipes.{name}.act", entry.get("act"), recipe.act, shapes.inputs, model)
    for index, step in enumerate(recipe.steps):
        key = f"recipes.{name}.steps[{index}].{step.name}"
        if isinstance(step, MagrStep) and step.group_size is not None:
            uneven = [f"{linear} ({width})" for linear, width in shapes.inputs.items() if width % step.group_size]
            if uneven:
                problems.append(Problem(f"{key}.group_size", step.group_size, f"does not divide the inputs of {', '.join(uneven)} of model {model}",
                                        f"a size dividing {_gcd(shapes.inputs)}, or null (the weight format's groups)"))
        if isinstance(step, LqerStep):
            problems += low_rank_problems(key, step, recipe.act, model, shapes)
        problems += [Problem(f"{key}.{setting}", value, f"{problem} (model {model})", allowed)
                     for setting, value, problem, allowed in step.shape_problems(shapes)]
    return problems


def low_rank_problems(key: str, step: LqerStep, act: GroupedFormat | None, model: str, shapes: ModelShapes) -> list[Problem]:
    """An LQER/L2QER rank beyond a linear's min(in, out), or one its factors' or the activations'
    format cannot split (``lowrank.quantize_low_rank``, ``QuantizedLowRank.output``)."""
    smallest = min(min(shape) for shape in shapes.linears.values())
    if step.rank > smallest:
        narrow = [linear for linear, shape in shapes.linears.items() if min(shape) < step.rank]
        return [Problem(f"{key}.rank", step.rank, f"above min(in, out) of {', '.join(narrow)} of model {model}", f"ranks 1..{smallest}")]
    factor = parse_format(step.factor_format)
    problems = grouping_problem(f"{key}.factor_format", step.factor_format, factor, shapes.inputs, model)
    for fmt, split in ((factor, "factor B"), (act, "activations of x A")):
        fitted = fit_reduction(fmt, step.rank)
        length = fitted.group_length(step.rank) if fitted is not None else None
        problems += grouping_problem(f"{key}.rank", step.rank, fitted, {f"{split} (rank {step.rank})": step.rank}, model,
                                     f"a rank that is a multiple of {length} or below it (the format then spans the rank)")
    return problems


def sequence_problems(config: dict, shapes: dict[str, ModelShapes]) -> list[Problem]:
    """Sequence lengths beyond a model's context."""
    lengths = {"calibration.seqlen": config["calibration"]["seqlen"], "eval.ppl.seqlen": config["eval"]["ppl"]["seqlen"]}
    if config["eval"].get("zeroshot"):
        lengths["eval.zeroshot.max_length"] = config["eval"]["zeroshot"]["max_length"]
    problems = []
    for key, length in lengths.items():
        beyond = {model: model_shapes.context for model, model_shapes in shapes.items()
                  if model_shapes.context is not None and length > model_shapes.context}
        if beyond:
            where = ", ".join(f"{model} ({context})" for model, context in beyond.items())
            problems.append(Problem(key, length, f"beyond the context of model {where}", f"at most {min(beyond.values())}"))
    return problems


def corpus_problems(config: dict) -> list[Problem]:
    """A local corpus whose split file a job reads is missing, or too short for one window."""
    reads = [("calibration.seqlen", config["calibration"]["corpus"], "train", config["calibration"]["seqlen"])]
    reads += [("eval.ppl.seqlen", name, "test", config["eval"]["ppl"]["seqlen"]) for name in config["eval"]["ppl"]["datasets"]]
    problems = []
    for key, name, split, seqlen in reads:
        spec = corpus_spec(name, config.get("corpora", {}).get(name))
        if spec.source != "local" or split not in spec.splits:
            continue
        files = [Path(spec.path) / f"{spec.splits[split]}.{suffix}" for suffix in ("jsonl", "txt")]
        found = next((path for path in files if path.is_file()), None)
        if found is None:
            problems.append(Problem(f"corpora.{name}.path", spec.path, f"has neither {files[0].name} nor {files[1].name}",
                                    f"a folder with the {split} split as {files[0].name} or {files[1].name}"))
        elif found.stat().st_size <= seqlen:
            problems.append(Problem(key, seqlen, f"corpus {name!r}: {found} has {found.stat().st_size} bytes, fewer than the "
                                    f"{seqlen + 1} tokens of one window", f"below {found.stat().st_size}, or a larger corpus"))
    return problems


TASK_NAME = re.compile(r"^(?:task|group|tag):[ \t]*(?:\[(?P<inline>[^\]]*)\]|(?P<one>[^\s#]+))?[ \t]*(?:#.*)?\n(?P<items>(?:[ \t]*-[ \t]*[^\s#]+.*\n)*)",
                       re.MULTILINE)


def lm_eval_task_names() -> set[str] | None:
    """The task, group and tag names of lm-eval's task YAMLs, read as text (a few seconds, where
    indexing them with lm-eval's ``TaskManager`` takes about 12); None: lm-eval is not installed."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    names = set()
    for folder in spec.submodule_search_locations:
        for path in (Path(folder) / "tasks").rglob("*.yaml"):
            for match in TASK_NAME.finditer(path.read_text(encoding="utf-8", errors="replace")):
                listed = (match.group("inline") or "").split(",") + [match.group("one") or ""]
                listed += [line.strip().lstrip("-").strip() for line in match.group("items").splitlines()]
                names.update(name.strip().strip("'\"") for name in listed if name.strip())
    return names


def zeroshot_problems(config: dict, known: Callable[[], set[str] | None] = lm_eval_task_names) -> list[Problem]:
    """Zero-shot tasks neither local nor lm-eval's. A name the text scan misses is looked up in
    lm-eval's own index before it is refused (tasks a Python class registers)."""
    tasks = [task for task in (config["eval"].get("zeroshot") or {}).get("tasks", []) if task not in LOCAL_TASKS]
    if not tasks:
        return []
    names = known()
    if names is None:
        return [Problem("eval.zeroshot.tasks", tasks, "lm-eval is not installed", f"the local tasks {', '.join(LOCAL_TASKS)}, or pip install lm-eval")]
    unknown = [task for task in tasks if task not in names]
    if unknown:
        from lm_eval.tasks import TaskManager

        unknown = [task for task in unknown if task not in TaskManager().all_tasks]
    return [Problem("eval.zeroshot.tasks", task, "not a local task and not in lm-eval's registry",
                    f"{', '.join(LOCAL_TASKS)} (local) or an lm-eval task, e.g. arc_easy, piqa, hellaswag") for task in unknown]


def staging_problems(config: dict, model_configs: dict, log: Callable[[str], None] = print,
                     environ=None) -> list[Problem]:
    """What would stop the stage-in (``prepare_model``, ``prepare_corpus``) or a job reading it: the
    Hugging Face home of ``staging.hf_home`` missing or not writable; a model folder that does not
    exist; a hub model or corpus neither in the cache nor reachable (offline: ``offline: true`` or
    ``HF_HUB_OFFLINE``); a gated hub model (``hub.GATED``, or so marked on the hub) not in the cache
    without a token; and less free disk in the cache than the models still to download need beside
    ``staging.min_free_gb``. A download's size is ``checkpoint_bytes`` of its ``config.json``
    (``model_configs``: read where it could be), else ``KNOWN_PARAMETERS`` in float16, else unknown
    (said in a note)."""
    environ = os.environ if environ is None else environ  # the environment at the call, not at import
    staging = config.get("staging") or {}
    environ = {**environ, **staging_environment(staging, environ)}
    cache = hub_cache(environ)
    offline = bool(config["offline"]) or environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    problems = home_problems(staging)
    downloads: dict[str, int | None] = {}
    for name, entry in config["models"].items():
        hub = entry.get("hub")
        key = f"models.{name}.hub"
        if hub is None:
            continue
        problem = hub_model_problem(hub, cache, offline)
        if problem:
            problems.append(Problem(key, hub, *problem))
        elif not is_local_path(hub) and not is_staged(hub, cache):
            downloads[name] = download_bytes(hub, model_configs.get(name))
    problems += corpus_stage_problems(config, cache, offline)
    problems += disk_problems(staging, cache, downloads, config["models"], log)
    return problems


def is_staged(hub: str, cache: Path) -> bool:
    """Whether a hub model's snapshot, weights included, is in the cache."""
    revision = cached_revision(hub, "model", cache)
    return bool(revision) and has_weights(repo_folder(hub, "model", cache) / "snapshots" / revision)


def hub_model_problem(hub: str, cache: Path, offline: bool) -> tuple[str, str] | None:
    """Why a model's ``hub:`` entry cannot be staged or loaded here, and what would do, or None: a
    local folder that does not exist; a hub model not in ``cache`` while ``offline``; a gated one
    (``hub.GATED``, or so marked on the hub) not in the cache without a token."""
    if is_local_path(hub):
        if Path(hub).expanduser().is_dir():
            return None
        return "no such folder", "an existing model folder, or a hub id org/name"
    if is_staged(hub, cache):
        return None
    if offline:
        return (f"not in the Hugging Face cache {cache}, and offline (offline: true or HF_HUB_OFFLINE)",
                "stage it first where the network is: offline: false, HF_HUB_OFFLINE unset, then the `stage` target")
    if is_gated(hub, ask_hub=True) and not token_available():
        return "a gated repository, not in the Hugging Face cache, and no hub token here", TOKEN_STEPS.format(repo=hub)
    return None


def model_source_problem(source: ModelSource, environ=None) -> str | None:
    """``hub_model_problem`` of a model source as ``prepare-model`` sees it (the cache and offline
    mode of ``environ``), as one line; None for a GGUF source or a model that can be had."""
    environ = os.environ if environ is None else environ  # the environment at the call, not at import
    if source.hub is None:
        return None
    offline = environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    problem = hub_model_problem(source.hub, hub_cache(environ), offline)
    return f"{source.hub}: {problem[0]}; {problem[1]}" if problem else None


def home_problems(staging: dict) -> list[Problem]:
    """``staging.hf_home`` (where set) is not an existing, writable folder."""
    home = staging.get("hf_home")
    if not home:
        return []
    path = Path(home).expanduser()
    allowed = "an existing folder you can write, on a filesystem the submit host and every node share"
    if not path.is_dir():
        return [Problem("staging.hf_home", home, "no such folder", allowed)]
    if not os.access(path, os.W_OK | os.X_OK):
        return [Problem("staging.hf_home", home, "not writable here", allowed)]
    return []


def download_bytes(hub: str, model_config) -> int | None:
    """The bytes of a hub model's download: from its config where read, else ``KNOWN_PARAMETERS`` in
    float16, else None (unknown)."""
    if model_config is not None:
        return checkpoint_bytes(model_config)
    parameters = KNOWN_PARAMETERS.get(hub)
    return round(parameters * 2) if parameters else None


def corpus_stage_problems(config: dict, cache: Path, offline: bool) -> list[Problem]:
    """A hub corpus (by its repository id) that a job reads, not in the cache while offline."""
    names = {config["calibration"]["corpus"], *config["eval"]["ppl"]["datasets"]}
    if (config["eval"].get("zeroshot") or {}).get("corpus"):
        names.add(config["eval"]["zeroshot"]["corpus"])
    problems = []
    for name in sorted(names):
        spec = corpus_spec(name, config.get("corpora", {}).get(name))
        if not offline or spec.source != "hub" or Path(spec.path).expanduser().is_dir():
            continue
        if cached_revision(spec.path, "dataset", cache) is None:
            problems.append(Problem(f"corpora.{name}.path", spec.path, f"dataset not in the Hugging Face cache {cache}, and offline",
                                    "stage it first where the network is: offline: false, HF_HUB_OFFLINE unset, then the `stage` target"))
    return problems


def disk_problems(staging: dict, cache: Path, downloads: dict[str, int | None], models: dict,
                  log: Callable[[str], None]) -> list[Problem]:
    """Less free space where the cache is (or would be made) than the known download sizes plus
    ``staging.min_free_gb``; a model of unknown size is said in a note."""
    if not downloads:
        return []
    unknown = [name for name, size in downloads.items() if size is None]
    if unknown:
        log(f"preflight: download size of model(s) {', '.join(unknown)} unknown (config.json not readable here): "
            "not counted in the disk check")
    existing = next((folder for folder in (cache, *cache.parents) if folder.is_dir()), None)
    if existing is None:
        return []
    needed = sum(size for size in downloads.values() if size) + staging.get("min_free_gb", 10) * 1e9
    free = shutil.disk_usage(existing).free
    if free >= needed:
        return []
    listed = ", ".join(f"{models[name]['hub']} {size / 1e9:.1f} GB" for name, size in downloads.items() if size)
    return [Problem("staging.hf_home", staging.get("hf_home") or str(cache),
                    f"{free / 1e9:.1f} GB free at {existing}, but the downloads need {needed / 1e9:.1f} GB ({listed}, "
                    f"and min_free_gb {staging.get('min_free_gb', 10)})",
                    "a Hugging Face home on a filesystem with that room, or fewer models")]


def zeroshot_backend_problems(config: dict, shapes: dict[str, ModelShapes]) -> list[Problem]:
    """``eval.zeroshot.backend: vllm`` where vLLM's environment cannot run lm-eval, or a recipe's
    4-bit export has a linear vLLM's CPU kernel does not take (``export.check_vllm_cpu_shapes``)."""
    from ptqrepro.eval.zeroshot_vllm import BACKEND_SETTING, VLLM, harness_versions, vllm_python
    from ptqrepro.export.hf_directory import COMPRESSED_TENSORS, VLLM_CPU_DIMENSION_MULTIPLE

    zeroshot = config["eval"].get("zeroshot") or {}
    if zeroshot.get("backend") != VLLM:
        return []
    problems = []
    try:
        harness_versions(vllm_python(zeroshot.get("vllm_python")))
    except PtqError as error:
        problems.append(Problem("eval.zeroshot.backend", VLLM, str(error).removeprefix(f"{BACKEND_SETTING}: "),
                                "hf, or vLLM's environment with lm-eval (eval.zeroshot.vllm_python or $PTQ_VLLM_PYTHON)"))
    multiple = VLLM_CPU_DIMENSION_MULTIPLE
    for name in zeroshot_recipes(config):
        entry = config["recipes"].get(name, {})
        if zeroshot_export_format(config, name) != COMPRESSED_TENSORS or recipe_entry(entry).get("act"):
            continue
        for model in set(entry.get("models") or config["models"]) & set(zeroshot.get("models") or config["models"]):
            uneven = [f"{linear} ({shape[1]} x {shape[0]})" for linear, shape in shapes.get(model, ModelShapes("", {}, None)).linears.items()
                      if shape[0] % multiple or shape[1] % multiple]
            if uneven:
                problems.append(Problem("eval.zeroshot.recipes", name, f"vLLM's CPU 4-bit kernel takes linears whose sizes are "
                                        f"multiples of {multiple}; model {model} has {', '.join(uneven)}", "backend hf for this model"))
    return problems
