"""Stage-in (ptqrepro.runtime.hub, prepare-model, prepare-corpus), its planning checks (preflight.staging_problems),
and the revisions every result records: on a Hugging Face cache laid out by tests/hubcache.py under
real hub ids, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas
import pytest

from hubcache import NETGUARD, WIKITEXT_CONFIG, add_c4_snapshot, add_folder_snapshot, add_snapshot, add_wikitext_snapshot
from ptqrepro.runtime import hub
from ptqrepro.cli import main
from ptqrepro.errors import PtqError
from ptqrepro.models.shapes import KNOWN_PARAMETERS, checkpoint_bytes, checkpoint_parameters
from ptqrepro.models.sources import ModelSource, load_model, model_location, prepare_model
from ptqrepro.checks.preflight import staging_problems
from test_dag import REPO, SNAKEMAKE, tiny_config, write_config

WIKITEXT_ROWS = {
    "train": ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical role @-@ playing game .\n"],
    "validation": ["", " = Homarus gammarus = \n", " Homarus gammarus is a species of clawed lobster .\n"],
    "test": ["", " = Robert Boulter = \n", " Robert Boulter is an English film , television and theatre actor .\n"],
}
C4_RECORDS = {"train": [f"C4 training document {k}.\nIt has two lines." for k in range(5)],
              "validation": [f"C4 validation document {k}." for k in range(3)]}


def tokenizer_class(folder: Path) -> str:
    from transformers import AutoTokenizer

    return type(AutoTokenizer.from_pretrained(folder)).__name__


@pytest.fixture()
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home for this test, offline; datasets' Arrow cache under it too."""
    import datasets

    home = tmp_path / "hf-home"
    (home / "hub").mkdir(parents=True)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    hub.stage_dataset.cache_clear()
    yield home
    hub.stage_dataset.cache_clear()


def test_a_hub_model_is_staged_from_the_cache_and_read_at_its_commit(hf_home, tiny_model_dir, tmp_path):
    commit = add_folder_snapshot(hf_home / "hub", "org/tiny-llama", tiny_model_dir)
    manifest = prepare_model(ModelSource.from_config("tiny", {"hub": "org/tiny-llama"}), tmp_path / "tiny")
    assert manifest["revision"] == commit and manifest["snapshot"].endswith(f"snapshots/{commit}")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["bytes"] == sum(manifest["files"].values()) == sum(
        path.stat().st_size for path in tiny_model_dir.iterdir())
    # the hub moves on: main points at a new commit; the prepared model still reads the staged one
    newer = add_snapshot(hf_home / "hub", "org/tiny-llama", {"config.json": b"{}"}, commit="f" * 40)
    assert model_location(tmp_path / "tiny") == manifest["snapshot"] != newer
    model, tokenizer = load_model(tmp_path / "tiny")
    assert model.config.num_hidden_layers == 2 and type(tokenizer).__name__ == tokenizer_class(tiny_model_dir)


def test_a_model_folder_needs_no_cache_and_a_missing_one_is_an_error(hf_home, tiny_model_dir, tmp_path):
    manifest = prepare_model(ModelSource.from_config("tiny", {"hub": str(tiny_model_dir)}), tmp_path / "tiny")
    assert manifest["path"] == str(tiny_model_dir) and manifest["revision"] is None
    with pytest.raises(PtqError, match="does not exist"):
        prepare_model(ModelSource.from_config("m", {"hub": str(tmp_path / "nowhere")}), tmp_path / "m")
    with pytest.raises(PtqError, match="not in the Hugging Face cache .* stage it where the network is"):
        prepare_model(ModelSource.from_config("m", {"hub": "org/not-staged"}), tmp_path / "m")


def test_only_the_files_a_load_reads_are_downloaded_safetensors_first(monkeypatch, tmp_path):
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listing = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "original/consolidated.pth"]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, **kw: SimpleNamespace(
        sha="a" * 40, siblings=[SimpleNamespace(rfilename=name) for name in listing]))
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or str(snapshot))
    staged = hub.stage_model("org/model", cache=tmp_path)
    assert staged["revision"] == "a" * 40 and staged["files"] == {"config.json": 2, "model.safetensors": 2}
    (repo, kwargs), = calls
    assert repo == "org/model" and kwargs["revision"] == "a" * 40
    chosen = [name for name in listing if any(__import__("fnmatch").fnmatch(name, p) for p in kwargs["allow_patterns"])]
    assert chosen == ["config.json", "model.safetensors", "tokenizer.json"]
    assert "pytorch_model*.bin" in hub.model_patterns(["config.json", "pytorch_model-00001-of-00002.bin"])


