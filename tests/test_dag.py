"""The real Snakefile on a tiny random-initialised LLaMA and a tiny corpus, in a temp directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]


def tiny_config(model_dir, corpus_dir, recipes=None, claims=None) -> dict:
    return {
        "offline": True,
        "device": "cpu",
        "threads": 1,
        "models": {"tiny": {"hub": str(model_dir)}},
        "corpora": {"tiny": {"source": "local", "path": str(corpus_dir)}},
        "calibration": {"corpus": "tiny", "nsamples": 4, "seqlen": 32, "seed": 0, "batch_size": 2},
        "recipes": recipes or {
            "fp16": {"steps": []},
            "rtn@int8": {"steps": ["rtn"], "weight": "int8"},
            "rtn@int4-g16": {"steps": ["rtn"], "weight": "int4-g16"},
            "rtn@int2": {"steps": ["rtn"], "weight": "int2"},
        },
        "eval": {"ppl": {"datasets": ["tiny"], "seqlen": 32, "max_windows": 8, "batch_size": 4, "dtype": "float32"},
                 **({} if recipes else {"zeroshot": {"tasks": ["ptq_lastword", "ptq_nextsentence"], "corpus": "tiny",
                                                     "items": 8, "recipes": ["rtn@int4-g16"], "max_length": 256}})},
        "reference": [] if recipes else [str(REPO / "config" / "reference" / "lqer.csv")],
        "claims": claims if claims is not None else [] if recipes else [
            {"paper": "sanity", "claim": "int2 worse than int4-g16", "below": ["rtn@int4-g16", "rtn@int2"]},
            {"paper": "sanity", "claim": "recipes without a zero-shot result", "below": ["rtn@int8", "rtn@int2"],
             "metric": {"kind": "zeroshot", "name": "acc"}},
        ],
    }


def snakemake(workdir: Path, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *extra], capture_output=True, text=True, env=env)


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.slow
def test_tiny_dag_end_to_end(tmp_path, tiny_model_dir, tiny_corpus):
    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus))
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    table = pandas.read_csv(tmp_path / "results/tables/all.csv")
    ppl = table[(table.kind == "perplexity") & (table.metric == "ppl")].set_index("recipe")["value"]
    assert set(ppl.index) == {"fp16", "rtn@int8", "rtn@int4-g16", "rtn@int2"}
    assert ppl["rtn@int8"] == pytest.approx(ppl["fp16"], rel=0.02)
    assert ppl["rtn@int2"] > ppl["rtn@int4-g16"] > ppl["fp16"] * 0.99
    assert (table[table.kind != "zeroshot"].dataset == "tiny").all() and table.config_hash.notna().all()
    assert "rtn@int4-g16" in (tmp_path / "results/tables/all.md").read_text()
    zeroshot = table[table.kind == "zeroshot"]
    assert set(zeroshot.recipe) == {"rtn@int4-g16"} and set(zeroshot.dataset) == {"ptq_lastword", "ptq_nextsentence"}
    assert "ptq_nextsentence acc_norm" in (tmp_path / "results/tables/all.md").read_text()
    papers = (tmp_path / "results/tables/papers/lqer.md").read_text()
    assert "ours alone" in papers and "| int4-g16 | rtn |" in papers
    claims = pandas.read_csv(tmp_path / "results/tables/claims.csv").set_index("claim")
    assert claims.loc["int2 worse than int4-g16", "verdict"] == "holds"
    assert claims.loc["recipes without a zero-shot result", "verdict"].tolist() == ["not run", "not run"]  # two tasks
    for suffix in ("png", "pdf"):
        assert (tmp_path / f"results/plots/ppl_vs_bits.{suffix}").stat().st_size > 1000
    # a second run has nothing to do: every output is complete and up to date
    again = snakemake(tmp_path, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_tiny_dag_with_the_papers_methods(tmp_path, tiny_model_dir, tiny_corpus):
    """MagR, LQER and DWR through the real DAG: the DWR job starts from its base's artifact."""
    recipes = {
        "gptq@int2": {"steps": ["gptq"], "weight": "int2"},
        "gptq+dwr@int2": {"base": "gptq@int2", "dwr": {"ranks": [4, 16], "windows": 2}},
        "magr+gptq@int3-beta0.9": {"steps": [{"magr": {"iterations": 20}}, "gptq"], "weight": "int3-beta0.9"},
        "l2qer-k4@mxint4_a=mxint8": {"steps": ["rtn", {"l2qer": {"rank": 4}}], "weight": "mxint4", "act": "mxint8",
                                    "models": ["tiny"]},
    }
    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus, recipes))
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^quantize\s+3$", run.stdout + run.stderr, flags=re.MULTILINE)
    assert re.search(r"^dwr\s+1$", run.stdout + run.stderr, flags=re.MULTILINE)
    table = pandas.read_csv(tmp_path / "results/tables/all.csv")
    ppl = table[(table.kind == "perplexity") & (table.metric == "ppl")].set_index("recipe")["value"]
    assert set(ppl.index) == set(recipes)
    dwr = yaml.safe_load((tmp_path / "results/metrics/tiny/gptq+dwr@int2/quantize.json").read_text())
    assert len(dwr["dwr"]) == 2 and all(set(block["curve"]) == {"0", "4", "16"} for block in dwr["dwr"])
    assert dwr["metrics"]["calibration_ppl_after"] <= dwr["metrics"]["calibration_ppl_before"]


