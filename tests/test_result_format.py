"""The result JSONs have one format (``report.result_format``): what the jobs write is declared
there, and what the report reads of them is declared there."""

import json

import pytest

from ptqrepro.cli import main
from ptqrepro.report import peers, plots, tables
from ptqrepro.report.result_format import (
    PERPLEXITY_KIND,
    PERPLEXITY_PROTOCOL_KEYS,
    PROVENANCE_RECORD_KEYS,
    RESULT_KEYS,
    undeclared_keys,
)
from ptqrepro.report.uncertainty import BootstrapSettings
from ptqrepro.export.vllm_check import result_windows

NESTED = {"provenance": PROVENANCE_RECORD_KEYS, "protocol": PERPLEXITY_PROTOCOL_KEYS}
"""The objects inside a result whose keys the format declares (the others are open mappings:
metric names, settings, per-layer records)."""


@pytest.fixture(scope="module")
def written(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """One result of each kind the jobs write, through the command line: a calibrated quantize job,
    a DWR job on it, a perplexity with the KL from a float reference, and an agreement."""
    root = tmp_path_factory.mktemp("results")
    model, corpus, calibration = str(root / "model"), str(root / "corpus"), str(root / "calib.pt")
    window = ["--seqlen", "32", "--max-windows", "4", "--device", "cpu"]
    jobs = [
        ["prepare-model", "--name", "tiny", "--spec", json.dumps({"hub": str(tiny_model_dir)}), "--out", model],
        ["prepare-corpus", "--name", "tiny", "--spec", f"{{source: local, path: {tiny_corpus}}}", "--out", corpus],
        ["calibrate", "--model", model, "--corpus", corpus, "--nsamples", "4", "--seqlen", "32", "--out", calibration],
        ["quantize", "--model", model, "--calibration", calibration, "--recipe", "g", "--spec", "{steps: [gptq], weight: int3}",
         "--device", "cpu", "--out", str(root / "g"), "--metrics", str(root / "quantize.json")],
        ["dwr", "--model", model, "--calibration", calibration, "--base", str(root / "g"), "--recipe", "g+dwr",
         "--spec", "{base: g, dwr: {ranks: [4]}}", "--device", "cpu", "--out", str(root / "d"), "--metrics", str(root / "dwr.json")],
        ["float-reference", "--model", model, "--corpus", corpus, *window, "--top-k", "8", "--out", str(root / "ref.safetensors")],
        ["eval-ppl", "--model", model, "--quantized", str(root / "g"), "--corpus", corpus, *window,
         "--reference", str(root / "ref.safetensors"), "--out", str(root / "ppl.json")],
        ["agreement", "--ours", str(root / "g"), "--peer", str(root / "d"), "--out", str(root / "agreement.json")],
    ]
    for argv in jobs:
        assert main(argv) == 0, argv
    return root, {name: json.loads((root / f"{name}.json").read_text()) for name in ("quantize", "dwr", "ppl", "agreement")}


def test_the_jobs_write_only_declared_keys(written):
    _, results = written
    for name, result in results.items():
        assert undeclared_keys(result) == [], name
    assert "window_kld" in results["ppl"] and "dwr" in results["dwr"] and "layers" in results["quantize"]


def test_an_undeclared_key_is_found():
    """The check can fail: a new key, in the result or in its provenance or protocol, and an unknown kind."""
    result = {"kind": PERPLEXITY_KIND, "model": "m", "provenance": {"config_hash": "h", "gpu_temperature": 40},
              "protocol": {"seqlen": 32, "stride": 16}, "window_entropy": [1.0]}
    assert undeclared_keys(result) == ["window_entropy", "provenance.gpu_temperature", "protocol.stride"]
    assert undeclared_keys({"kind": "latency"}) == ["kind='latency'"]


class _Recording(dict):
    """A result that notes every key a reader asks for (``prefix`` + key) in ``asked``; the declared
    nested objects (``NESTED``) record their keys too."""

    def __init__(self, data: dict, asked: set, prefix: str = "") -> None:
        super().__init__(data)
        self.asked, self.prefix = asked, prefix

    def _value(self, key, value):
        if not self.prefix and key in NESTED and isinstance(value, dict):
            return _Recording(value, self.asked, f"{key}.")
        return value

    def __getitem__(self, key):
        self.asked.add(self.prefix + key)
        return self._value(key, super().__getitem__(key))

    def get(self, key, default=None):
        self.asked.add(self.prefix + key)
        return self._value(key, super().get(key, default))

    def __contains__(self, key):
        self.asked.add(self.prefix + key)
        return super().__contains__(key)


def _undeclared_reads(asked: set, kind: str) -> list[str]:
    """The keys of ``asked`` that a result of ``kind`` does not declare."""
    declared = set(RESULT_KEYS[kind]) | {f"{name}.{key}" for name, keys in NESTED.items() for key in keys}
    return sorted(asked - declared)


def test_the_report_reads_only_declared_keys(written, tiny_model_dir, tmp_path, monkeypatch):
    """``tables`` (all.csv, windows.csv), the peers table, DWR's figure and the vLLM check's windows
    read of each result only the keys the format declares for its kind."""
    root, results = written
    asked = {name: set() for name in results}
    recorded = {name: _Recording(result, asked[name]) for name, result in results.items()}
    by_path = {str(root / f"{name}.json"): recorded[name] for name in ("quantize", "dwr", "ppl")}
    monkeypatch.setattr(tables, "read_json", lambda path: by_path[str(path)])
    gathered = tables.gather_results(list(by_path))
    assert len(gathered.windows) == 4
    peers.peers_table(gathered, [recorded["quantize"], recorded["dwr"]], [recorded["agreement"]],
                      BootstrapSettings(samples=100, seed=0, level=0.95))
    plots.plot_dwr_curves(recorded["dwr"], tmp_path / "dwr")
    assert len(result_windows(recorded["ppl"], root / "corpus", tiny_model_dir)) == 4
    assert asked["ppl"] >= {"window_nll", "window_kld", "protocol.windows_sha256", "provenance.model_revision"}
    assert "same_grid_point" in asked["agreement"]
    for name, result in results.items():
        assert _undeclared_reads(asked[name], result["kind"]) == [], name