def test_a_gated_model_says_how_to_get_access(monkeypatch, tmp_path):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def refuse(self, repo, **kwargs):
        raise GatedRepoError("401", response=httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co")))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    with pytest.raises(PtqError, match=r"gated: accept its licence on https://huggingface.co/meta-llama/Llama-2-7b-hf.*hf auth login.*HF_TOKEN"):
        hub.stage_model("meta-llama/Llama-2-7b-hf", cache=tmp_path)


@pytest.mark.parametrize("corpus, add, expected", [
    ("wikitext2", lambda home: add_wikitext_snapshot(home / "hub", WIKITEXT_ROWS), WIKITEXT_ROWS),
    ("c4", lambda home: add_c4_snapshot(home / "hub", C4_RECORDS),
     {"train": C4_RECORDS["train"], "validation": C4_RECORDS["validation"], "test": C4_RECORDS["validation"]}),
])
def test_hub_corpora_are_prepared_offline_from_the_cache(hf_home, tmp_path, corpus, add, expected):
    commit = add(hf_home)
    assert main(["prepare-corpus", "--name", corpus, "--out", str(tmp_path / corpus)]) == 0
    for split, texts in expected.items():
        lines = (tmp_path / corpus / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line)["text"] for line in lines] == texts
    assert json.loads((tmp_path / corpus / "corpus.json").read_text())["revision"] == commit


def test_wikitext_documents_are_those_of_its_parquet_files(hf_home, tmp_path):
    """The staged corpus reads the config's parquet files through the repository's card, as
    ``load_dataset("wikitext", "wikitext-2-raw-v1")`` does: the same rows as the files read directly."""
    from ptqrepro.data.corpora import corpus_spec, hub_snapshot, load_documents

    add_wikitext_snapshot(hf_home / "hub", WIKITEXT_ROWS)
    folder, _ = hub_snapshot(corpus_spec("wikitext2"))
    for split in WIKITEXT_ROWS:
        direct = pandas.read_parquet(next((folder / WIKITEXT_CONFIG).glob(f"{split}-*.parquet")))["text"].tolist()
        assert load_documents(corpus_spec("wikitext2"), split) == direct


def test_a_hub_corpus_not_in_the_cache_offline_is_an_error(hf_home, tmp_path, capsys):
    assert main(["prepare-corpus", "--name", "c4", "--out", str(tmp_path / "c4")]) == 2
    assert "dataset allenai/c4 is not in the Hugging Face cache" in capsys.readouterr().err
    assert not (tmp_path / "c4").exists()


# --- planning: preflight.staging_problems ----------------------------------------------------------


def planning_config(models: dict, offline: bool, **staging) -> dict:
    return {"offline": offline, "models": {name: {"hub": hub_id} for name, hub_id in models.items()},
            "staging": {"min_free_gb": 0, **staging}, "corpora": {},
            "calibration": {"corpus": "wiki-mini"}, "eval": {"ppl": {"datasets": ["wiki-mini"]}}}


def problems(config, model_configs=None, environ=None) -> list[str]:
    return [str(problem) for problem in staging_problems(config, model_configs or {}, log=lambda line: None,
                                                          environ=environ if environ is not None else os.environ)]


def test_a_hub_model_not_in_the_cache_while_offline_is_a_planning_error(hf_home, tiny_model_dir):
    config = planning_config({"tiny": "org/tiny-llama"}, offline=True)
    [problem] = problems(config)
    assert "models.tiny.hub: 'org/tiny-llama': not in the Hugging Face cache" in problem and "offline" in problem
    add_folder_snapshot(hf_home / "hub", "org/tiny-llama", tiny_model_dir)
    assert problems(config) == []
    config["corpora"] = {"wikitext2": {}}
    config["eval"]["ppl"]["datasets"] = ["wikitext2"]
    assert [p.split(":")[0] for p in problems(config)] == ["corpora.wikitext2.path"]
    add_wikitext_snapshot(hf_home / "hub", WIKITEXT_ROWS)
    assert problems(config) == []


