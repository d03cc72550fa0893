"""A recipe is a named list of steps, applied in order to each decoder layer, and a weight format.

Config form::

    recipes:
      fp16: {steps: []}
      rtn@int4-g64: {steps: [rtn], weight: int4-g64}
      sq+awq+gptq@mxint4_a=mxint8: {steps: [{smoothquant: {alpha: 0.5}}, awq, gptq], weight: mxint4, act: mxint8}

A step is a name or a one-key mapping ``{name: {setting: value}}``. A recipe that has steps has
exactly one quantizer (it turns float weights into codes of the weight format), preceded by
transforms and followed by refinements only, e.g. ``[magr, gptq, cd]`` or ``[gptq, {l2qer: {rank: 32}}]``.
``act`` names the format of the dynamic fake quantization of every linear's input at
evaluation (none by default). A job's spec of a recipe with steps from outside the package also
lists the modules that register them (``plugins``, see ``ptqrepro.recipe.plugins``).

A *reconstruction* recipe names another recipe as its ``base`` and runs DWR's search on that
recipe's quantized model (its own job, so the base is quantized once)::

    gptq+dwr@int3: {base: gptq@int3, dwr: {space: svd, ranks: [64, 128, 256], windows: 2}}

A *peer* recipe runs another recipe of the config through a peer toolkit (``ptqrepro.peers``)::

    llmc-gptq@int4-g64: {toolkit: llm-compressor, mirrors: gptq@int4-g64}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from ptqrepro.errors import PtqError
from ptqrepro.formats import GroupedFormat, parse_format
from ptqrepro.models.adapters import Architecture
from ptqrepro.recipe.plugins import import_plugins, step_class
from ptqrepro.recipe.steps import STEPS, Step

RECIPE_NAME = re.compile(r"[A-Za-z0-9_.+@=-]+")


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[Step, ...] = field(default_factory=tuple)
    weight: GroupedFormat | None = None
    act: GroupedFormat | None = None

    @property
    def method(self) -> str:
        """The steps joined by '+', or 'fp16' for the unquantized baseline."""
        return "+".join(step.name for step in self.steps) or "fp16"

    @property
    def needs_stats(self) -> bool:
        return any(step.needs_stats for step in self.steps)

    @property
    def needs_gram(self) -> bool:
        return any(step.needs_gram for step in self.steps)

    @property
    def sequential(self) -> bool:
        """Calibrate each layer on the outputs of the quantized earlier layers (``Step.sequential``:
        any step of the recipe asks for it), else on the float model's activations."""
        return any(step.sequential for step in self.steps)

    def inspected_modules(self, arch: Architecture) -> tuple[str, ...]:
        """The decoder-layer submodules whose calibration inputs a step runs again
        (``Step.inspected_modules``), each once."""
        return tuple(dict.fromkeys(module for step in self.steps for module in step.inspected_modules(arch)))

    def relative_cost(self) -> float:
        """The job's rough run time in calibration passes (``Step.relative_cost``), for scheduling."""
        return float(self.needs_stats) + sum(step.relative_cost() for step in self.steps)

    @property
    def transforms(self) -> tuple[Step, ...]:
        return self.steps[: self._quantizer_index]

    @property
    def quantizer(self) -> Step:
        return self.steps[self._quantizer_index]

    @property
    def refinements(self) -> tuple[Step, ...]:
        return self.steps[self._quantizer_index + 1 :]

    @property
    def _quantizer_index(self) -> int:
        return next(i for i, step in enumerate(self.steps) if step.quantizer)


def build_step(recipe: str, entry) -> Step:
    if isinstance(entry, str):
        name, settings = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, settings = next(iter(entry.items()))
        settings = settings or {}
    else:
        raise PtqError(f"recipe {recipe!r}: a step is a name or {{name: {{settings}}}}, got {entry!r}")
    return step_class(recipe, name).from_settings(recipe, settings)


