"""The paper configs rehearsed as a cluster user runs them, offline, on tiny models.

A hub cache (HF_HOME) holds a tiny random model of the right class under every hub id the paper
configs name and hub-layout snapshots of the corpora (tests/rehearsal/hub.py), and stand-in data
for the lm-eval tasks the configs score (tests/rehearsal/tasks.py: the real ones cannot be
downloaded here); each paper config is
copied with only its sizes shrunk (tests/rehearsal/shrink.py); Snakemake runs the repository's
Snakefile on it in a temp folder with HF_HUB_OFFLINE=1 and a network guard in every Python process
(tests/netguard), through the data preparation, calibration, quantization,
evaluation, tables, claims and the papers' tables. The values are meaningless; the path is not.

    python -m pytest -m rehearsal -n 0 -s    every paper config, each printing its jobs and time
                                             (one worker: -s shows the prints; an hour and more)

The default run (and CI) deselects the ``rehearsal`` mark (pyproject.toml); it runs one slice of
the MX-PTQ config through ``--profile profiles/slurm`` on the SLURM test cluster (test_slurm.py,
with this module's ``rehearse``). ``-m rehearsal`` adds the LQER config on its Mistral-7B model
(SLICE, about 2 minutes) and every whole paper config.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas
import pytest
import yaml

from hubcache import NETGUARD
from rehearsal.hub import ARCHITECTURES
from rehearsal.shrink import write_shrunk_config
from rehearsal.tasks import TASK_DATASETS
from test_dag import REPO

PAPERS = sorted(path.stem for path in (REPO / "config" / "papers").glob("*.yaml"))
SLICE = ("lqer", ["mistral-7b"])
"""A slice run with -m rehearsal: the LQER config on Mistral-7B alone (4 recipes, the MX formats, LQER and L2QER)."""


@dataclass
class Rehearsal:
    """One Snakemake run of a shrunk paper config: its folder, the config it ran, the finished
    process, its wall time and the connections the guard refused."""

    workdir: Path
    config: dict
    run: subprocess.CompletedProcess
    seconds: float
    attempts: list[str]

    @property
    def log(self) -> str:
        return self.run.stdout + self.run.stderr

    @property
    def jobs(self) -> int | None:
        """Snakemake's planned job count (its "Job stats" total)."""
        found = re.search(r"^total\s+(\d+)$", self.log, flags=re.MULTILINE)
        return int(found.group(1)) if found else None

    def failure(self) -> str:
        """The last lines of each failed job's log (at most five), else the tail of Snakemake's."""
        logs = dict.fromkeys(re.findall(r"Error in rule \w+:.*?log: (results/logs/\S+?\.log)", self.log, flags=re.DOTALL))
        tails = [f"--- {path}\n" + "\n".join((self.workdir / path).read_text().splitlines()[-8:])
                 for path in logs if (self.workdir / path).is_file()]
        return "\n".join(tails[:5]) or self.log[-4000:]


