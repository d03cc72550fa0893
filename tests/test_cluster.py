"""Per-rule resources, partition and account from the config (ptqrepro.runtime.cluster), the schema of
those keys, and what the SLURM profile makes of a paper config and of the default (dry runs)."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ptqrepro.runtime.cluster import job_request, resource_errors, rule_resources, rule_threads, slurm_target
from ptqrepro.checks.config import recipe_seeds

from test_dag import REPO

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


def config(**overrides) -> dict:
    """A config as the Snakefile sees it after validation: two models, one recipe, resources for
    quantize and eval_ppl, an override for the larger model."""
    return {
        "device": "auto", "threads": 8,
        "models": {"small": {"hub": "s"}, "large": {"hub": "l"}},
        "eval": {"ppl": {"datasets": ["wikitext2"]}},
        "resources": {
            "quantize": {"gpus": 1, "gpu_model": "a100", "mem_mb": 96000, "runtime": 360},
            "eval_ppl": {"gpu_model": "a100", "cpus": 4},
            "other": {"mem_mb": 8000},
            "by_model": {"large": {"quantize": {"mem_mb": 360000, "runtime": 1440}}},
        },
        "slurm": {"partition": "gpu", "account": None},
        **overrides,
    }


def test_a_rule_asks_for_its_entry_with_its_models_override():
    assert job_request(config(), "quantize", "small") == {
        "gpus": 1, "gpu_model": "a100", "cpus": 8, "mem_mb": 96000, "runtime": 360}
    assert job_request(config(), "quantize", "large") == {
        "gpus": 1, "gpu_model": "a100", "cpus": 8, "mem_mb": 360000, "runtime": 1440}
    assert job_request(config(), "eval_ppl", "large") == {
        "gpus": 1, "gpu_model": "a100", "cpus": 4, "mem_mb": None, "runtime": None}


def test_no_gpu_on_the_cpu_nor_for_the_other_rules():
    on_cpu = job_request(config(device="cpu"), "quantize", "small")
    assert on_cpu["gpus"] == 0 and on_cpu["gpu_model"] is None and on_cpu["mem_mb"] == 96000
    assert job_request(config(), "tables") == {"gpus": 0, "gpu_model": None, "cpus": 1, "mem_mb": 8000, "runtime": None}
    # no `resources` at all: one GPU per GPU job (as before the key existed), `threads` CPUs
    assert job_request(config(resources={}), "dwr", "small") == {
        "gpus": 1, "gpu_model": None, "cpus": 8, "mem_mb": None, "runtime": None}


def test_the_environment_wins_over_the_config_for_partition_and_account():
    assert slurm_target(config(), {}) == {"slurm_partition": "gpu"}
    assert slurm_target(config(), {"SBATCH_PARTITION": "a100", "SBATCH_ACCOUNT": "lab"}) == {
        "slurm_partition": "a100", "slurm_account": "lab"}
    assert slurm_target(config(), {"SBATCH_PARTITION": ""}) == {"slurm_partition": "gpu"}
    assert slurm_target(config(slurm={}), {}) == {}


def test_rule_resources_are_functions_of_the_jobs_model():
    resources = rule_resources(config(), "quantize", {})
    assert set(resources) == {"gpu", "gpu_model", "mem_mb", "runtime", "slurm_partition"}
    large = SimpleNamespace(model="large")
    assert resources["mem_mb"](large) == 360000 and resources["gpu"](large) == 1
    assert rule_threads(config(), "eval_ppl")(large) == 4
    # unset sizes are left to the executor; the other rules never name a GPU
    assert set(rule_resources(config(), "eval_ppl", {})) == {"gpu", "gpu_model", "slurm_partition"}
    other = rule_resources(config(), "tables", {"SBATCH_ACCOUNT": "lab"})
    assert set(other) == {"mem_mb", "slurm_partition", "slurm_account"}
    assert other["mem_mb"](SimpleNamespace()) == 8000


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["resources"]["by_model"].update(huge={"quantize": {"mem_mb": 1}}),
         "resources.by_model: huge not in the config's models"),
        (lambda c: c["resources"]["by_model"]["large"].update(eval_ppl={"runtime": 60}),
         "resources.by_model.large.eval_ppl.runtime: set resources.eval_ppl.runtime too"),
        (lambda c: (c["eval"].update(zeroshot={"tasks": ["piqa"]}),
                    c["resources"].update(eval_zeroshot={"gpu_model": "h100"})),
         "eval_ppl and eval_zeroshot of model 'small' ask for GPU models 'a100' and 'h100'"),
    ],
)
def test_a_bad_resources_entry_is_one_clear_error(change, message):
    bad = config()
    change(bad)
    errors = resource_errors(bad)
    assert any(message in error for error in errors), errors


def test_every_bad_resources_entry_is_an_error_of_its_own():
    bad = config()
    bad["resources"]["by_model"].update(huge={"quantize": {"mem_mb": 1}})
    bad["resources"]["by_model"]["large"].update(eval_ppl={"runtime": 60, "mem_mb": 4000})
    assert resource_errors(bad) == [
        "resources.by_model: huge not in the config's models",
        "resources.by_model.large.eval_ppl.mem_mb: set resources.eval_ppl.mem_mb too, the value for the other models",
        "resources.by_model.large.eval_ppl.runtime: set resources.eval_ppl.runtime too, the value for the other models",
    ]


def test_grouped_evaluations_with_one_gpu_model_pass():
    good = config()
    good["eval"]["zeroshot"] = {"tasks": ["piqa"]}
    good["resources"]["eval_zeroshot"] = {"gpu_model": "a100", "runtime": 30}
    assert resource_errors(good) == []


@pytest.mark.parametrize(
    "resources, message",
    [
        ({"quantize": {"gpus": 2}}, "2 is greater than the maximum of 1"),
        ({"quantize": {"gpu_model": "'a100'"}}, "does not match"),
        ({"other": {"gpus": 1}}, "Additional properties are not allowed ('gpus'"),
        ({"eval_ppl": {"mem": 4000}}, "Additional properties are not allowed ('mem'"),
        ({"tables": {"mem_mb": 4000}}, "Additional properties are not allowed ('tables'"),
    ],
)
def test_the_schema_rejects_a_bad_resources_entry(resources, message):
    entry = {"models": {"m": {"hub": "x"}}, "calibration": {"corpus": "c"}, "recipes": {"r": {"steps": []}},
             "eval": {"ppl": {"datasets": ["c"]}}, "resources": resources}
    with pytest.raises(WorkflowError, match=re.escape(message)):
        validate(entry, SCHEMA)


def test_the_schema_fills_storage_and_slurm_defaults():
    entry = {"models": {"m": {"hub": "x"}}, "calibration": {"corpus": "c"}, "recipes": {"r": {"steps": []}},
             "eval": {"ppl": {"datasets": ["c"]}}}
    validate(entry, SCHEMA)
    assert entry["storage"] == {"temporary_artifacts": False}
    assert entry["slurm"] == {"partition": None, "account": None} and entry["resources"] == {}


def slurm_dry_run(*extra) -> str:
    """`snakemake -n --profile profiles/slurm` (the plugin needs no SLURM for a dry run)."""
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SBATCH_")}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm", "--cores", "64", *extra],
                         capture_output=True, text=True, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run.stdout + run.stderr


def test_a_paper_config_on_slurm_groups_evaluations_and_deletes_artifacts():
    """config/papers/dwr.yaml: the two perplexity evaluations of each quantized model in one group
    job; every quantized model temporary, GPTQ's as DWR's base too; A100s, 70B's own memory."""
    paper = REPO / "config" / "papers" / "dwr.yaml"
    shown = slurm_dry_run("--configfile", str(paper))
    config = yaml.safe_load(paper.read_text())
    runs = [(model, name, seed) for name, entry in config["recipes"].items() for model in entry.get("models", config["models"])
            for seed in recipe_seeds(config, name)]
    groups = re.findall(r"Group job eval_(\S+) \(jobs in lexicogr\. order\):(.*?)(?=\n\[|\nJob stats|\Z)", shown, re.DOTALL)
    assert sorted(name for name, _ in groups) == sorted(f"{model}_{recipe}_s{seed}" for model, recipe, seed in runs)
    assert all(body.count("rule eval_ppl:") == 2 for _, body in groups)
    removed = set(re.findall(r"Would remove temporary output results/quantized/(\S+)", shown))
    assert removed == {f"{model}/{recipe}/s{seed}" for model, recipe, seed in runs}
    resources = re.findall(r"rule (quantize|dwr|eval_ppl):\n(?:.*\n)*?\s+wildcards: model=([^,]+),.*\n(?:.*\n)*?\s+resources: (.*)", shown)
    assert resources and all("gpu=1, gpu_model=a100" in line for _, _, line in resources)
    assert all(("mem_mb=360000" in line) == (model == "llama-2-70b") for rule, model, line in resources
               if rule in ("quantize", "dwr"))
    assert "--threads 8" in shown  # cpus: the config's threads