def recipe_from_config(name: str, entry: dict) -> Recipe:
    """Validate one config entry into a Recipe; every problem is one line naming the recipe."""
    if not RECIPE_NAME.fullmatch(name):
        raise PtqError(f"recipe name {name!r} may only use letters, digits and _ . + @ = -")
    if not isinstance(entry, dict):
        raise PtqError(f"recipe {name!r}: expected a mapping with 'steps' and 'weight'")
    unknown = set(entry) - {"steps", "weight", "act", "plugins"}
    if unknown:
        raise PtqError(f"recipe {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
    if "plugins" in entry:
        import_plugins(entry["plugins"])
    steps = tuple(build_step(name, step) for step in entry.get("steps") or [])
    weight = parse_format(entry.get("weight"))
    act = parse_format(entry.get("act"))
    _check_order(name, steps)
    if steps and weight is None:
        raise PtqError(f"recipe {name!r}: steps {[s.name for s in steps]} need a 'weight' format")
    if weight is not None and not steps:
        raise PtqError(f"recipe {name!r}: weight format {weight.name} given but no quantizer step")
    return Recipe(name=name, steps=steps, weight=weight, act=act)


def _check_order(recipe: str, steps: tuple[Step, ...]) -> None:
    """Transforms, then exactly one quantizer, then refinements."""
    if not steps:
        return
    quantizers = [step.name for step in steps if step.quantizer]
    if len(quantizers) != 1:
        known = ", ".join(sorted(name for name, step in STEPS.items() if step.quantizer))
        raise PtqError(f"recipe {recipe!r}: needs exactly one quantizer step ({known}), got {quantizers or 'none'}")
    index = next(i for i, step in enumerate(steps) if step.quantizer)
    for position, step in enumerate(steps):
        if position < index and step.refines:
            raise PtqError(f"recipe {recipe!r}: {step.name!r} refines a quantizer's result and must come after {steps[index].name!r}")
        if position > index and not step.refines:
            raise PtqError(f"recipe {recipe!r}: {step.name!r} must come before the quantizer {steps[index].name!r}")


DWR_SPACES = ("svd", "random")


@dataclass(frozen=True)
class DwrSettings:
    """DWR's search (docs/papers.md#dwr): the search space, the candidate ranks k (k = 0, the base,
    is always a candidate), how many calibration windows score a candidate (None: all), the seed
    of the random space."""

    space: str = "svd"
    ranks: tuple[int, ...] = (64, 128, 256)
    windows: int | None = None
    seed: int = 0

    def relative_cost(self, calibration_windows: int, blocks: int = 32) -> float:
        """The search's rough run time in calibration passes (``Step.relative_cost``): each of the
        ``blocks`` scores every rank by a forward of the scoring windows from that block to the
        head, half the model on average (SmolLM2, 30 blocks, 4 ranks on 1 of 16 windows: 3.7)."""
        windows = min(self.windows or calibration_windows, calibration_windows)
        return len(self.ranks) * blocks * windows / (2 * calibration_windows)


@dataclass(frozen=True)
class Reconstruction:
    name: str
    base: str
    settings: DwrSettings


def is_reconstruction(entry) -> bool:
    return isinstance(entry, dict) and "base" in entry


def reconstruction_from_config(name: str, entry: dict, recipes: dict | None = None) -> Reconstruction:
    """Validate a reconstruction entry ``{base: <recipe>, dwr: {...}}`` (and its base against the
    config's other ``recipes`` when given)."""
    if not RECIPE_NAME.fullmatch(name):
        raise PtqError(f"recipe name {name!r} may only use letters, digits and _ . + @ = -")
    unknown = set(entry) - {"base", "dwr"}
    if unknown:
        raise PtqError(f"recipe {name!r}: a reconstruction recipe has only 'base' and 'dwr', not {', '.join(sorted(unknown))}")
    base = entry.get("base")
    if not isinstance(base, str):
        raise PtqError(f"recipe {name!r}: a reconstruction recipe needs 'base', the name of another recipe")
    if recipes is not None and base not in recipes:
        raise PtqError(f"recipe {name!r}: base recipe {base!r} is not in the config")
    if recipes is not None and (is_reconstruction(recipes[base]) or not (recipes[base].get("steps") or [])):
        raise PtqError(f"recipe {name!r}: base {base!r} must be a quantization recipe with steps")
    settings = dict(entry.get("dwr") or {})
    known = {f.name for f in fields(DwrSettings)}
    if set(settings) - known:
        raise PtqError(f"recipe {name!r}: dwr has no setting(s) {', '.join(sorted(set(settings) - known))} "
                       f"(known: {', '.join(sorted(known))})")
    if settings.get("space", "svd") not in DWR_SPACES:
        raise PtqError(f"recipe {name!r}: dwr space {settings['space']!r} is not one of {', '.join(DWR_SPACES)}")
    ranks = settings.get("ranks", DwrSettings.ranks)
    if not ranks or not all(isinstance(k, int) and k > 0 for k in ranks):
        raise PtqError(f"recipe {name!r}: dwr ranks must be a non-empty list of positive integers, got {ranks!r}")
    windows = settings.get("windows")
    if windows is not None and (not isinstance(windows, int) or windows < 1):
        raise PtqError(f"recipe {name!r}: dwr windows must be a positive integer or null, got {windows!r}")
    settings["ranks"] = tuple(sorted(set(ranks)))
    return Reconstruction(name=name, base=base, settings=DwrSettings(**settings))
