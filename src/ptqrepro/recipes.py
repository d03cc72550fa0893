"""A recipe is a named list of steps, applied in order to each decoder layer, and a weight format.

Config form::

    recipes:
      fp16: {steps: []}
      rtn@int4-g64: {steps: [rtn], weight: int4-g64}
      sq+awq+gptq@mxint4_a=mxint8: {steps: [{smoothquant: {alpha: 0.5}}, awq, gptq], weight: mxint4, act: mxint8}

A step is a name or a one-key mapping ``{name: {setting: value}}``. The last step of a recipe
that has steps must be a quantizer (it turns float weights into codes of the weight format).
``act`` names the format of the dynamic fake quantization of every linear's input at
evaluation (none by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ptqrepro.errors import PtqError
from ptqrepro.formats import GroupedFormat, parse_format
from ptqrepro.steps import STEPS, Step

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


def build_step(recipe: str, entry) -> Step:
    if isinstance(entry, str):
        name, settings = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, settings = next(iter(entry.items()))
        settings = settings or {}
    else:
        raise PtqError(f"recipe {recipe!r}: a step is a name or {{name: {{settings}}}}, got {entry!r}")
    if name not in STEPS:
        raise PtqError(f"recipe {recipe!r}: unknown step {name!r} (known: {', '.join(sorted(STEPS))})")
    return STEPS[name].from_settings(recipe, settings)


def recipe_from_config(name: str, entry: dict) -> Recipe:
    """Validate one config entry into a Recipe; every problem is one line naming the recipe."""
    if not RECIPE_NAME.fullmatch(name):
        raise PtqError(f"recipe name {name!r} may only use letters, digits and _ . + @ = -")
    if not isinstance(entry, dict):
        raise PtqError(f"recipe {name!r}: expected a mapping with 'steps' and 'weight'")
    unknown = set(entry) - {"steps", "weight", "act"}
    if unknown:
        raise PtqError(f"recipe {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
    steps = tuple(build_step(name, step) for step in entry.get("steps") or [])
    weight = parse_format(entry.get("weight"))
    act = parse_format(entry.get("act"))
    if steps and not steps[-1].quantizer:
        raise PtqError(f"recipe {name!r}: the last step must be a quantizer, not {steps[-1].name!r}")
    if steps and weight is None:
        raise PtqError(f"recipe {name!r}: steps {[s.name for s in steps]} need a 'weight' format")
    if weight is not None and not steps:
        raise PtqError(f"recipe {name!r}: weight format {weight.name} given but no quantizer step")
    return Recipe(name=name, steps=steps, weight=weight, act=act)
