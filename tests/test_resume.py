"""Per-layer checkpoints: a quantization or DWR job stopped half-way and run again resumes after
its last finished layer and gives the uninterrupted run's result, bit for bit."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from ptqrepro.export.artifact import Artifact, save_artifact, load_artifact
from ptqrepro.layerwise.checkpoint import LayerCheckpoints
from ptqrepro.cli import main
from ptqrepro.errors import PtqError
from ptqrepro.formats import parse_format
from ptqrepro.methods.rtn import rtn
from ptqrepro.layerwise.pipeline import quantize_model
from ptqrepro.layerwise.reconstruction import search_model
from ptqrepro.recipe.recipes import DwrSettings, recipe_from_config


REPO = Path(__file__).resolve().parents[1]


class Crash(Exception):
    """Stands in for a job killed after a layer."""


def crash_after(layer: int):
    def log(message: str) -> None:
        if message.startswith(f"layer {layer}:"):
            raise Crash(message)

    return log


def calibration(n=6, seqlen=32, seed=0):
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[name].codes, b[name].codes)
        and all(torch.equal(a[name].params[key], b[name].params[key]) for key in a[name].params)
        for name in a
    )


@pytest.mark.parametrize("entry", [
    {"steps": ["gptq"], "weight": "int3"},
    {"steps": ["smoothquant", "rtn", {"l2qer": {"rank": 4}}], "weight": "mxint4", "act": "mxint8"},
])
def test_quantize_resumes_after_the_last_finished_layer(tmp_path, entry):
    base = tiny_llama(vocab_size=96, layers=3)
    recipe = recipe_from_config("r", entry)
    uninterrupted = quantize_model(copy.deepcopy(base), recipe, calibration())
    checkpoints = LayerCheckpoints(tmp_path / "ckpt", "settings")
    with pytest.raises(Crash):
        quantize_model(copy.deepcopy(base), recipe, calibration(), log=crash_after(1), checkpoints=checkpoints)
    assert checkpoints.finished() == 2
    messages = []
    resumed_model = copy.deepcopy(base)
    resumed = quantize_model(resumed_model, recipe, calibration(), log=messages.append, checkpoints=checkpoints)
    assert [m.split(" in ")[0] for m in messages[:2]] == [f"layer {i}: restored from {tmp_path / 'ckpt'}" for i in (0, 1)]
    assert not messages[2].startswith("layer 2: restored")
    assert same_weights(resumed.quantized, uninterrupted.quantized)
    assert resumed.float_parameters.keys() == uninterrupted.float_parameters.keys()
    assert all(torch.equal(resumed.float_parameters[k], uninterrupted.float_parameters[k]) for k in resumed.float_parameters)
    assert resumed.corrections.keys() == uninterrupted.corrections.keys()
    for name, term in resumed.corrections.items():
        assert torch.equal(term.weight_delta(), uninterrupted.corrections[name].weight_delta())
    assert [r["weight_rel_error"] for r in resumed.records] == [r["weight_rel_error"] for r in uninterrupted.records]


def test_checkpoints_of_other_settings_are_discarded(tmp_path):
    weight = rtn(torch.randn(8, 16), parse_format("int4"))
    layer = Artifact({"model.layers.0.mlp.up_proj": weight}, {}, {}, {"layer": 0, "records": []})
    first = LayerCheckpoints(tmp_path / "ckpt", "a")
    first.save(0, layer)
    assert LayerCheckpoints(tmp_path / "ckpt", "a").finished() == 1
    assert torch.equal(first.load(0).quantized["model.layers.0.mlp.up_proj"].codes, weight.codes)
    messages = []
    assert LayerCheckpoints(tmp_path / "ckpt", "b", log=messages.append).finished() == 0
    assert messages and "other settings: discarded" in messages[0]
    LayerCheckpoints(tmp_path / "ckpt", "b").remove()
    assert not (tmp_path / "ckpt").exists()


def test_a_layer_gap_stops_the_resume_there(tmp_path):
    checkpoints = LayerCheckpoints(tmp_path / "ckpt", "a")
    weight = rtn(torch.randn(8, 16), parse_format("int4"))
    for index in (0, 2):
        checkpoints.save(index, Artifact({f"l{index}": weight}, {}, {}, {"layer": index, "records": []}))
    assert checkpoints.finished() == 1


def test_dwr_resumes_after_the_last_searched_block(tmp_path):
    fresh = tiny_llama(vocab_size=96, layers=3)
    result = quantize_model(copy.deepcopy(fresh), recipe_from_config("g", {"steps": ["gptq"], "weight": "int2"}), calibration())
    save_artifact(tmp_path / "base", result.quantized, {}, {"recipe": "base", "act_format": None})
    base = load_artifact(tmp_path / "base")
    settings = DwrSettings(ranks=(2, 8, 32))

    def search(**kwargs):
        return search_model(fresh, base, calibration(n=4, seed=3), settings, batch_size=2, **kwargs)

    uninterrupted = search()
    checkpoints = LayerCheckpoints(tmp_path / "ckpt", "dwr")
    with pytest.raises(Crash):
        search(log=crash_after(0), checkpoints=checkpoints)
    assert checkpoints.finished() == 1
    resumed = search(checkpoints=checkpoints)
    assert same_weights(resumed.quantized, uninterrupted.quantized)
    assert [(b.layer, b.chosen, b.curve) for b in resumed.blocks] == [(b.layer, b.chosen, b.curve) for b in uninterrupted.blocks]
    assert resumed.final_ppl == uninterrupted.final_ppl


@pytest.mark.slow
def test_a_killed_quantize_job_resumes_to_the_same_artifact(tmp_path, tiny_corpus):
    """A real `ptqrepro quantize` process, SIGKILLed once it has logged layer 1 of 6, rerun; the
    result is byte for byte the artifact of an uninterrupted run (in this process)."""
    model_dir = tmp_path / "model"
    tokenizer = tiny_tokenizer(tiny_corpus)
    tiny_llama(len(tokenizer), layers=6).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prepare = [["prepare-model", "--name", "six", "--spec", json.dumps({"hub": str(model_dir)}), "--out", str(tmp_path / "m")],
               ["prepare-corpus", "--name", "tiny", "--spec", f"{{source: local, path: {tiny_corpus}}}", "--out", str(tmp_path / "c")],
               ["calibrate", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "c"), "--nsamples", "4",
                "--seqlen", "32", "--out", str(tmp_path / "calib.pt")]]
    for arguments in prepare:
        assert main(arguments) == 0

    def quantize(out: str, checkpoint: str | None = None) -> list[str]:
        job = ["quantize", "--model", str(tmp_path / "m"), "--calibration", str(tmp_path / "calib.pt"),
               "--recipe", "magr+gptq", "--spec", "{steps: [{magr: {iterations: 300}}, gptq], weight: int3}",
               "--device", "cpu", "--dtype", "float32", "--threads", "1",
               "--out", str(tmp_path / out), "--metrics", str(tmp_path / f"{out}.json")]
        return job + (["--checkpoint-dir", str(tmp_path / checkpoint)] if checkpoint else [])

    cli = [sys.executable, "-m", "ptqrepro.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen([*cli, *quantize("resumed", "ckpt")], stdout=subprocess.PIPE, text=True, env=env)
    for line in killed.stdout:
        if line.startswith("layer 1:"):
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    layers_done = sorted(path.name for path in (tmp_path / "ckpt").glob("layer-*"))
    assert layers_done[:2] == ["layer-0000", "layer-0001"] and len(layers_done) < 6, layers_done
    assert not (tmp_path / "resumed").exists()
    rerun = subprocess.run([*cli, *quantize("resumed", "ckpt")], capture_output=True, text=True, env=env, check=True)
    assert "layer 0: restored" in rerun.stdout and "layer 1: restored" in rerun.stdout
    assert not (tmp_path / "ckpt").exists()  # removed once the artifact is written
    assert main(quantize("uninterrupted")) == 0
    resumed, uninterrupted = (tmp_path / name / "quantized.safetensors" for name in ("resumed", "uninterrupted"))
    assert resumed.read_bytes() == uninterrupted.read_bytes()


HOLDER = """
import sys
import torch
from ptqrepro.export.artifact import Artifact
from ptqrepro.layerwise.checkpoint import LayerCheckpoints
from ptqrepro.formats import parse_format
from ptqrepro.methods.rtn import rtn

