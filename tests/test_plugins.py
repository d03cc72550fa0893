"""Steps of one's own (ptqrepro.recipe.plugins): registered by a config's ``plugins`` or an entry point,
then named by recipes, checked by the schema and check_config, carried to the quantize job.
The plugin is tests/plugins/ptq_cliprtn.py (round-to-nearest with a clipping search)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from ptqrepro.recipe import plugins
from ptqrepro.checks.config import ConfigError, check_config, check_schema, recipe_job_spec
from ptqrepro.errors import PtqError
from ptqrepro.formats import parse_format
from ptqrepro.methods.rtn import rtn
from ptqrepro.recipe.recipes import recipe_from_config
from ptqrepro.recipe.steps import BUILTIN_STEPS, STEPS, Step, register_step

from test_dag import tiny_config

PLUGINS = Path(__file__).parent / "plugins"
SCHEMA = Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml"


@pytest.fixture()
def registry(monkeypatch):
    """The plugin folder on sys.path; the registry, the plugin module and the entry points' state
    as they were, afterwards."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    saved = dict(STEPS)
    yield
    STEPS.clear()
    STEPS.update(saved)
    sys.modules.pop("ptq_cliprtn", None)


def plugin_config(tmp_path) -> dict:
    return tiny_config(tmp_path / "model", tmp_path / "corpus", {
        "rtn@int4-g16": {"steps": ["rtn"], "weight": "int4-g16"},
        "cliprtn@int4-g16": {"steps": [{"cliprtn": {"ratios": [1.0, 0.9]}}], "weight": "int4-g16"},
    })


def test_a_plugin_step_passes_the_schema_and_check_config_and_reaches_its_job_spec(tmp_path, registry):
    config = plugin_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown step 'cliprtn'"):
        check_config(config)
    config["plugins"] = ["ptq_cliprtn"]
    check_schema(config, SCHEMA)
    check_config(config)
    assert "cliprtn" in STEPS and "cliprtn" not in BUILTIN_STEPS
    # the job of the plugin's recipe imports it (its own process); a built-in recipe's spec is unchanged
    spec = recipe_job_spec(config, "cliprtn@int4-g16")
    assert spec["plugins"] == ["ptq_cliprtn"]
    assert "plugins" not in recipe_job_spec(config, "rtn@int4-g16")
    del STEPS["cliprtn"]
    sys.modules.pop("ptq_cliprtn")
    recipe = recipe_from_config("cliprtn@int4-g16", spec)
    assert recipe.method == "cliprtn" and recipe.quantizer.ratios == (1.0, 0.9)


def test_a_plugin_that_cannot_be_imported_or_a_bad_setting_is_one_line(tmp_path, registry):
    config = plugin_config(tmp_path)
    config["plugins"] = ["ptq_absent_plugin"]
    errors = [error for error in pytest.raises(ConfigError, check_config, config).value.errors]
    assert errors[0].startswith("plugins: cannot import 'ptq_absent_plugin' (ModuleNotFoundError")
    config["plugins"] = ["ptq_cliprtn"]
    config["recipes"]["cliprtn@int4-g16"]["steps"] = [{"cliprtn": {"ratios": [0.9], "grid": 3}}]
    assert pytest.raises(ConfigError, check_config, config).value.errors == [
        "recipe 'cliprtn@int4-g16': step 'cliprtn' has no setting(s) grid (known: ratios)"]


def test_an_installed_entry_point_registers_its_step_on_first_use(registry, monkeypatch):
    entry = metadata.EntryPoint(name="cliprtn", value="ptq_cliprtn", group=plugins.ENTRY_POINT_GROUP)
    asked = []
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: asked.append(group) or [entry])
    recipe = recipe_from_config("cliprtn@int3", {"steps": ["cliprtn"], "weight": "int3"})
    assert recipe.quantizer.name == "cliprtn" and asked == [plugins.ENTRY_POINT_GROUP]
    recipe_from_config("cliprtn@int2", {"steps": ["cliprtn"], "weight": "int2"})
    assert asked == [plugins.ENTRY_POINT_GROUP]  # loaded once per process
    broken = metadata.EntryPoint(name="broken", value="ptq_absent_plugin", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [broken])
    with pytest.raises(PtqError, match="entry point 'broken' = 'ptq_absent_plugin' of group ptqrepro.methods fails to load"):
        recipe_from_config("x", {"steps": ["nostep"], "weight": "int3"})


def test_register_step_refuses_a_taken_name_and_a_bad_one(registry):
    @dataclass(frozen=True)
    class Another(Step):
        name: ClassVar[str] = "gptq"
        quantizer: ClassVar[bool] = True

    with pytest.raises(PtqError, match="step 'gptq' is already ptqrepro.recipe.steps.GptqStep"):
        register_step(Another)
    Another.name = "my+step"
    with pytest.raises(PtqError, match="must be letters, digits"):
        register_step(Another)
    assert STEPS["gptq"].__name__ == "GptqStep"


def test_the_clipping_search_is_never_worse_than_rtn_per_row(registry):
    from ptq_cliprtn import clip_search_rtn

    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    weight[:8, 0] *= 12  # rows with an outlier, where clipping pays
    for spelling in ("int3", "int3-g16"):
        fmt = parse_format(spelling)
        quantized, chosen = clip_search_rtn(weight, fmt, (1.0, 0.9, 0.8, 0.7))
        ours = (quantized.dequantize() - weight).pow(2).sum(dim=1)
        plain = (rtn(weight, fmt).dequantize() - weight).pow(2).sum(dim=1)
        assert (ours <= plain * (1 + 1e-6)).all()
        assert (chosen < 1).any() and ours.sum() < plain.sum()
        only_one = clip_search_rtn(weight, fmt, (1.0,))[0]
        assert torch.equal(only_one.codes, rtn(weight, fmt).codes)


def test_the_preflight_reports_what_a_plugin_step_cannot_do_on_a_model(registry):
    from ptqrepro.models.shapes import ModelShapes
    from ptqrepro.checks.preflight import recipe_problems

    @register_step
    @dataclass(frozen=True)
    class Blocked(Step):
        """A quantizer whose ``block`` must divide every linear's inputs."""

        name: ClassVar[str] = "blocked"
        quantizer: ClassVar[bool] = True
        block: int = 48

        def shape_problems(self, shapes):
            uneven = sorted(linear for linear, width in shapes.inputs.items() if width % self.block)
            return [("block", self.block, f"does not divide the inputs of {', '.join(uneven)}", "a divisor of 64")] if uneven else []

    shapes = ModelShapes(model_type="llama", linears={"q_proj": (64, 64), "down_proj": (128, 64)}, context=None)
    problems = recipe_problems("blocked@int4", {"steps": ["blocked"], "weight": "int4"}, "tiny", shapes)
    assert [str(problem) for problem in problems] == [
        "recipes.blocked@int4.steps[0].blocked.block: 48: does not divide the inputs of down_proj, q_proj (model tiny); "
        "allowed: a divisor of 64"]
    assert recipe_problems("blocked@int4", {"steps": [{"blocked": {"block": 32}}], "weight": "int4"}, "tiny", shapes) == []
