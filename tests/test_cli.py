"""The command line: every bad input is one line on stderr with exit code 2, nothing written."""

import json

import pytest
import torch

from ptqrepro.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    assert main(["prepare-model", "--name", "tiny", "--spec", json.dumps({"hub": str(tiny_model_dir)}), "--out", str(root / "model")]) == 0
    assert main(["prepare-corpus", "--name", "tiny", "--spec", f"{{source: local, path: {tiny_corpus}}}", "--out", str(root / "corpus")]) == 0
    assert main(["calibrate", "--model", str(root / "model"), "--corpus", str(root / "corpus"), "--nsamples", "4",
                 "--seqlen", "32", "--out", str(root / "calib.pt")]) == 0
    return root


def test_by_hand_quantize_then_evaluate(prepared, tmp_path, capsys):
    code, _ = run(capsys, "quantize", "--model", str(prepared / "model"), "--calibration", str(prepared / "calib.pt"),
                  "--recipe", "rtn@int4", "--spec", "{steps: [rtn], weight: int4}", "--device", "cpu",
                  "--out", str(tmp_path / "q"), "--metrics", str(tmp_path / "quantize.json"))
    assert code == 0
    report = json.loads((tmp_path / "quantize.json").read_text())
    assert report["kind"] == "quantize" and report["weight_bits"] == 4 and len(report["layers"]) == 14
    assert 4 < report["bits_per_weight"] < 5
    code, out = run(capsys, "eval-ppl", "--model", str(prepared / "model"), "--quantized", str(tmp_path / "q"),
                    "--corpus", str(prepared / "corpus"), "--seqlen", "32", "--max-windows", "5", "--device", "cpu",
                    "--out", str(tmp_path / "ppl.json"))
    assert code == 0, out.err
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert result["protocol"]["windows"] == 5 and result["metrics"]["ppl"] > 1
    assert result["provenance"]["config_hash"] and result["provenance"]["peak_rss_mb"] > 0
    assert torch.load(prepared / "calib.pt")["input_ids"].shape == (4, 32)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{steps: [magic], weight: int4}", "unknown step 'magic'"),
        ("{steps: [rtn], weight: int4-g7x}", "cannot parse format 'int4-g7x'"),
        ("{steps: [rtn], weight: int4-g48}", "group size 48 does not divide the 64 inputs of layer model.layers.0.self_attn.q_proj"),
        ("[not, a, mapping]", "--spec must be a mapping"),
        ("{steps: [rtn", "cannot parse --spec"),
        ("{steps: [rtn], steps: [gptq]}", "--spec: duplicate key 'steps' (line 1, columns 2 and 16)"),
        ("{steps: [{gptq: {damp: 0.1, damp: 0.01}}], weight: int4}", "--spec: duplicate key 'damp' (line 1, columns 18 and 29)"),
    ],
)
def test_bad_recipe_is_one_line_and_writes_nothing(prepared, tmp_path, capsys, spec, message):
    code, out = run(capsys, "quantize", "--model", str(prepared / "model"), "--calibration", str(prepared / "calib.pt"),
                    "--recipe", "bad", "--spec", spec, "--device", "cpu",
                    "--out", str(tmp_path / "q"), "--metrics", str(tmp_path / "m.json"))
    assert code == 2
    assert message in out.err and out.err.count("\n") == 1
    assert not (tmp_path / "q").exists() and not (tmp_path / "m.json").exists()


def test_too_few_tokens_for_the_windows(prepared, tmp_path, capsys):
    code, out = run(capsys, "calibrate", "--model", str(prepared / "model"), "--corpus", str(prepared / "corpus"),
                    "--nsamples", "2", "--seqlen", "1000000", "--out", str(tmp_path / "c.pt"))
    assert code == 2 and "fewer than one window of seqlen 1000000" in out.err
    assert not (tmp_path / "c.pt").exists()