def test_a_gated_model_without_a_token_is_a_planning_error(hf_home, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    config = planning_config({"llama-2-7b": "meta-llama/Llama-2-7b-hf"}, offline=False)
    [problem] = problems(config)
    assert problem.startswith("models.llama-2-7b.hub: 'meta-llama/Llama-2-7b-hf': a gated repository")
    assert "accept its licence on https://huggingface.co/meta-llama/Llama-2-7b-hf" in problem
    assert "`hf auth login`" in problem and "HF_TOKEN" in problem
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token")
    monkeypatch.setattr("ptqrepro.checks.preflight.shutil.disk_usage", lambda path: SimpleNamespace(free=10**15))
    assert problems(config) == []


def test_a_missing_model_folder_and_hf_home_are_planning_errors(hf_home, tmp_path):
    config = planning_config({"m": str(tmp_path / "no-model")}, offline=True, hf_home=str(tmp_path / "no-home"))
    found = problems(config)
    assert [p.split(":")[0] for p in found] == ["staging.hf_home", "models.m.hub"]
    assert all("no such folder" in p for p in found)


def test_the_disk_check_counts_the_models_still_to_download(hf_home, tmp_path, monkeypatch):
    from transformers import LlamaConfig

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("ptqrepro.checks.preflight.is_gated", lambda repo, ask_hub=False: False)
    free = {"bytes": 20e9}
    monkeypatch.setattr("ptqrepro.checks.preflight.shutil.disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    llama_7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           vocab_size=32000, dtype="float16")
    config = planning_config({"a": "org/llama-7b", "b": "huggyllama/llama-13b", "c": "org/unknown"}, offline=False,
                             hf_home=str(hf_home), min_free_gb=1)
    [problem] = problems(config, {"a": llama_7b})
    assert problem.startswith(f"staging.hf_home: '{hf_home}': 20.0 GB free")
    assert "the downloads need 40.5 GB (org/llama-7b 13.5 GB, huggyllama/llama-13b 26.0 GB, and min_free_gb 1)" in problem
    free["bytes"] = 42e9
    assert problems(config, {"a": llama_7b}) == []


@pytest.mark.parametrize("hub_id, config", [
    ("huggyllama/llama-7b", dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, vocab_size=32000)),
    ("huggyllama/llama-65b", dict(model_type="llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                                  num_attention_heads=64, vocab_size=32000)),
    ("meta-llama/Llama-2-70b-hf", dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    ("mistralai/Mistral-7B-v0.1", dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
    ("facebook/opt-1.3b", dict(model_type="opt", hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                               num_attention_heads=32, vocab_size=50272, tie_word_embeddings=True)),
])
def test_the_known_sizes_are_those_of_the_architectures(hub_id, config):
    """The table's parameters (for a config.json not readable before the download) within 1 % of
    ``checkpoint_parameters`` of each architecture's published dimensions."""
    from transformers import AutoConfig

    model_config = AutoConfig.for_model(**config)
    assert checkpoint_parameters(model_config) == pytest.approx(KNOWN_PARAMETERS[hub_id], rel=0.01)
    model_config.dtype = "float16"
    assert checkpoint_bytes(model_config) == 2 * checkpoint_parameters(model_config)


def test_hf_home_moves_the_cache_but_keeps_the_users_login(tmp_path):
    own, shared = tmp_path / "own-cache", tmp_path / "shared"
    environ = {"XDG_CACHE_HOME": str(own)}
    assert hub.staging_environment({"hf_home": str(shared)}, environ) == {"HF_HOME": str(shared)}
    (own / "huggingface").mkdir(parents=True)
    (own / "huggingface" / "token").write_text("hf_token")
    assert hub.staging_environment({"hf_home": str(shared)}, environ) == {
        "HF_HOME": str(shared), "HF_TOKEN_PATH": str(own / "huggingface" / "token")}
    (shared / "token").parent.mkdir()
    (shared / "token").write_text("hf_other")  # logged in with the shared home: that login wins
    assert hub.staging_environment({"hf_home": str(shared)}, environ) == {"HF_HOME": str(shared)}
    assert hub.staging_environment({"hf_home": None}, environ) == {}
    assert hub.hub_cache({"HF_HOME": str(shared)}) == shared / "hub"


# --- the jobs: offline, and what their results record ------------------------------------------------


def guarded_job(args: list[str], hf_home: Path, log: Path) -> subprocess.CompletedProcess:
    """``ptqrepro ARGS`` as a Snakemake job runs it (the offline variables of OFFLINE_JOB), with every
    non-loopback connection refused and logged (tests/netguard)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NETGUARD_LOG": str(log),
            "PYTHONPATH": os.pathsep.join([str(NETGUARD), str(REPO / "src")])}
    return subprocess.run([sys.executable, "-m", "ptqrepro.cli", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_jobs_read_the_staged_inputs_without_the_network_and_record_their_revisions(hf_home, tiny_model_dir, tmp_path):
    model_commit = add_folder_snapshot(hf_home / "hub", "org/tiny-llama", tiny_model_dir)
    text = (REPO / "tests" / "conftest.py").read_text()  # any prose long enough for windows
    corpus_commit = add_wikitext_snapshot(hf_home / "hub", {"train": [text], "validation": [text], "test": [text]})
    log = tmp_path / "connections.log"
    model, corpus = tmp_path / "model", tmp_path / "corpus"
    steps = [
        ["prepare-model", "--name", "tiny", "--spec", '{hub: org/tiny-llama}', "--out", str(model)],
        ["prepare-corpus", "--name", "wikitext2", "--out", str(corpus)],
        ["calibrate", "--model", str(model), "--corpus", str(corpus), "--nsamples", "2", "--seqlen", "32",
         "--out", str(tmp_path / "calib.pt")],
        # a recipe that reads the calibration windows, so that its result records their corpus's revision
        ["quantize", "--model", str(model), "--calibration", str(tmp_path / "calib.pt"), "--recipe", "gptq@int4-g16",
         "--spec", "{steps: [gptq], weight: int4-g16}", "--device", "cpu", "--out", str(tmp_path / "q"),
         "--metrics", str(tmp_path / "quantize.json")],
        ["eval-ppl", "--model", str(model), "--quantized", str(tmp_path / "q"), "--corpus", str(corpus), "--seqlen", "32",
         "--max-windows", "4", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path / "ppl.json")],
    ]
    for step in steps:
        run = guarded_job(step, hf_home, log)
        assert run.returncode == 0, run.stderr[-3000:]
    assert not log.exists(), log.read_text()
    for name in ("quantize.json", "ppl.json"):
        provenance = json.loads((tmp_path / name).read_text())["provenance"]
        assert (provenance["model_revision"], provenance["dataset_revision"], provenance["tokenizer_class"]) == (
            model_commit, corpus_commit, tokenizer_class(tiny_model_dir))
    assert main(["tables", "--out", str(tmp_path / "tables"), "--bootstrap-samples", "100",
                 str(tmp_path / "quantize.json"), str(tmp_path / "ppl.json")]) == 0
    table = pandas.read_csv(tmp_path / "tables" / "all.csv")
    assert set(table["model_revision"]) == {model_commit} and set(table["dataset_revision"]) == {corpus_commit}


def test_the_socket_guard_refuses_and_logs_a_connection(tmp_path):
    log = tmp_path / "connections.log"
    code = "import socket; socket.create_connection(('198.51.100.7', 443), timeout=1)"
    env = {**os.environ, "NETGUARD_LOG": str(log), "PYTHONPATH": str(NETGUARD)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "netguard" in run.stderr
    assert "198.51.100.7" in log.read_text()


LOCAL_RULES = """
import sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings

with SnakemakeApi(OutputSettings()) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=Path(sys.argv[1]), workdir=Path(sys.argv[2]))
    print(" ".join(sorted(workflow._workflow._localrules)))  # what `localrules:` declared
"""
"""Prints the rules of the Snakefile (argument 1) that run where Snakemake runs, in the folder
(argument 2) with its config/config.yaml; Snakemake shows local rules as such only when running them."""


@pytest.mark.slow
def test_the_stage_in_runs_locally_and_every_later_job_offline(tmp_path, tiny_model_dir, tiny_corpus):
    """On the tiny config online (offline: false): prepare_model and prepare_corpus are local rules
    (the submit host, with the network), and the dry run's command of every job that reads a model
    sets the offline variables."""
    config = tiny_config(tiny_model_dir, tiny_corpus)
    config["offline"] = False
    write_config(tmp_path, config)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    local = subprocess.run([sys.executable, "-c", LOCAL_RULES, str(REPO / "Snakefile"), str(tmp_path)],
                           capture_output=True, text=True, env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    assert local.stdout.split() == ["prepare_corpus", "prepare_model", "stage", "stage_zeroshot_tasks"]
    run = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "-n", "-p"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    commands = [line.strip().removeprefix("Shell command: ") for line in run.stdout.splitlines() if "ptqrepro " in line]
    loading = [command for command in commands if any(f"ptqrepro {job} " in command for job in
                                                       ("calibrate", "quantize", "float-reference", "eval-ppl",
                                                        "eval-zeroshot"))]
    assert len(loading) == 4 + 1 + 4 + 1  # quantize (no recipe calibrates), the float reference, the evaluations
    assert all(command.startswith("HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 ") for command in loading)
    staging = [command for command in commands if "prepare-model" in command or "prepare-corpus" in command]
    assert len(staging) == 2 and not any("OFFLINE" in command for command in staging)


@pytest.mark.parametrize("argv, dry", [
    (["snakemake", "-n", "--cores", "2"], True), (["snakemake", "-np"], True), (["snakemake", "--dry-run"], True),
    (["snakemake", "--cores", "2", "--configfile", "config/papers/lqer.yaml"], False), (["pytest", "--no-such-flag=1"], False),
])
def test_a_dry_run_is_told_from_snakemakes_command_line(argv, dry):
    from ptqrepro.checks.preflight import snakemake_dry_run

    assert snakemake_dry_run(argv) is dry