@pytest.mark.parametrize(
    "recipes, message",
    [
        ({"bad": {"steps": ["rtn", "warp"], "weight": "int4"}}, "recipe 'bad': unknown step 'warp'"),
        ({"bad": {"steps": ["rtn"], "weight": "int4-gx"}}, "cannot parse format 'int4-gx'"),
        ("claims", "claim 1 ('c'): recipe(s) gone not in the config's recipes"),
    ],
)
def test_bad_config_stops_before_any_job(tmp_path, tiny_model_dir, tiny_corpus, recipes, message):
    claims = [{"paper": "X", "claim": "c", "below": ["fp16", "gone"]}] if recipes == "claims" else []
    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus, None if recipes == "claims" else recipes, claims))
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0
    assert f"config error: {message}" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


def test_schema_rejects_an_unknown_key(tmp_path, tiny_model_dir, tiny_corpus):
    config = tiny_config(tiny_model_dir, tiny_corpus)
    config["calibration"]["nsampels"] = 3
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0 and "Additional properties are not allowed ('nsampels'" in run.stdout + run.stderr


@pytest.mark.parametrize("paper", sorted((REPO / "config" / "papers").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_list_their_whole_dag_without_a_hub(paper, tmp_path):
    """A dry run needs no network and no model: one quantize (or dwr) job per (model, recipe) the
    config asks for (a recipe's `models`, else every model), nothing inherited."""
    config = yaml.safe_load(paper.read_text())
    run = subprocess.run([*SNAKEMAKE, "-n", "--configfile", str(paper)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    jobs = {"quantize": 0, "dwr": 0} | {
        match.group(1): int(match.group(2))
        for match in re.finditer(r"^(quantize|dwr|eval_ppl)\s+(\d+)", run.stdout, flags=re.MULTILINE)
    }
    runs = [(model, name) for name, entry in config["recipes"].items() for model in entry.get("models", config["models"])]
    reconstructions = [run for run in runs if "base" in config["recipes"][run[1]]]
    assert jobs["dwr"] == len(reconstructions)
    assert jobs["quantize"] == len(runs) - len(reconstructions)
    assert jobs["eval_ppl"] == len(runs) * len(config["eval"]["ppl"]["datasets"])


def test_the_default_run_starts_its_longest_jobs_first():
    """Priorities from the recipes' relative costs: MagR+GPTQ before AWQ before GPTQ before RTN; the
    GPTQ job a DWR search waits on before the other GPTQ jobs; every quantization before any
    evaluation."""
    run = subprocess.run([*SNAKEMAKE, "-n"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    priority = {}
    for job in run.stdout.split("\nrule ")[1:]:
        rule = job.split(":", 1)[0]
        recipe = re.search(r"recipe=([^,\s]+)", job)
        level = re.search(r"priority: (\d+)", job)
        priority[(rule, recipe.group(1) if recipe else None)] = int(level.group(1)) if level else 0
    quantize = {recipe: level for (rule, recipe), level in priority.items() if rule in ("quantize", "dwr")}
    assert quantize["magr+gptq@int2-beta0.8"] > quantize["awq+rtn@int3"] > quantize["gptq@int2"] > quantize["rtn@int3"] > 0
    assert quantize["gptq@int3"] > quantize["gptq@int2"]
    assert max(level for (rule, _), level in priority.items() if rule == "eval_ppl") < min(quantize.values())