def test_unknown_corpus_and_missing_inputs(prepared, tmp_path, capsys):
    code, out = run(capsys, "prepare-corpus", "--name", "wikitext-3", "--out", str(tmp_path / "c"))
    assert code == 2 and "wikitext-3" in out.err
    code, out = run(capsys, "eval-ppl", "--model", str(tmp_path), "--quantized", str(tmp_path), "--corpus",
                    str(prepared / "corpus"), "--out", str(tmp_path / "p.json"))
    assert code == 2 and "not a prepared model" in out.err


@pytest.mark.parametrize(
    "spec, base, message",
    [
        ("{dwr: {ranks: [4]}}", "q", "needs 'base'"),
        ("{base: b, dwr: {space: pca}}", "q", "dwr space 'pca'"),
        ("{base: b}", "missing", "is not a quantized-model artifact"),
    ],
)
def test_bad_dwr_job_is_one_line_and_writes_nothing(prepared, tmp_path, capsys, spec, base, message):
    assert main(["quantize", "--model", str(prepared / "model"), "--calibration", str(prepared / "calib.pt"),
                 "--recipe", "b", "--spec", "{steps: [rtn], weight: int3}", "--device", "cpu",
                 "--out", str(tmp_path / "q"), "--metrics", str(tmp_path / "q.json")]) == 0
    capsys.readouterr()
    code, out = run(capsys, "dwr", "--model", str(prepared / "model"), "--base", str(tmp_path / base),
                    "--calibration", str(prepared / "calib.pt"), "--recipe", "b+dwr", "--spec", spec, "--device", "cpu",
                    "--out", str(tmp_path / "d"), "--metrics", str(tmp_path / "d.json"))
    assert code == 2
    assert message in out.err and out.err.count("\n") == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.json").exists()


@pytest.mark.parametrize("job", ["quantize", "dwr"])
def test_offload_is_checked_and_recorded(prepared, tmp_path, capsys, job):
    """``--offload`` names where the activations are kept: a bad value is one line and writes
    nothing; a good one is recorded in the result's provenance (it changes no result, so no hash)."""
    assert main(["quantize", "--model", str(prepared / "model"), "--calibration", str(prepared / "calib.pt"),
                 "--recipe", "b", "--spec", "{steps: [gptq], weight: int3}", "--device", "cpu",
                 "--out", str(tmp_path / "b"), "--metrics", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    arguments = {"quantize": ["--recipe", "g", "--spec", "{steps: [gptq], weight: int3}"],
                 "dwr": ["--base", str(tmp_path / "b"), "--recipe", "b+dwr", "--spec", "{base: b, dwr: {ranks: [4]}}"]}[job]

    def submit(offload: str, out: str):
        return run(capsys, job, "--model", str(prepared / "model"), "--calibration", str(prepared / "calib.pt"),
                   *arguments, "--device", "cpu", "--offload", offload,
                   "--out", str(tmp_path / out), "--metrics", str(tmp_path / f"{out}.json"))

    code, out = submit("gpu", "bad")
    assert code == 2 and "unknown offload 'gpu': expected device or cpu" in out.err and out.err.count("\n") == 1
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.json").exists()
    reports = {}
    for offload in ("device", "cpu"):
        assert submit(offload, offload)[0] == 0
        reports[offload] = json.loads((tmp_path / f"{offload}.json").read_text())
    assert reports["cpu"]["provenance"]["offload"] == "cpu" and reports["device"]["provenance"]["offload"] == "device"
    assert reports["cpu"]["provenance"]["config_hash"] == reports["device"]["provenance"]["config_hash"]
    assert (tmp_path / "cpu" / "quantized.safetensors").read_bytes() == (tmp_path / "device" / "quantized.safetensors").read_bytes()


def test_a_key_given_twice_in_the_claims_is_one_line(tmp_path, capsys):
    code, out = run(capsys, "claims", "--table", str(tmp_path / "all.csv"), "--windows", str(tmp_path / "windows.csv"),
                    "--claims", "[{paper: a, claim: c, below: [x, y], claim: d}]", "--out", str(tmp_path / "tables"))
    assert code == 2 and out.err.count("\n") == 1
    assert "--claims: duplicate key 'claim' (line 1, columns 13 and 38)" in out.err
    assert not (tmp_path / "tables").exists()