def offline_env(hf_home: Path, attempts_log: Path) -> dict:
    """The environment of a rehearsal: the cache, the offline switches, the guard first on PYTHONPATH."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               NETGUARD_LOG=str(attempts_log),
               PYTHONPATH=os.pathsep.join([str(NETGUARD), *filter(None, [env.get("PYTHONPATH")])]))
    return env


def rehearse(paper: str, workdir: Path, hf_home: Path, models: list[str] | None = None,
             recipes: list[str] | None = None, extra: list[str] = (), env: dict | None = None,
             timeout: float = 7200) -> Rehearsal:
    """Run ``config/papers/<paper>.yaml`` shrunk (and cut to ``models`` and ``recipes``) in
    ``workdir``, offline."""
    config_path = write_shrunk_config(REPO / "config" / "papers" / f"{paper}.yaml", workdir / "rehearsal.yaml", REPO,
                                      models, recipes)
    attempts_log = workdir / "network-attempts.jsonl"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--cores", "2", *extra, "--configfile", str(config_path)],
        capture_output=True, text=True, env={**offline_env(hf_home, attempts_log), **(env or {})}, timeout=timeout)
    attempts = attempts_log.read_text().splitlines() if attempts_log.exists() else []
    return Rehearsal(workdir, yaml.safe_load(config_path.read_text()), run, time.monotonic() - started, attempts)


def expected_rows(config: dict) -> pandas.DataFrame:
    """The reference rows a run of ``config`` must fill: a recipe of the config run on the row's
    model, and a metric the config produces (perplexity on an evaluated corpus; accuracy where the
    config scores zero-shot)."""
    from ptqrepro.report.paper_tables import load_reference

    reference = load_reference(config["reference"])
    models = list(config["models"])
    runs = {(model, recipe) for recipe, entry in config["recipes"].items() for model in entry.get("models", models)}
    produced = (reference["metric"] == "ppl") & reference["dataset"].isin(config["eval"]["ppl"]["datasets"])
    if config["eval"].get("zeroshot"):
        produced |= reference["metric"] != "ppl"
    mapped = [(model, recipe) in runs for model, recipe in zip(reference["model"], reference["recipe"])]
    return reference[produced & pandas.Series(mapped, index=reference.index)]


def unfilled(rehearsal: Rehearsal) -> list[str]:
    """The expected reference rows whose cell in results/tables/papers/<paper>.md has no value of ours."""
    from ptqrepro.report.paper_tables import _number, with_ours

    rows = expected_rows(rehearsal.config)
    results = pandas.read_csv(rehearsal.workdir / "results" / "tables" / "all.csv")
    compared = with_ours(rows, results)
    tables = {path.stem: path.read_text() for path in (rehearsal.workdir / "results" / "tables" / "papers").glob("*.md")}
    missing = []
    for row in compared.itertuples(index=False):
        page = tables.get(row.paper.lower().replace(" ", "-"), "")
        if math.isnan(row.ours) or f"{_number(row.value)} / {_number(row.ours)}" not in page:
            missing.append(f"{row.paper} {row.table}: {row.model} {row.recipe} {row.dataset} {row.metric}")
    return missing


def check_rehearsal(rehearsal: Rehearsal) -> None:
    if rehearsal.run.returncode != 0:
        pytest.fail(rehearsal.failure(), pytrace=False)
    assert rehearsal.attempts == [], f"connections attempted: {rehearsal.attempts[:5]}"
    assert unfilled(rehearsal) == []
    claims = pandas.read_csv(rehearsal.workdir / "results" / "tables" / "claims.csv")
    assert set(claims["claim"]) == {claim["claim"] for claim in rehearsal.config["claims"]}


def test_every_paper_hub_id_has_a_tiny_model():
    """The cache holds every hub id the paper configs name: a model added to a config is added here."""
    named = {entry["hub"] for paper in PAPERS
             for entry in yaml.safe_load((REPO / "config" / "papers" / f"{paper}.yaml").read_text())["models"].values()}
    assert named == set(ARCHITECTURES)


def test_every_paper_zeroshot_task_has_a_stand_in():
    """Every zero-shot task a paper config scores has stand-in data (tests/rehearsal/tasks.py)."""
    from ptqrepro.eval.zeroshot import LOCAL_TASKS

    named = {task for paper in PAPERS
             for task in (yaml.safe_load((REPO / "config" / "papers" / f"{paper}.yaml").read_text())["eval"]
                          .get("zeroshot") or {}).get("tasks", [])}
    assert named - set(LOCAL_TASKS) <= set(TASK_DATASETS)


@pytest.mark.slow
def test_zeroshot_stand_ins_build_offline(hub_home, tmp_path):
    """lm-eval's own task definitions build offline from the stand-in data, in a process with the
    rehearsal's environment (nothing reaches the network)."""
    probe = ("from lm_eval.tasks import TaskManager\n"
             "manager = TaskManager()\n"
             "for name in ('arc_easy', 'hellaswag', 'lambada_openai'):\n"
             "    task = manager.load([name])['tasks'][name]\n"
             "    docs = list(task.eval_docs)\n"
             "    print(name, len(docs), repr(task.doc_to_text(docs[0]))[:40])\n")
    log = tmp_path / "attempts.jsonl"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=offline_env(hub_home, log),
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [line.split()[:2] for line in run.stdout.splitlines()] == [["arc_easy", "24"], ["hellaswag", "24"],
                                                                       ["lambada_openai", "24"]]
    assert not log.exists()


def test_hub_cache_resolves_offline(hub_home, monkeypatch):
    """The tiny models load by hub id from the cache with the hub offline, in the class their real
    checkpoint has, in float16 (the real checkpoints' dtype)."""
    from huggingface_hub import constants, snapshot_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    for hub_id, architecture in [("meta-llama/Llama-2-70b-hf", "LlamaForCausalLM"), ("facebook/opt-125m", "OPTForCausalLM"),
                                 ("mistralai/Mistral-7B-v0.1", "MistralForCausalLM")]:
        folder = Path(snapshot_download(hub_id))
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == [architecture] and config["dtype"] == "float16"
        assert (folder / "model.safetensors.index.json").is_file() and (folder / "tokenizer.json").is_file()
    from ptqrepro.data.corpora import BUILTIN_CORPORA

    wikitext = Path(snapshot_download(BUILTIN_CORPORA["wikitext2"].path, repo_type="dataset"))
    assert (wikitext / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet").stat().st_size > 100_000


@pytest.mark.rehearsal
def test_rehearsal_slice(hub_home, tmp_path):
    """The LQER config shrunk, on Mistral-7B alone, offline, to its paper table (about 2 minutes:
    with -m rehearsal; the suite runs the SLURM slice below, which takes the same path)."""
    paper, models = SLICE
    rehearsal = rehearse(paper, tmp_path, hub_home, models)
    print(f"rehearsal {paper} {models}: {rehearsal.jobs} jobs, {rehearsal.seconds:.0f} s")
    check_rehearsal(rehearsal)


@pytest.mark.rehearsal
@pytest.mark.parametrize("paper", PAPERS)
def test_paper_rehearsal(paper, request, tmp_path):
    """A whole paper config shrunk in sizes only, offline, to its paper tables and claims. Runs only
    when the mark expression names it (``-m rehearsal``): another ``-m`` replaces the default
    deselection, and one config takes tens of minutes."""
    if "rehearsal" not in request.config.getoption("markexpr"):
        pytest.skip("the whole rehearsal runs with -m rehearsal")
    rehearsal = rehearse(paper, tmp_path, request.getfixturevalue("hub_home"))
    print(f"rehearsal {paper}: {rehearsal.jobs} jobs, {rehearsal.seconds:.0f} s")
    check_rehearsal(rehearsal)
