"""The plan of a config (ptqrepro.plan), without Snakemake running: which jobs, seeds, priorities
and targets the workflow gets, each recipe parsed once."""

import pytest
from snakemake.utils import validate

import ptqrepro.checks.config
import ptqrepro.plan
from ptqrepro.checks.config import check_config
from ptqrepro.plan import build_plan
from test_dag import REPO

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


def checked(config: dict) -> dict:
    """The config as the rules see it: the schema's defaults filled in, the checks passed."""
    validate(config, SCHEMA)
    check_config(config)
    return config


def experiment(**overrides) -> dict:
    """Two models, three calibration seeds; fp16 and RTN (no calibration), GPTQ, MagR+GPTQ on one
    model, DWR on GPTQ at two seeds, L2QER (activation statistics: calibrated)."""
    return checked({
        "models": {"a": {"hub": "org/a"}, "b": {"hub": "org/b"}},
        "calibration": {"corpus": "wikitext2", "nsamples": 16, "seeds": [0, 1, 2]},
        "eval": {"ppl": {"datasets": ["wikitext2", "c4"]}},
        "recipes": {
            "fp16": {"steps": []},
            "rtn@int4": {"steps": ["rtn"], "weight": "int4"},
            "gptq@int3": {"steps": ["gptq"], "weight": "int3"},
            "magr+gptq@int3": {"steps": ["magr", "gptq"], "weight": "int3", "models": ["b"]},
            "gptq+dwr@int3": {"base": "gptq@int3", "dwr": {"ranks": [4, 16]}, "seeds": [0, 2]},
            "l2qer-k4@int4": {"steps": ["rtn", {"l2qer": {"rank": 4}}], "weight": "int4"},
        },
        **overrides,
    })


def test_each_recipe_runs_on_its_models_at_its_seeds():
    plan = build_plan(experiment())
    seeds = {name: recipe.seeds for name, recipe in plan.recipes.items()}
    assert seeds == {"fp16": (0,), "rtn@int4": (0,), "gptq@int3": (0, 1, 2), "magr+gptq@int3": (0, 1, 2),
                     "gptq+dwr@int3": (0, 2), "l2qer-k4@int4": (0, 1, 2)}
    assert ("a", "magr+gptq@int3") not in plan.runs and ("b", "magr+gptq@int3") in plan.runs
    assert len(plan.seeded_runs) == 2 * (1 + 1 + 3 + 2 + 3) + 3
    assert plan.quantizations == ["fp16", "rtn@int4", "gptq@int3", "magr+gptq@int3", "l2qer-k4@int4"]
    assert plan.reconstructions == ["gptq+dwr@int3"] and plan.recipes["gptq+dwr@int3"].base == "gptq@int3"
    assert [plan.recipes[name].calibrates for name in plan.recipes] == [False, False, True, True, True, True]


def test_the_targets_follow_the_recipes():
    plan = build_plan(experiment())
    targets = plan.targets()
    assert targets[:4] == ["results/tables/all.csv", "results/tables/all.md", "results/tables/claims.csv",
                           "results/tables/claims.md"]
    assert "results/plots/dwr/a/gptq+dwr@int3.png" in targets and "results/plots/dwr/b/gptq+dwr@int3.png" in targets
    assert [t for t in targets if "/magr/" in t] == ["results/plots/magr/b/magr+gptq@int3.png"]
    assert plan.table_figures == ["ppl_vs_bits", "lqer_ranks", "job_costs"]  # no zero-shot; an L2QER recipe
    assert "results/tables/papers" not in targets
    inputs = plan.table_inputs()
    assert len(inputs) == len(plan.seeded_runs) * 3 and len(set(inputs)) == len(inputs)
    assert "results/metrics/b/gptq+dwr@int3/s2/ppl-c4.json" in inputs
    assert plan.calibration_file.format(model="a", seed=2) == "results/calibration/a/wikitext2-n16-l2048-s2.pt"


def test_a_base_recipe_with_dwr_waiting_on_it_starts_first():
    plan = build_plan(experiment())
    priorities = {name: recipe.priority for name, recipe in plan.recipes.items()}
    alone = build_plan(experiment(recipes={"gptq@int3": {"steps": ["gptq"], "weight": "int3"}}))
    assert priorities["gptq@int3"] > alone.recipes["gptq@int3"].priority > priorities["rtn@int4"] >= 1
    assert priorities["gptq+dwr@int3"] > priorities["rtn@int4"]


