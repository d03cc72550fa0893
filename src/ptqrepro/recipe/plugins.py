"""Steps from outside the package: the two ways a method of one's own reaches every process.

* An installed distribution declares entry points in the group ``ptqrepro.methods``, e.g. in its
  ``pyproject.toml``::

      [project.entry-points."ptqrepro.methods"]
      cliprtn = "my_methods.cliprtn"

  Each entry point is loaded (its module imported, which runs its ``@register_step``) the first
  time a recipe names a step that is not registered yet, in the Snakemake process and in every job.
* A config lists modules under ``plugins:`` (importable through ``PYTHONPATH``): ``check_config``
  imports them, and the spec of every recipe that names a step from outside the package carries
  the list (``config.recipe_job_spec``), so its quantize job imports them too.

See docs/extending.md#bring-your-own-method.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from ptqrepro.errors import PtqError
from ptqrepro.recipe.steps import STEPS, Step

ENTRY_POINT_GROUP = "ptqrepro.methods"

_entry_points_loaded = False


def load_entry_points() -> None:
    """Load every entry point of ``ENTRY_POINT_GROUP``, once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as error:  # a broken plugin is one line naming it, not a traceback
            raise PtqError(f"entry point {entry.name!r} = {entry.value!r} of group {ENTRY_POINT_GROUP} fails to load: "
                           f"{type(error).__name__}: {error}") from None


def import_plugins(modules) -> None:
    """Import the config's ``plugins`` (module names), each of which registers its steps."""
    if not isinstance(modules, (list, tuple)) or not all(isinstance(module, str) and module for module in modules):
        raise PtqError(f"plugins must be a list of module names, got {modules!r}")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            raise PtqError(f"plugins: cannot import {module!r} ({type(error).__name__}: {error}); "
                           "is its folder on PYTHONPATH?") from None


def step_class(recipe: str, name: str) -> type[Step]:
    """The step class registered as ``name``, after the entry points where it is not built in."""
    if name not in STEPS:
        load_entry_points()
    if name not in STEPS:
        raise PtqError(f"recipe {recipe!r}: unknown step {name!r} (known: {', '.join(sorted(STEPS))}; a step of "
                       f"one's own is registered by a module in 'plugins' or an entry point of {ENTRY_POINT_GROUP})")
    return STEPS[name]