def test_the_default_config_keeps_its_artifacts():
    """The whole default DAG (--forceall: also after the README's run has made results/)."""
    shown = slurm_dry_run("--forceall")
    assert "Group job eval_smollm2-135m_gptq@int3" in shown
    assert "Would remove temporary output" not in shown


GPU_SLOT = Path(sys.executable).parent / "ptqrepro-gpu-slot"
"""The command the rules start their GPU jobs through (ptqrepro.runtime.gpuslot), as pip installed it."""
SHOW = ["sh", "-c", 'echo "$(date +%s.%N) ${CUDA_VISIBLE_DEVICES-unset}"; sleep 1']
"""A job's stand-in: when it started and the GPUs it sees (then it holds them for a second)."""


def gpu_slot(gpus, device, environ, slots):
    """ptqrepro-gpu-slot started on SHOW, without waiting."""
    env = {key: value for key, value in os.environ.items() if key not in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")}
    return subprocess.Popen([GPU_SLOT, str(gpus), device, *SHOW], stdout=subprocess.PIPE, text=True,
                            env={**env, "PTQ_GPU_SLOTS": str(slots), **environ})


def shown(job) -> tuple[float, str]:
    started, _, visible = job.communicate(timeout=30)[0].strip("\n").partition(" ")
    return float(started), visible


def test_gpu_slot_gives_each_job_a_gpu_of_its_own(tmp_path):
    """Three GPU jobs on a machine with GPUs 0 and 2: the first two at once on different GPUs, the
    third once one of them is free again."""
    jobs = sorted(shown(job) for job in [gpu_slot(1, "auto", {"CUDA_VISIBLE_DEVICES": "0,2"}, tmp_path)
                                         for _ in range(3)])
    assert sorted(visible for _, visible in jobs[:2]) == ["0", "2"], jobs
    assert jobs[2][1] in ("0", "2") and jobs[2][0] - jobs[0][0] >= 0.9, jobs


def test_gpu_slot_leaves_other_jobs_as_they_are(tmp_path):
    cases = [(0, "auto", {"CUDA_VISIBLE_DEVICES": "0,1"}, "0,1"),  # no GPU asked
             (1, "cuda:1", {"CUDA_VISIBLE_DEVICES": "0,1"}, "0,1"),  # a pinned device
             (1, "cpu", {}, "unset"),
             (1, "auto", {"CUDA_VISIBLE_DEVICES": "3", "SLURM_JOB_ID": "7"}, "3"),  # SLURM chose
             (1, "auto", {"CUDA_VISIBLE_DEVICES": ""}, "")]  # no GPU visible
    for gpus, device, environ, expected in cases:
        assert shown(gpu_slot(gpus, device, environ, tmp_path))[1] == expected, (gpus, device, environ)