checkpoints = LayerCheckpoints(sys.argv[1], "settings")
checkpoints.save(0, Artifact({"l0": rtn(torch.randn(8, 16), parse_format("int4"))}, {}, {}, {"layer": 0, "records": []}))
print("holding", flush=True)
sys.stdin.read()
"""
"""A job that took a checkpoint folder and finished its layer 0, then runs until it is killed."""


def hold(folder) -> subprocess.Popen:
    """A process holding ``folder``'s lock (``HOLDER``), once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "holding\n"
    return holder


def quantize_job(tmp_path) -> list[str]:
    """`ptqrepro quantize` with checkpoints in tmp_path/ckpt, on calibration windows but no model."""
    torch.save({"input_ids": calibration(n=2), "corpus": "c", "seed": 0}, tmp_path / "calib.pt")
    return ["quantize", "--model", str(tmp_path / "no-model"), "--calibration", str(tmp_path / "calib.pt"),
            "--recipe", "r", "--spec", "{steps: [rtn], weight: int4}", "--device", "cpu",
            "--out", str(tmp_path / "q"), "--metrics", str(tmp_path / "q.json"), "--checkpoint-dir", str(tmp_path / "ckpt")]


def test_a_second_job_on_a_held_checkpoint_folder_stops_at_once(tmp_path, capsys):
    """While a job holds its checkpoint folder, another on it stops before any work (the command:
    before loading the model, one line naming the folder and the holder's PID). Once the holder is
    SIGKILLed, the kernel has dropped its lock: a new job takes the folder and finds its layer."""
    holder = hold(tmp_path / "ckpt")
    try:
        message = f"checkpoint folder {tmp_path / 'ckpt'} is in use by another job (PID {holder.pid})"
        with pytest.raises(PtqError, match=re.escape(message)):
            LayerCheckpoints(tmp_path / "ckpt", "settings")
        assert main(quantize_job(tmp_path)) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1  # not "not a prepared model": it stopped first
        assert not (tmp_path / "q").exists()
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    resumed = LayerCheckpoints(tmp_path / "ckpt", "settings")
    assert resumed.finished() == 1
    assert (tmp_path / "ckpt" / "lock").read_text() == f"{os.getpid()}\n"
    resumed.remove()
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_job_releases_its_checkpoint_folder(tmp_path, capsys):
    """A job that fails after taking its folder (here: no model to load) lets another take it at once."""
    assert main(quantize_job(tmp_path)) == 1
    assert "not a prepared model" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "fingerprint.json").is_file()
    holder = hold(tmp_path / "ckpt")
    holder.kill()
    holder.wait()


