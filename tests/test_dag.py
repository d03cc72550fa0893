"""The real Snakefile on a tiny random-initialised LLaMA and a tiny corpus, in a temp directory."""

import copy
import os
import re
import shutil
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
    config = tiny_config(tiny_model_dir, tiny_corpus)
    # int2 is 15 % above int4-g16 on this random model: 8 windows of 32 tokens cannot tell (the
    # paired interval spans -27 % to +8 %), 96 can
    config["eval"]["ppl"]["max_windows"] = 96
    write_config(tmp_path, config)
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    table = pandas.read_csv(tmp_path / "results/tables/all.csv")
    ppl = table[(table.kind == "perplexity") & (table.metric == "ppl")].set_index("recipe")["value"]
    assert set(ppl.index) == {"fp16", "rtn@int8", "rtn@int4-g16", "rtn@int2"}
    assert ppl["rtn@int8"] == pytest.approx(ppl["fp16"], rel=0.02)
    assert ppl["rtn@int2"] > ppl["rtn@int4-g16"] > ppl["fp16"] * 0.99
    assert (table[table.kind == "perplexity"].dataset == "tiny").all() and table.config_hash.notna().all()
    assert (table[table.kind == "quantize"].dataset == "none").all()  # fp16 and RTN read no calibration data
    assert "rtn@int4-g16" in (tmp_path / "results/tables/all.md").read_text()
    zeroshot = table[table.kind == "zeroshot"]
    assert set(zeroshot.recipe) == {"rtn@int4-g16"} and set(zeroshot.dataset) == {"ptq_lastword", "ptq_nextsentence"}
    assert "ptq_nextsentence acc_norm" in (tmp_path / "results/tables/all.md").read_text()
    papers = (tmp_path / "results/tables/papers/lqer.md").read_text()
    assert "ours alone" in papers and "| int4-g16 | rtn |" in papers
    claims = pandas.read_csv(tmp_path / "results/tables/claims.csv").set_index("claim")
    assert claims.loc["int2 worse than int4-g16", "verdict"] == "holds", claims.loc["int2 worse than int4-g16"].to_dict()
    assert claims.loc["recipes without a zero-shot result", "verdict"].tolist() == ["not run", "not run"]  # two tasks
    for figure in ("ppl_vs_bits", "accuracy_vs_bits", "job_costs"):
        for suffix in ("png", "pdf"):
            assert (tmp_path / f"results/plots/{figure}.{suffix}").stat().st_size > 1000
    assert not (tmp_path / "results/plots/lqer_ranks.png").exists()  # no LQER recipe in this config
    # a second run has nothing to do: every output is complete and up to date
    again = snakemake(tmp_path, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


PAPER_RECIPES = {
    "gptq@int2": {"steps": ["gptq"], "weight": "int2", "seeds": [0, 1]},
    "gptq+dwr@int2": {"base": "gptq@int2", "dwr": {"ranks": [4, 16], "windows": 2}, "seeds": [0, 1]},
    "magr+gptq@int3-beta0.9": {"steps": [{"magr": {"iterations": 20}}, "gptq"], "weight": "int3-beta0.9"},
    "rtn@mxint4_a=mxint8": {"steps": ["rtn"], "weight": "mxint4", "act": "mxint8"},
    "l2qer-k4@mxint4_a=mxint8": {"steps": ["rtn", {"l2qer": {"rank": 4}}], "weight": "mxint4", "act": "mxint8",
                                "models": ["tiny"]},
}


@pytest.fixture(scope="module")
def papers_run(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """The tiny DAG with MagR, LQER and DWR, run once: (its folder, the Snakemake run)."""
    workdir = tmp_path_factory.mktemp("papers-run")
    config = tiny_config(tiny_model_dir, tiny_corpus, PAPER_RECIPES, claims=[
        {"paper": "DWR", "claim": "DWR never worse than its base", "at_or_below": {"recipe": "gptq+dwr@int2", "than": ["gptq@int2"]}},
    ])
    config["storage"] = {"temporary_artifacts": True}  # as the paper configs
    write_config(workdir, config)
    return workdir, snakemake(workdir)


@pytest.mark.slow
def test_tiny_dag_with_the_papers_methods(papers_run):
    """MagR, LQER and DWR through the real DAG: the DWR job starts from its base's artifact of the
    same calibration seed; both run at two seeds, which reach the tables and the claims."""
    workdir, run = papers_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^quantize\s+5$", run.stdout + run.stderr, flags=re.MULTILINE)
    assert re.search(r"^dwr\s+2$", run.stdout + run.stderr, flags=re.MULTILINE)
    table = pandas.read_csv(workdir / "results/tables/all.csv")
    ppl = table[(table.kind == "perplexity") & (table.metric == "ppl")].set_index("recipe")
    assert set(ppl.index) == set(PAPER_RECIPES)
    assert ppl.loc["gptq@int2", "seeds"] == ppl.loc["gptq+dwr@int2", "seeds"] == "0 1"
    assert ppl.loc["rtn@mxint4_a=mxint8", "seeds"] == "—"  # reads no calibration data: no seed
    assert (ppl["ci_low"] < ppl["value"]).all() and (ppl["value"] < ppl["ci_high"]).all()
    replicates = pandas.read_csv(workdir / "results/tables/replicates.csv")
    assert sorted(replicates[(replicates.recipe == "gptq@int2") & (replicates.metric == "ppl")].seed) == [0, 1]
    for seed in (0, 1):
        dwr_seed = yaml.safe_load((workdir / f"results/metrics/tiny/gptq+dwr@int2/s{seed}/quantize.json").read_text())
        assert dwr_seed["calibration_seed"] == seed and dwr_seed["settings"]["seed"] == seed
    claims = pandas.read_csv(workdir / "results/tables/claims.csv")
    assert claims["verdict"].iloc[0] in ("holds", "fails", "inconclusive")
    assert claims["comparisons"].iloc[0].startswith("gptq+dwr@int2 vs gptq@int2: ")
    dwr = yaml.safe_load((workdir / "results/metrics/tiny/gptq+dwr@int2/s0/quantize.json").read_text())
    assert len(dwr["dwr"]) == 2 and all(set(block["curve"]) == {"0", "4", "16"} for block in dwr["dwr"])
    assert dwr["metrics"]["calibration_ppl_after"] <= dwr["metrics"]["calibration_ppl_before"]
    for figure in ("ppl_vs_bits", "lqer_ranks", "job_costs", "magr/tiny/magr+gptq@int3-beta0.9", "dwr/tiny/gptq+dwr@int2"):
        assert (workdir / f"results/plots/{figure}.png").stat().st_size > 1000, figure
    assert not (workdir / "results/plots/accuracy_vs_bits.png").exists()  # no zero-shot in this config


def job_ids(log: str, rule: str, recipe: str, seed: int) -> list[str]:
    """The ids Snakemake's log gives the jobs of a rule on a recipe and calibration seed."""
    blocks = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", log, flags=re.MULTILINE)
    pattern = rf"wildcards: .*recipe={re.escape(recipe)}, seed={seed}(,|$)"
    return [re.search(r"jobid: (\d+)", body).group(1) for name, body in blocks
            if name == rule and re.search(pattern, body, flags=re.MULTILINE)]


@pytest.mark.slow
def test_temporary_artifacts_are_deleted_after_their_last_reader(papers_run):
    """storage.temporary_artifacts (on in this run): every quantized model is deleted, and each only
    after every job reading it finished: its evaluation and, for gptq@int2, the DWR search that
    starts from it. The table has every result; a second run has nothing to do."""
    workdir, run = papers_run
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    for recipe, entry in PAPER_RECIPES.items():
        for seed in entry.get("seeds", [0]):
            assert not (workdir / f"results/quantized/tiny/{recipe}/s{seed}").exists(), recipe
            removed = log.index(f"Removing temporary output results/quantized/tiny/{recipe}/s{seed}.")
            readers = job_ids(log, "eval_ppl", recipe, seed)
            readers += job_ids(log, "dwr", "gptq+dwr@int2", seed) * (recipe == "gptq@int2")
            assert len(readers) == 1 + (recipe == "gptq@int2"), (recipe, seed, readers)
            for job in readers:
                assert log.index(f"Finished jobid: {job} ") < removed, (recipe, seed, job)
    table = pandas.read_csv(workdir / "results/tables/all.csv")
    assert set(table[table.kind == "perplexity"].recipe) == set(PAPER_RECIPES)
    again = snakemake(workdir, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


RERUN_RECIPES = {"fp16": {"steps": []}, "rtn@int4": {"steps": ["rtn"], "weight": "int4"},
                 "gptq@int4": {"steps": ["gptq"], "weight": "int4"}}
"""Two recipes that read no calibration data and one that does."""


def rerun_config(model_dir, corpus_dir) -> dict:
    """The tiny DAG with three recipes, four test windows and a calibration dtype set."""
    config = tiny_config(model_dir, corpus_dir, copy.deepcopy(RERUN_RECIPES))
    config["calibration"]["dtype"] = "float32"
    config["eval"]["ppl"]["max_windows"] = 4
    return config


@pytest.fixture(scope="module")
def rerun_workdir(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """A finished run of ``rerun_config``."""
    workdir = tmp_path_factory.mktemp("rerun")
    write_config(workdir, rerun_config(tiny_model_dir, tiny_corpus))
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def dry_run_jobs(workdir: Path) -> dict:
    """The jobs a dry run would run, by rule (its job stats; empty: nothing to be done)."""
    run = snakemake(workdir, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    stats = re.search(r"^Job stats:\n.*?\n-+ +-+\n(.*?)^total", run.stdout, flags=re.MULTILINE | re.DOTALL)
    if stats is None:
        assert "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]
        return {}
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", stats.group(1), flags=re.MULTILINE)}


# What a new all.csv reruns: the tables, the claims, the two figures of the tiny run and `all`.
AFTER_THE_TABLES = {"tables": 1, "claims": 1, "plot_table_figure": 2, "all": 1}


@pytest.mark.slow
@pytest.mark.parametrize("key, value, rerun", [
    (("eval", "ppl", "dtype"), "bfloat16", {"float_reference": 1, "eval_ppl": 3}),
    (("eval", "ppl", "seqlen"), 16, {"float_reference": 1, "eval_ppl": 3}),
    (("eval", "ppl", "max_windows"), 3, {"float_reference": 1, "eval_ppl": 3}),
    (("eval", "ppl", "batch_size"), 2, {"float_reference": 1, "eval_ppl": 3}),
    # the calibration's settings: only the recipe that reads calibration data (gptq), not fp16 or RTN
    (("calibration", "dtype"), "bfloat16", {"quantize": 1, "eval_ppl": 1}),
    (("calibration", "batch_size"), 1, {"quantize": 1, "eval_ppl": 1}),
    (("calibration", "nsamples"), 3, {"calibrate": 1, "quantize": 1, "eval_ppl": 1}),
    (("recipes", "rtn@int4", "weight"), "int4-g16", {"quantize": 1, "eval_ppl": 1}),
], ids=lambda value: ".".join(value) if isinstance(value, tuple) else None)
def test_a_changed_setting_reruns_the_jobs_it_affects(rerun_workdir, tiny_model_dir, tiny_corpus, key, value, rerun):
    """A setting that changes a result reaches its jobs through `params:`: after a finished run,
    changing it makes Snakemake rerun exactly the jobs whose results it changes, and those after them."""
    config = rerun_config(tiny_model_dir, tiny_corpus)
    *parents, name = key
    entry = config
    for parent in parents:
        entry = entry[parent]
    assert entry.get(name) != value
    entry[name] = value
    write_config(rerun_workdir, config)
    assert dry_run_jobs(rerun_workdir) == {**rerun, **AFTER_THE_TABLES}


@pytest.mark.slow
def test_where_jobs_keep_their_data_and_their_threads_rerun_nothing(rerun_workdir, tiny_model_dir, tiny_corpus):
    """Settings that do not change a result stay out of `params:`: changing them reruns nothing."""
    config = rerun_config(tiny_model_dir, tiny_corpus)
    config["threads"] = 2
    config["calibration"]["offload"] = "cpu"
    config["eval"]["placement"] = "whole"
    config["resources"] = {"eval_ppl": {"mem_mb": 2000}, "other": {"runtime": 30}}
    write_config(rerun_workdir, config)
    assert dry_run_jobs(rerun_workdir) == {}
    write_config(rerun_workdir, rerun_config(tiny_model_dir, tiny_corpus))
    assert dry_run_jobs(rerun_workdir) == {}


@pytest.mark.slow
def test_another_spelling_of_the_same_device_reruns_nothing(rerun_workdir, tiny_model_dir, tiny_corpus):
    """The jobs' `device` param is the class of device config `device` resolves to here: on a
    machine without a GPU, `cpu` and `auto` are the same device, and changing one to the other
    reruns nothing; `device` still reaches the commands as given."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("auto is a GPU on this machine")
    config = rerun_config(tiny_model_dir, tiny_corpus)
    config["device"] = "auto"
    write_config(rerun_workdir, config)
    try:
        assert dry_run_jobs(rerun_workdir) == {}
        run = snakemake(rerun_workdir, "-n", "-p", "--forcerun", "quantize")
        assert run.returncode == 0 and run.stdout.count(" --device auto ") >= 3, run.stdout[-3000:]
    finally:
        write_config(rerun_workdir, rerun_config(tiny_model_dir, tiny_corpus))


def test_where_jobs_keep_their_data_reaches_their_commands(tmp_path, tiny_model_dir, tiny_corpus):
    """calibration.offload and eval.placement, passed as the resources `offload` and `placement`
    (no rerun trigger), are what the quantize and evaluation commands get."""
    config = tiny_config(tiny_model_dir, tiny_corpus)
    config["calibration"]["offload"] = "cpu"
    config["eval"]["placement"] = "whole"
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n", "-p")
    assert run.returncode == 0, run.stderr[-3000:]
    commands = {rule: [line for line in run.stdout.splitlines() if f"ptqrepro {rule} " in line]
                for rule in ("quantize", "eval-ppl", "eval-zeroshot")}
    assert all(commands.values()), commands
    assert all("--offload cpu " in line for line in commands["quantize"])
    assert all("--placement whole " in line for line in commands["eval-ppl"] + commands["eval-zeroshot"])


CHROMIUM_REQUIRED = os.environ.get("PTQ_REQUIRE_CHROMIUM") == "1"
"""Set by .ci/run, which installs Chromium: there a missing browser fails the report test."""
def headless_chromium():
    """A Selenium driver on headless Chromium (Debian's chromium and chromium-driver), or a skip
    naming what is missing (a failure where PTQ_REQUIRE_CHROMIUM=1)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if not (browser and driver and webdriver):
        message = "the HTML report test needs chromium, chromedriver (apt install chromium chromium-driver) and selenium"
        if CHROMIUM_REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.parametrize(
    "recipes, message",
    [
        ({"bad": {"steps": ["rtn", "warp"], "weight": "int4"}}, "recipe 'bad': unknown step 'warp'"),
        ({"bad": {"steps": ["rtn"], "weight": "int4-gx"}}, "cannot parse format 'int4-gx'"),
        ("claims", "claim 1 ('c'): recipe(s) gone not in the config's recipes"),
        ({"gptq@int2": {"steps": ["gptq"], "weight": "int2", "seeds": [0, 1]},
          "dwr": {"base": "gptq@int2", "seeds": [2]}},
         "recipe 'dwr': seeds [2] are not seeds of its base 'gptq@int2' ([0, 1])"),
    ],
)
def test_bad_config_stops_before_any_job(tmp_path, tiny_model_dir, tiny_corpus, recipes, message):
    claims = [{"paper": "X", "claim": "c", "below": ["fp16", "gone"]}] if recipes == "claims" else []
    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus, None if recipes == "claims" else recipes, claims))
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0
    assert f"config error: 1 error(s) in the config:\n  {message}" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


def test_every_error_of_a_config_stops_the_dry_run_at_once(tmp_path, tiny_model_dir, tiny_corpus):
    """Independent errors of one config (an unknown step, an unparsable format, a recipe on a model
    the config lacks, a claim and the zero-shot recipes naming recipes it lacks): one refusal of
    `snakemake -n` lists each in a line of its own, before any job; results/ is left as it was."""
    config = tiny_config(tiny_model_dir, tiny_corpus)
    config["recipes"] |= {"bad": {"steps": ["rtn", "warp"], "weight": "int4"},
                          "fmt": {"steps": ["rtn"], "weight": "int4-gx"},
                          "elsewhere": {"steps": ["rtn"], "weight": "int4", "models": ["huge"]}}
    config["claims"].append({"paper": "X", "claim": "c", "below": ["fp16", "gone"]})
    config["eval"]["zeroshot"]["recipes"] = ["rtn@int4-g16", "missing"]
    write_config(tmp_path, config)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "kept.json").write_text("{}")
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0
    lines = run.stderr.splitlines()
    heading = lines.index("config error: 5 error(s) in the config:")
    listed = lines[heading + 1:heading + 6]
    for expected in ["recipe 'bad': unknown step 'warp'", "cannot parse format 'int4-gx'",
                     "recipe 'elsewhere': models huge are not in the config's models",
                     "claim 3 ('c'): recipe(s) gone not in the config's recipes",
                     "eval.zeroshot.recipes: missing not in the config's recipes"]:
        assert sum(line.startswith("  ") and expected in line for line in listed) == 1, (expected, listed)
    assert [path.name for path in (tmp_path / "results").rglob("*")] == ["kept.json"]


def test_a_key_given_twice_in_a_config_file_stops_before_any_job(tmp_path, tiny_model_dir, tiny_corpus):
    """A recipe defined twice (the default config file) and a key repeated inside a recipe (a
    --configfile) stop the dry run with the key and both lines, where a YAML loader would keep the
    last silently."""
    config = tiny_config(tiny_model_dir, tiny_corpus)
    head = yaml.safe_dump({key: value for key, value in config.items() if key != "recipes"}) + "recipes:\n"
    line = head.count("\n") + 1  # the first recipe's line
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(
        head + "  rtn@int4: {steps: [rtn], weight: int4}\n  fp16: {steps: []}\n  rtn@int4: {steps: [rtn], weight: int8}\n")
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0
    assert f"config error: config/config.yaml: duplicate key 'rtn@int4' (line {line} and line {line + 2})" in run.stdout + run.stderr
    nested = tmp_path / "nested.yaml"
    nested.write_text(head + "  rtn@int4:\n    steps: [rtn]\n    weight: int4\n    weight: int8\n")
    run = snakemake(tmp_path, "-n", "--configfile", str(nested))
    assert run.returncode != 0
    assert f"config error: {nested}: duplicate key 'weight' (line {line + 2} and line {line + 3})" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


def test_one_seed_or_a_list_of_seeds_not_both(tmp_path, tiny_model_dir, tiny_corpus):
    config = tiny_config(tiny_model_dir, tiny_corpus)
    config["calibration"]["seeds"] = [0, 1]
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0 and "  calibration: give 'seeds' (a list) or 'seed' (one), not both\n" in run.stdout + run.stderr
    del config["calibration"]["seed"]
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n")
    assert run.returncode == 0, run.stderr[-2000:]
    # RTN and fp16 read no calibration data: one job each, not one per seed, and no calibration windows
    assert re.search(r"^quantize\s+4$", run.stdout, flags=re.MULTILINE) and not re.search(r"^calibrate\s", run.stdout, flags=re.MULTILINE)


def test_schema_rejects_an_unknown_key(tmp_path, tiny_model_dir, tiny_corpus):
    config = tiny_config(tiny_model_dir, tiny_corpus)
    config["calibration"]["nsampels"] = 3
    write_config(tmp_path, config)
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0 and "Additional properties are not allowed ('nsampels'" in run.stdout + run.stderr


# Settings that cannot work on the tiny model or this machine (each category of ptqrepro.checks.preflight),
# in one config: the dry run names every one of them.
CANNOT_WORK = {
    "recipes": {
        "rtn@int4-g48": {"steps": ["rtn"], "weight": "int4-g48"},
        "rtn@mxint4-b7": {"steps": ["rtn"], "weight": "mxint4-b7"},
        "lqer-k40": {"steps": ["rtn", {"lqer": {"rank": 40}}], "weight": "mxint4"},
        "gptq@int3": {"steps": ["gptq"], "weight": "int3"},
        "dwr": {"base": "gptq@int3", "dwr": {"ranks": [16, 65]}},
    },
    "messages": [
        "config error: 7 setting(s) cannot work, found before any job ran:",
        "  device: 'cuda': torch sees 0 CUDA device(s) on this machine; allowed: auto",
        "  recipes.rtn@int4-g48.weight: 'int4-g48': format int4-g48: group size 48 does not divide the 64 inputs of layer "
        "self_attn.q_proj of model tiny; allowed: a size dividing 64",
        "  recipes.rtn@mxint4-b7.weight: 'mxint4-b7': format mxint4-b7: group size 7 does not divide the 64 inputs",
        "  recipes.lqer-k40.steps[1].lqer.rank: 40: above min(in, out) of self_attn.k_proj, self_attn.v_proj of model tiny; allowed: ranks 1..32",
        "  recipes.dwr.dwr.ranks: 65: above 64, the largest min(in, out) of model tiny's linears; allowed: ranks 1..64",
        "  calibration.seqlen: 600: beyond the context of model tiny (512); allowed: at most 512",
        "  eval.zeroshot.tasks: 'arc_eazy': not a local task and not in lm-eval's registry",
    ],
}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal of device: cuda without a GPU")
def test_settings_that_cannot_work_stop_the_dry_run_all_at_once(tmp_path, tiny_model_dir, tiny_corpus):
    """Group and MX block sizes against the linears' inputs, ranks against their dimensions, the
    sequence length against the context, task names, the device: every problem in one refusal of
    `snakemake -n`, before any job; nothing under results/ is written or deleted."""
    config = tiny_config(tiny_model_dir, tiny_corpus, CANNOT_WORK["recipes"])
    config["device"] = "cuda"
    config["calibration"]["seqlen"] = 600
    config["eval"]["zeroshot"] = {"tasks": ["ptq_lastword", "arc_eazy"], "corpus": "tiny", "max_length": 512}
    write_config(tmp_path, config)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "kept.json").write_text("{}")
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0
    lines = (run.stdout + run.stderr).splitlines()
    heading, *messages = CANNOT_WORK["messages"]
    listed = lines[lines.index(heading) + 1:][:len(messages)]
    for expected in messages:
        assert any(line.startswith(expected) for line in listed), (expected, listed)
    assert [path.name for path in (tmp_path / "results").rglob("*")] == ["kept.json"]


def test_method_settings_out_of_range_stop_the_dry_run_all_at_once(tmp_path, tiny_model_dir, tiny_corpus):
    """What the schema can say of a method's settings (types, minimums), said of each at once."""
    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus, {
        "gptq": {"steps": [{"gptq": {"blocksize": 0, "percdamp": "high"}}], "weight": "int4"},
        "magr": {"steps": [{"magr": {"iterations": -5}}, "gptq"], "weight": "int3"},
        "lqer": {"steps": ["rtn", {"lqer": {"rank": -1}}], "weight": "mxint4"},
    }))
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0
    assert "config error: 4 setting(s) break the schema" in run.stderr
    for line in ["recipes.gptq.steps[0].gptq.blocksize: 0 is less than the minimum of 1",
                 "recipes.gptq.steps[0].gptq.percdamp: 'high' is not of type 'number'",
                 "recipes.lqer.steps[1].lqer.rank: -1 is less than the minimum of 1",
                 "recipes.magr.steps[0].magr.iterations: -5 is less than the minimum of 0"]:
        assert f"  {line}\n" in run.stderr
    assert not (tmp_path / "results").exists()


