"""Start-up checks of an experiment config against the models it names and this machine.

The schema checks each setting alone and ``config.check_config`` the config's own consistency;
what needs a model's shapes or the environment is checked here, once, before the DAG is planned:
the models' shapes come from their configs (``models.shapes``: ``config.json`` or a GGUF file's
metadata, never the weights). Every problem is collected and one ``PreflightError`` lists them all,
each as ``key: value: what is wrong; allowed: what would do``. Nothing is written.

* models: a GGUF source's package installed with its file; a supported architecture; a local
  folder that exists. A hub model whose ``config.json`` cannot be had here (offline and not in the
  cache) is not checked: a note says so, a dry run lists its jobs, and a run stops before its first
  job (``require_hub_models``, the Snakefile's ``onstart``);
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
* ``device``: ``cuda[:N]`` needs that GPU here.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ptqrepro.config import recipe_entry
from ptqrepro.data.corpora import corpus_spec
from ptqrepro.errors import PtqError
from ptqrepro.eval.zeroshot import LOCAL_TASKS
from ptqrepro.formats import GroupedFormat, parse_format
from ptqrepro.lowrank import fit_reduction
from ptqrepro.models.shapes import ModelShapes, read_model_config, shapes_of
from ptqrepro.models.sources import ModelSource, local_model_problem, offline_hub_problem
from ptqrepro.recipes import is_peer, is_reconstruction, recipe_from_config, reconstruction_from_config
from ptqrepro.steps import LqerStep, MagrStep


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
              cuda_devices: int | None = None) -> None:
    """Check ``config`` (schema-validated, ``check_config`` passed) against its models' shapes and
    this machine; raise one ``PreflightError`` listing every problem. ``prepared_models``: the folder
    of the prepared models (``<folder>/<model>``, only read); ``cuda_devices``: the GPUs torch sees
    (None: ask torch)."""
    problems: list[Problem] = []
    shapes = {}
    for name, entry in config["models"].items():
        problem = isinstance(entry, dict) and entry.get("hub") is not None and local_model_problem(str(entry["hub"]))
        if problem:
            problems.append(Problem(f"models.{name}.hub", entry["hub"], problem, "a local model folder, or a hub id"))
            continue
        try:
            shapes[name] = shapes_of(read_model_config(ModelSource.from_config(name, entry), Path(prepared_models) / name))
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
    if problems:
        raise PreflightError(problems)


def require_hub_models(config: dict) -> None:
    """Before the first job of a run (not of a dry run, which lists the DAG without the models): a
    ``PreflightError`` listing every hub model that no job could load, the hub being offline and
    the model not in the hub cache."""
    problems = [Problem(f"models.{name}.hub", entry["hub"], problem, "a hub id in the hub cache, or the hub online")
                for name, entry in config["models"].items()
                if isinstance(entry, dict) and entry.get("hub") is not None
                and (problem := offline_hub_problem(str(entry["hub"]), bool(config.get("offline"))))]
    if problems:
        raise PreflightError(problems)


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