SNAKEMAKE_RECIPE = {"magr+gptq@int3": {"steps": [{"magr": {"iterations": 300}}, "gptq"], "weight": "int3"}}


def six_layer_run(root, tiny_corpus):
    """A workdir whose config runs ``SNAKEMAKE_RECIPE`` on a 6-layer tiny model."""
    import yaml

    model_dir = root / "six"
    tokenizer = tiny_tokenizer(tiny_corpus)
    tiny_llama(len(tokenizer), layers=6).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = {"offline": True, "device": "cpu", "threads": 1, "models": {"six": {"hub": str(model_dir)}},
              "corpora": {"tiny": {"source": "local", "path": str(tiny_corpus)}},
              "calibration": {"corpus": "tiny", "nsamples": 4, "seqlen": 32, "seed": 0, "batch_size": 2},
              "recipes": SNAKEMAKE_RECIPE, "reference": [], "claims": [],
              "eval": {"ppl": {"datasets": ["tiny"], "seqlen": 32, "max_windows": 4, "batch_size": 4, "dtype": "float32"}}}
    (root / "run" / "config").mkdir(parents=True)
    (root / "run" / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_snakemake_stopped_by_a_signal_resumes_with_the_same_command(tmp_path, tiny_corpus, signum):
    """SIGINT or SIGTERM to the Snakemake process alone (a terminal multiplexer, a batch system)
    while a quantize job has finished two of its six layers: the job stops too, keeping its
    checkpoints; the same command run again restores those layers (its log says so), quantizes the
    rest, and writes the artifact of an uninterrupted run byte for byte, readable by others as the
    umask allows; no checkpoint folder is left."""
    workdir = six_layer_run(tmp_path, tiny_corpus)
    recipe = next(iter(SNAKEMAKE_RECIPE))
    target = f"results/metrics/six/{recipe}/s0/quantize.json"
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2",
               "--directory", str(workdir), target]
    job_log = workdir / f"results/logs/quantize/six/{recipe}/s0.log"
    snakemake = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while not (job_log.is_file() and "layer 1:" in job_log.read_text()):
            assert snakemake.poll() is None and time.monotonic() < deadline, snakemake.stderr.read()[-3000:]
            time.sleep(0.2)
        snakemake.send_signal(signum)
        snakemake.wait(timeout=300)
    finally:
        snakemake.kill()
    stopped = job_log.read_text()
    assert "interrupted by SIGTERM" in stopped and "layer 5:" not in stopped, stopped
    checkpoints = workdir / f"results/checkpoints/six/{recipe}/s0"
    finished = sorted(path.name for path in checkpoints.glob("layer-*"))
    assert finished[:2] == ["layer-0000", "layer-0001"] and len(finished) < 6, finished
    assert not (workdir / f"results/quantized/six/{recipe}/s0").exists()

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = job_log.read_text()
    assert all(f"layer {index}: restored from" in resumed for index in range(len(finished))), resumed
    assert f"layer {len(finished)}: magr+gptq in" in resumed
    assert not (workdir / "results/checkpoints").exists()

    uninterrupted = tmp_path / "uninterrupted"
    assert main(["quantize", "--model", str(workdir / "results/models/six"), "--calibration",
                 str(workdir / "results/calibration/six/tiny-n4-l32-s0.pt"), "--batch-size", "2", "--dtype", "auto",
                 "--recipe", recipe, "--spec", json.dumps(SNAKEMAKE_RECIPE[recipe]), "--device", "cpu", "--threads", "1",
                 "--out", str(uninterrupted), "--metrics", str(tmp_path / "uninterrupted.json")]) == 0
    artifact = workdir / f"results/quantized/six/{recipe}/s0"
    for name in ("quantized.safetensors", "manifest.json"):
        assert (artifact / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    umask = os.umask(0)
    os.umask(umask)
    assert (artifact / "quantized.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_stop_of_snakemake_reaches_its_ptqrepro_jobs_only(tmp_path):
    """``interrupts.stop_ptqrepro_jobs`` sends SIGTERM to the descendants that run the ``ptqrepro``
    command, not to a shell whose script names it nor to anything else."""
    from ptqrepro.runtime.interrupts import stop_ptqrepro_jobs

    command = tmp_path / "ptqrepro"
    command.write_text("#!/bin/sh\nsleep 60\n")
    command.chmod(0o755)
    job = subprocess.Popen([str(command)])
    shell = subprocess.Popen(["sh", "-c", "sleep 60; echo ptqrepro"])
    try:
        time.sleep(0.2)
        assert stop_ptqrepro_jobs() == [job.pid]
        assert job.wait(timeout=10) == -signal.SIGTERM
        assert shell.poll() is None
    finally:
        job.kill()
        shell.kill()
        shell.wait()
