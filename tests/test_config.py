"""The config's own checks (ptqrepro.checks.config): every error of a config in one refusal, each once."""

from __future__ import annotations

import pytest

from ptqrepro.checks.config import ConfigError, check_config, check_config_files
from ptqrepro.errors import PtqError

from test_dag import tiny_config


def config_errors(config: dict) -> list[str]:
    """The errors ``check_config`` lists for ``config`` (it must refuse it)."""
    with pytest.raises(ConfigError) as refused:
        check_config(config)
    assert str(refused.value).splitlines()[1:] == [f"  {error}" for error in refused.value.errors]
    return refused.value.errors


def test_every_independent_error_is_listed(tmp_path):
    """A recipe with an unknown model and an unknown step, one with a bad format, a claim and the
    zero-shot recipes naming recipes the config lacks, both `seed` and `seeds`: six errors, each in
    its own line, in the order of the config's sections."""
    config = tiny_config(tmp_path / "model", tmp_path / "corpus")
    config["recipes"]["bad"] = {"steps": ["rtn", "warp"], "weight": "int4", "models": ["huge"]}
    config["recipes"]["fmt"] = {"steps": ["rtn"], "weight": "int4-gx"}
    config["claims"].append({"paper": "X", "claim": "c", "below": ["fp16", "gone"]})
    config["eval"]["zeroshot"]["recipes"] = ["rtn@int4-g16", "missing"]
    config["calibration"]["seeds"] = [0, 1]
    errors = config_errors(config)
    expected = [
        "calibration: give 'seeds' (a list) or 'seed' (one), not both",
        "recipe 'bad': models huge are not in the config's models",
        "recipe 'bad': unknown step 'warp'",
        "cannot parse format 'int4-gx'",
        "claim 3 ('c'): recipe(s) gone not in the config's recipes",
        "eval.zeroshot.recipes: missing not in the config's recipes",
    ]
    assert len(errors) == len(expected), errors
    for error, start in zip(errors, expected):
        assert start in error, (start, error)


def test_an_error_read_by_several_checks_is_listed_once(tmp_path):
    """Each recipe's seeds read the calibration seeds, and a DWR recipe's those of its base: a bad
    calibration entry and a base with a bad step are one error each, and the DWR recipe on that base
    is checked without failing on it."""
    config = tiny_config(tmp_path / "model", tmp_path / "corpus", {
        "gptq": {"steps": ["gptq", "warp"], "weight": "int3"},
        "dwr": {"base": "gptq"},
        "rtn": {"steps": ["rtn"], "weight": "int4"},
    })
    config["calibration"]["seed"] = -1
    calibration, step = config_errors(config)
    assert calibration == "calibration.seeds must be a non-empty list of integers >= 0, got [-1]"
    assert step.startswith("recipe 'gptq': unknown step 'warp' (known: ")


def test_a_good_config_passes(tmp_path):
    check_config(tiny_config(tmp_path / "model", tmp_path / "corpus"))