def test_a_good_config_plans_the_same_dag(tmp_path, tiny_model_dir, tiny_corpus):
    """The start-up checks pass the tiny config, whose dry run lists the jobs it always did, and the
    float model's reference for the KL divergence."""
    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus))
    assert dry_run_jobs(tmp_path) == {
        "prepare_corpus": 1, "prepare_model": 1, "zeroshot_tasks": 1, "quantize": 4, "float_reference": 1,  # no calibrating recipe
        "eval_ppl": 4,
        "eval_zeroshot": 1, "tables": 1, "claims": 1, "paper_tables": 1, "plot_table_figure": 3, "all": 1}
    assert not (tmp_path / "results").exists()


SHIPPED_CONFIGS = [REPO / "config" / "config.yaml", REPO / "config" / "smollm2-grid.yaml",
                   *sorted((REPO / "config" / "papers").glob("*.yaml"))]
"""The default, the whole SmolLM2 grid and the papers' configs."""


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_list_their_whole_dag_without_a_hub(path, tmp_path):
    """A dry run needs no network and no model: one quantize (or dwr) job per (model, recipe,
    calibration seed) the config asks for (a recipe's `models`, else every model; its seeds; peer
    recipes only for `snakemake peers`), nothing inherited."""
    from ptqrepro.checks.config import recipe_seeds
    from ptqrepro.data.corpora import corpus_spec
    from ptqrepro.peers.recipes import is_peer

    config = yaml.safe_load(path.read_text())
    run = subprocess.run([*SNAKEMAKE, "-n", "--forceall", "--configfile", str(path)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    jobs = {"quantize": 0, "dwr": 0} | {
        match.group(1): int(match.group(2))
        for match in re.finditer(r"^(quantize|dwr|eval_ppl)\s+(\d+)", run.stdout, flags=re.MULTILINE)
    }
    runs = [(model, name, seed) for name, entry in config["recipes"].items() if not is_peer(entry)
            for model in entry.get("models", config["models"]) for seed in recipe_seeds(config, name)]
    reconstructions = [run for run in runs if "base" in config["recipes"][run[1]]]
    corpus = config["calibration"]["corpus"]
    drawn = corpus_spec(corpus, config.get("corpora", {}).get(corpus)).sampling != "chunks"  # LQER's chunks: no draw
    assert any(len(recipe_seeds(config, name)) == 3 for name in config["recipes"]) == drawn  # every shipped config replicates draws
    assert jobs["dwr"] == len(reconstructions)
    assert jobs["quantize"] == len(runs) - len(reconstructions)
    assert jobs["eval_ppl"] == len(runs) * len(config["eval"]["ppl"]["datasets"])


def dry_run_priorities(*arguments: str) -> dict[tuple[str, str | None], int]:
    """Each (rule, recipe) of the repository's dry run with ``arguments`` and its scheduling priority."""
    run = subprocess.run([*SNAKEMAKE, "-n", "--forceall", *arguments], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    priority = {}
    for job in re.split(r"\n *rule ", run.stdout)[1:]:  # a group job indents its jobs
        rule = job.split(":", 1)[0]
        recipe = re.search(r"recipe=([^,\s]+)", job)
        level = re.search(r"priority: (\d+)", job)
        priority[(rule, recipe.group(1) if recipe else None)] = int(level.group(1)) if level else 0
    return priority


def quantize_priorities(priority: dict) -> dict[str, int]:
    """The quantize and DWR jobs' priorities by recipe, after checking that every one of them is
    above every evaluation's."""
    quantize = {recipe: level for (rule, recipe), level in priority.items() if rule in ("quantize", "dwr")}
    assert max(level for (rule, _), level in priority.items() if rule == "eval_ppl") < min(quantize.values())
    return quantize


def test_the_whole_grid_starts_its_longest_jobs_first():
    """Priorities from the recipes' relative costs: AWQ (its block loss) before MagR+GPTQ before GPTQ
    before RTN; the GPTQ job a DWR search waits on before the other GPTQ jobs; every quantization
    before any evaluation. The whole DAG of config/smollm2-grid.yaml, which has every method (--forceall:
    also after a run has made results/)."""
    quantize = quantize_priorities(dry_run_priorities("--configfile", str(REPO / "config" / "smollm2-grid.yaml")))
    assert quantize["awq+rtn@int3"] > quantize["magr+gptq@int2-beta0.8"] > quantize["gptq@int2"] > quantize["rtn@int3"] > 0
    assert quantize["gptq@int3"] > quantize["gptq@int2"]


def test_the_default_run_starts_its_longest_jobs_first():
    """The default's DAG: the GPTQ INT3 jobs that DWR searches wait on first, then MagR+GPTQ, then
    the other GPTQ jobs, RTN last; every quantization before any evaluation."""
    quantize = quantize_priorities(dry_run_priorities())
    assert (quantize["gptq@int3"] > quantize["magr+gptq@int3-beta0.9"] > quantize["gptq@int4-g64"]
            > quantize["rtn@int3"] > 0)


def test_the_smoke_config_plans_a_small_dag_with_tables_and_a_figure():
    """config/smoke.yaml, the README's first run, plans the real SmolLM2's chain in 17 jobs: its four
    recipes quantized and evaluated once each, the float reference, the tables, its claims and the two figures, no
    zero-shot and no paper tables (--forceall: also after a run has made results/)."""
    run = subprocess.run([*SNAKEMAKE, "-n", "--forceall", "--configfile", str(REPO / "config" / "smoke.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    stats = re.search(r"^Job stats:\n.*?\n-+ +-+\n(.*?)^total", run.stdout, flags=re.MULTILINE | re.DOTALL)
    jobs = {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", stats.group(1), flags=re.MULTILINE)}
    assert jobs == {"prepare_model": 1, "prepare_corpus": 1, "calibrate": 1, "quantize": 4, "eval_ppl": 4, "float_reference": 1,
                    "tables": 1, "claims": 1, "plot_table_figure": 2, "all": 1}
    assert "results/plots/ppl_vs_bits.png" in run.stdout and "results/tables/claims.md" in run.stdout


@pytest.mark.slow
def test_html_report_renders_every_figure_in_chromium(papers_run):
    """`snakemake --report` of the finished tiny run: one self-contained HTML file that headless
    Chromium opens without errors; under Figures, every figure of the run, which the report's own
    viewer shows as a decoded image, with its caption."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    workdir, run = papers_run
    assert run.returncode == 0, run.stderr[-3000:]
    built = snakemake(workdir, "--report", "results/report.html")
    assert built.returncode == 0, built.stderr[-3000:]
    figures = sorted(str(path.relative_to(workdir)) for path in (workdir / "results/plots").rglob("*.png"))
    assert len(figures) == 5
    browser = headless_chromium()
    shown, captions = {}, {}
    try:
        browser.set_window_size(1400, 1000)
        browser.get((workdir / "results/report.html").as_uri())
        wait = WebDriverWait(browser, 60)

        def open_figures():
            wait.until(lambda b: [e for e in b.find_elements(By.XPATH, "//*[text()='Figures']") if e.is_displayed()])[0].click()
            return wait.until(lambda b: b.find_elements(By.XPATH, "//td[starts-with(text(), 'results/plots/')]"))

        listed = sorted(cell.text for cell in open_figures())
        for path in listed:
            open_figures()
            browser.find_element(By.XPATH, f"//td[text()='{path}']/following-sibling::td//a[@iconname='eye']").click()
            image = wait.until(lambda b: b.find_element(By.XPATH, f"//img[contains(@src, 'filename={Path(path).name};')]"))
            wait.until(lambda b: b.execute_script("return arguments[0].complete", image))
            shown[path] = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
            open_figures()
            browser.find_element(By.XPATH, f"//td[text()='{path}']/following-sibling::td//a[@iconname='information-circle']").click()
            text = wait.until(lambda b: "DESCRIPTION" in b.find_element(By.TAG_NAME, "body").text
                              and b.find_element(By.TAG_NAME, "body").text)
            captions[path] = text.split("DESCRIPTION", 1)[1].split("SIZE", 1)[0].strip()
        errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        browser.quit()
    assert not errors, errors
    assert listed == figures
    assert all(width >= 400 and height >= 200 for width, height in shown.values()), shown
    assert captions["results/plots/lqer_ranks.png"].startswith("LQER and L2QER perplexity")  # the figure's own caption
    assert all(len(caption) > 60 for caption in captions.values()), captions


@pytest.mark.slow
def test_an_out_of_tree_method_runs_beside_a_built_in_one(tmp_path, tiny_model_dir, tiny_corpus):
    """tests/plugins/ptq_cliprtn.py, named by the config's ``plugins`` and found through PYTHONPATH
    by the Snakemake process and by its quantize job (docs/extending.md#bring-your-own-method)."""
    config = tiny_config(tiny_model_dir, tiny_corpus, {
        "rtn@int3-g16": {"steps": ["rtn"], "weight": "int3-g16"},
        "cliprtn@int3-g16": {"steps": [{"cliprtn": {"ratios": [1.0, 0.9, 0.8]}}], "weight": "int3-g16"},
    }, claims=[{"paper": "plugin", "claim": "clipping search at or below RTN",
                "at_or_below": {"recipe": "cliprtn@int3-g16", "than": ["rtn@int3-g16"]}}])
    config["plugins"] = ["ptq_cliprtn"]
    write_config(tmp_path, config)
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "plugins"), os.environ.get("PYTHONPATH")]))
    run = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
    assert run.returncode == 0, run.stderr[-3000:]
    table = pandas.read_csv(tmp_path / "results/tables/all.csv")
    ppl = table[(table.kind == "perplexity") & (table.metric == "ppl")].set_index("recipe")["value"]
    assert set(ppl.index) == {"rtn@int3-g16", "cliprtn@int3-g16"} and ppl.notna().all()
    quantize = yaml.safe_load((tmp_path / "results/metrics/tiny/cliprtn@int3-g16/s0/quantize.json").read_text())
    assert quantize["metrics"]["mean_weight_rel_error"] < yaml.safe_load(
        (tmp_path / "results/metrics/tiny/rtn@int3-g16/s0/quantize.json").read_text())["metrics"]["mean_weight_rel_error"]
    claims = pandas.read_csv(tmp_path / "results/tables/claims.csv").set_index("claim")
    judged = claims.loc["clipping search at or below RTN"]
    assert judged["verdict"] in ("holds", "fails", "inconclusive"), judged.to_dict()
    assert judged["comparisons"].startswith("cliprtn@int3-g16 vs rtn@int3-g16: ")