def test_each_recipe_is_parsed_once(monkeypatch):
    config = experiment()
    parsed = []

    def counting(name, entry):
        parsed.append(name)
        return original(name, entry)

    original = ptqrepro.plan.recipe_from_config
    monkeypatch.setattr(ptqrepro.plan, "recipe_from_config", counting)
    monkeypatch.setattr(ptqrepro.checks.config, "recipe_from_config", counting)
    build_plan(config)
    assert sorted(parsed) == sorted(["fp16", "rtn@int4", "gptq@int3", "magr+gptq@int3", "l2qer-k4@int4"])


def zeroshot_experiment(**zeroshot) -> dict:
    return experiment(eval={"ppl": {"datasets": ["wikitext2"]},
                            "zeroshot": {"tasks": ["ptq_lastword", "arc_easy"], "corpus": "wikitext2", **zeroshot}})


def test_zero_shot_runs_at_the_first_seed_of_the_chosen_recipes_and_models():
    plan = build_plan(zeroshot_experiment(recipes=["gptq@int3", "fp16"], models=["a"],
                                          metrics={"arc_easy": "acc_norm"}, averages={"avg": ["ptq_lastword", "arc_easy"]}))
    assert plan.zeroshot_runs == (("a", "fp16", 0), ("a", "gptq@int3", 0))
    assert plan.zeroshot_recipes == ["fp16", "gptq@int3"]
    assert "accuracy_vs_bits" in plan.table_figures
    assert plan.hub_tasks == ("arc_easy",) and plan.staged_tasks.startswith("results/zeroshot/staged-")
    assert plan.local_tasks_dir == "results/zeroshot/wikitext2-n200-s0"
    assert plan.metric_option() == "--metric arc_easy=acc_norm"
    assert plan.averages == {"avg": {"ptq_lastword": "acc", "arc_easy": "acc_norm"}}
    assert [f for f in plan.table_inputs() if "zeroshot" in f] == [
        f"results/metrics/a/{recipe}/s0/zeroshot-{task}.json" for recipe in ("fp16", "gptq@int3")
        for task in ("ptq_lastword", "arc_easy")]
    none = build_plan(experiment())
    assert none.zeroshot_runs == () and none.staged_tasks is None and none.metric_option() == "" and not none.averages


PEER = {"llmc-gptq@int3": {"toolkit": "llm-compressor", "mirrors": "gptq@int3"}}


def test_a_peer_recipe_whose_toolkit_is_missing_is_left_out():
    config = experiment(recipes={"gptq@int3": {"steps": ["gptq"], "weight": "int3"}, **PEER})
    plan = build_plan(config, missing_toolkit=lambda name: f"{name} is not installed")
    assert list(plan.recipes) == ["gptq@int3"] and plan.skipped_peers == {"llmc-gptq@int3": "llm-compressor is not installed"}
    assert plan.peer_runs == [] and plan.peers_table_inputs() == []


@pytest.mark.parametrize("claimed", [False, True])
def test_a_peer_recipe_mirrors_its_recipe_and_is_reported_where_a_claim_names_it(claimed):
    claims = [{"paper": "p", "claim": "c", "below": ["llmc-gptq@int3", "rtn@int4"]}] if claimed else []
    config = experiment(recipes={"gptq@int3": {"steps": ["gptq"], "weight": "int3"},
                                 "rtn@int4": {"steps": ["rtn"], "weight": "int4"}, **PEER}, claims=claims)
    plan = build_plan(config, missing_toolkit=lambda name: None)
    peer = plan.recipes["llmc-gptq@int3"]
    assert peer.kind == "peer" and peer.mirrors == "gptq@int3" and peer.seeds == (0, 1, 2)
    assert peer.priority == plan.recipes["gptq@int3"].priority and peer.calibration_dtype == "float32"
    assert plan.quantizations == ["gptq@int3", "rtn@int4", "llmc-gptq@int3"] and plan.peers == ["llmc-gptq@int3"]
    assert plan.mirrored_runs == sorted((model, "gptq@int3", seed) for model in "ab" for seed in (0, 1, 2))
    assert ("llmc-gptq@int3" in plan.reported) is claimed
    assert any("llmc-gptq@int3" in path for path in plan.table_inputs()) is claimed
    assert "results/metrics/b/llmc-gptq@int3/s1/agreement.json" in plan.peers_table_inputs()


def test_the_vllm_export_runs_the_recipes_it_names():
    plan = build_plan(experiment(export_vllm={"recipes": ["gptq@int3"]}))
    assert plan.vllm_runs == [(model, "gptq@int3", seed) for model in "ab" for seed in (0, 1, 2)]
    assert plan.vllm_dataset == "wikitext2"