def test_every_key_given_twice_in_every_file_is_listed(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("a: 1\nb: {c: 1, c: 2}\na: 3\n")
    second.write_text("recipes:\n  r: {steps: []}\n  r: {steps: [rtn]}\n")
    with pytest.raises(PtqError) as refused:
        check_config_files([str(first), str(second)])
    assert str(refused.value).splitlines() == [
        f"{first}: duplicate key 'a' (line 1 and line 3)",
        f"{first}: duplicate key 'c' (line 2, columns 5 and 11)",
        f"{second}: duplicate key 'r' (line 2 and line 3)",
    ]


def test_a_slow_tokenizer_transformers_cannot_load_is_refused(tmp_path, monkeypatch):
    """transformers 5 has no slow LLaMA/Mistral/OPT tokenizer: `slow` is a planning-time error
    naming both keys that ask for it, never a silent fast one."""
    from ptqrepro.checks import config as config_module
    config = tiny_config(tmp_path / "model", tmp_path / "corpus")
    config["calibration"]["tokenizer"] = "slow"
    config["eval"]["ppl"]["tokenizer"] = "slow"
    monkeypatch.setattr(config_module, "slow_tokenizer_problem", lambda: "transformers 9.0 has none")
    assert config_errors(config) == [
        "calibration.tokenizer and eval.ppl.tokenizer: slow cannot be honoured: transformers 9.0 has none; set fast"
    ]
    monkeypatch.setattr(config_module, "slow_tokenizer_problem", lambda: None)
    check_config(config)


def test_a_corpus_without_the_split_a_job_reads_is_refused(tmp_path):
    config = tiny_config(tmp_path / "model", tmp_path / "corpus")
    config["eval"]["ppl"]["datasets"] = ["slimpajama"]
    assert config_errors(config) == ["eval.ppl.datasets: corpus 'slimpajama' has no test split (has: train)"]


def test_the_schema_types_the_corpus_and_tokenizer_settings(tmp_path):
    from pathlib import Path

    from ptqrepro.checks.config import check_schema

    schema = Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml"
    config = tiny_config(tmp_path / "model", tmp_path / "corpus")
    config["corpora"]["wikitext2"] = {"trian_join": "\n\n", "exact_length_documents": "drop", "chunk_shards": 0}
    config["eval"]["ppl"]["tokenizer"] = "slowest"
    with pytest.raises(PtqError) as refused:
        check_schema(config, schema)
    lines = str(refused.value).splitlines()[1:]
    assert lines == [
        "  corpora.wikitext2: Additional properties are not allowed ('trian_join' was unexpected)",
        "  corpora.wikitext2.chunk_shards: 0 is less than the minimum of 1",
        "  corpora.wikitext2.exact_length_documents: 'drop' is not one of ['keep', 'redraw']",
        "  eval.ppl.tokenizer: 'slowest' is not one of ['fast', 'slow']",
    ]


def test_zero_shot_metrics_averages_and_models_name_what_the_config_has(tmp_path):
    """``eval.zeroshot.metrics`` and ``averages`` name configured tasks, an average is not a task's
    name, ``models`` are the config's: one error each."""
    config = tiny_config(tmp_path / "model", tmp_path / "corpus")
    zeroshot = config["eval"]["zeroshot"]
    zeroshot["metrics"] = {"ptq_nextsentence": "acc_norm", "arc_easy": "acc_norm"}
    zeroshot["averages"] = {"both": ["ptq_lastword", "ptq_nextsentence"], "ptq_lastword": ["ptq_lastword"], "wider": ["piqa"]}
    zeroshot["models"] = ["tiny", "huge"]
    assert config_errors(config) == [
        "eval.zeroshot.metrics: arc_easy is not in eval.zeroshot.tasks",
        "eval.zeroshot.averages.ptq_lastword: the name of a task; name the average otherwise",
        "eval.zeroshot.averages.wider: piqa not in eval.zeroshot.tasks",
        "eval.zeroshot.models: huge not in the config's models",
    ]
    zeroshot["metrics"] = {"ptq_nextsentence": "acc_norm"}
    zeroshot["averages"] = {"both": ["ptq_lastword", "ptq_nextsentence"]}
    zeroshot["models"] = ["tiny"]
    check_config(config)


def test_calibrated_recipes_a_claim_names_at_fewer_than_three_seeds_are_warned_about():
    """The default, the whole SmolLM2 grid and every paper config run each calibrated recipe a claim
    names at three or more seeds; at one seed the warning names exactly the calibrated recipes (not
    fp16 or RTN)."""
    import glob

    from ptqrepro.checks.config import single_draw_warnings
    from ptqrepro.runtime.io import load_yaml

    for path in ["config/config.yaml", "config/smollm2-grid.yaml", *sorted(glob.glob("config/papers/*.yaml"))]:
        assert single_draw_warnings(load_yaml(open(path).read(), path)) == [], path
    config = {"calibration": {"seeds": [0]},
              "recipes": {"fp16": {"steps": []}, "rtn@int4": {"steps": ["rtn"], "weight": "int4"},
                          "gptq@int4": {"steps": ["gptq"], "weight": "int4"},
                          "awq+rtn@int4": {"steps": ["awq", "rtn"], "weight": "int4", "seeds": [0, 1, 2]}},
              "claims": [{"paper": "X", "claim": "c", "below": ["fp16", "gptq@int4", "rtn@int4"]},
                         {"paper": "X", "claim": "d", "below": ["awq+rtn@int4", "rtn@int4"]}]}
    warnings = single_draw_warnings(config)
    assert len(warnings) == 1 and warnings[0].startswith("recipe 'gptq@int4' is named by a claim") and "[0]" in warnings[0]


def schema_document() -> dict:
    from pathlib import Path

    import yaml

    return yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())


JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", type(None): "null", tuple: "array"}


def json_types(annotation) -> set[str]:
    """The JSON schema types of a dataclass field's annotation (``int | None``: integer, null)."""
    import types
    import typing

    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return {JSON_TYPES[typing.get_origin(member) or member] for member in members}


def schema_types(setting: dict, defs: dict) -> set[str]:
    if "$ref" in setting:
        setting = defs[setting["$ref"].rpartition("/")[2]]
    kinds = setting["type"]
    return {kinds} if isinstance(kinds, str) else set(kinds)


def settings_disagreements(schema: dict) -> list[str]:
    """Where the schema's step and DWR settings (names, JSON types, allowed values) differ from the
    dataclasses and constants that the code checks them with; each disagreement one line."""
    import typing
    from dataclasses import fields

    from ptqrepro.methods.gptq import GROUP_MODES
    from ptqrepro.peers import TOOLKITS
    from ptqrepro.recipe.recipes import DWR_SPACES, DwrSettings
    from ptqrepro.recipe.steps import AWQ_LOSSES, BUILTIN_STEPS, PRECISIONS, STEPS

    defs = schema["$defs"]
    recipe = schema["properties"]["recipes"]["additionalProperties"]["properties"]
    step_refs = recipe["steps"]["items"]["properties"]
    problems = []
    if set(step_refs) | {"rtn"} != set(BUILTIN_STEPS):
        problems.append(f"step names: schema {sorted(set(step_refs) | {'rtn'})}, code {sorted(BUILTIN_STEPS)}")
    settings = {name: defs[ref["$ref"].rpartition("/")[2]] for name, ref in step_refs.items()}
    settings["dwr"] = recipe["dwr"]
    classes = {**{name: STEPS[name] for name in settings if name in STEPS}, "dwr": DwrSettings}
    for name, cls in classes.items():
        hints = typing.get_type_hints(cls)
        ours = {f.name: json_types(hints[f.name]) for f in fields(cls)}
        theirs = {key: schema_types(value, defs) for key, value in settings[name].get("properties", {}).items()}
        if ours != theirs:
            problems.append(f"{name}: settings and types: schema {theirs}, code {ours}")
    allowed = {
        "gptq.groups": (settings["gptq"]["properties"]["groups"]["enum"], [*GROUP_MODES, None]),
        "awq.loss": (settings["awq"]["properties"]["loss"]["enum"], AWQ_LOSSES),
        "precision (awq, magr)": (defs["precision"]["enum"], PRECISIONS),
        "dwr.space": (recipe["dwr"]["properties"]["space"]["enum"], DWR_SPACES),
        "toolkit": (recipe["toolkit"]["enum"], tuple(TOOLKITS)),
    }
    problems += [f"{key}: schema {list(schema_values)}, code {list(code)}"
                 for key, (schema_values, code) in allowed.items() if list(schema_values) != list(code)]
    return problems


def test_the_schema_and_the_steps_allow_the_same_settings_and_values():
    assert settings_disagreements(schema_document()) == []


def test_a_setting_or_value_the_code_does_not_know_is_a_disagreement():
    schema = schema_document()
    schema["$defs"]["step_awq"]["properties"]["loss"]["enum"].append("kl")
    schema["$defs"]["precision"]["enum"].remove("auto")
    schema["$defs"]["step_cd"]["properties"]["sweeps"]["type"] = "number"
    del schema["$defs"]["step_magr"]["properties"]["iterations"]
    schema["properties"]["recipes"]["additionalProperties"]["properties"]["toolkit"]["enum"].append("gptqmodel")
    problems = settings_disagreements(schema)
    assert [problem.split(":")[0] for problem in problems] == [
        "magr", "cd", "awq.loss", "precision (awq, magr)", "toolkit"], problems
