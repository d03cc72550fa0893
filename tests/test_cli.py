"""The command line: every bad input is one line on stderr with exit code 2 (a bad argument) or 1 (a
missing, empty or corrupt input), nothing written."""

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from ptqrepro.cli import main
from ptqrepro.runtime.io import load_yaml


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
    assert (result["protocol"]["tokenizer"], result["protocol"]["tokenizer_class"]) == ("fast", "TokenizersBackend")
    assert result["provenance"]["config_hash"] and result["provenance"]["peak_rss_mb"] > 0
    calibration = torch.load(prepared / "calib.pt")
    assert calibration["input_ids"].shape == (4, 32)
    assert (calibration["tokenizer"], calibration["tokenizer_class"]) == ("fast", "TokenizersBackend")


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
    assert code == 1 and "not a prepared model" in out.err


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
    assert code == (1 if base == "missing" else 2)
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


def quantize_args(prepared, tmp_path, *extra, model=None, calibration=None):
    return ["quantize", "--model", str(model or prepared / "model"), "--calibration", str(calibration or prepared / "calib.pt"),
            "--recipe", "rtn@int4", "--spec", "{steps: [rtn], weight: int4}", "--device", "cpu",
            "--out", str(tmp_path / "q"), "--metrics", str(tmp_path / "q.json"), *extra]


def copy_of_model(tiny_model_dir, tmp_path, change) -> Path:
    """A prepared model whose weights file ``change(path)`` rewrites."""
    import shutil

    folder = tmp_path / "source"
    shutil.copytree(tiny_model_dir, folder)
    change(folder / "model.safetensors")
    assert main(["prepare-model", "--name", "bad", "--spec", json.dumps({"hub": str(folder)}), "--out", str(tmp_path / "model")]) == 0
    return tmp_path / "model"


def nan_weight(path, name="model.layers.1.mlp.down_proj.weight"):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors[name].view(-1)[5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (lambda path: path.write_bytes(b""), "cannot load the model in "),
    (lambda path: path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header"), "cannot load the model in "),
    (nan_weight, "parameter model.layers.1.mlp.down_proj.weight has NaN or infinite entries"),
], ids=["empty safetensors", "corrupt safetensors", "NaN weight"])
def test_a_broken_model_is_one_line(prepared, tiny_model_dir, tmp_path, capsys, change, message):
    model = copy_of_model(tiny_model_dir, tmp_path, change)
    capsys.readouterr()
    code, out = run(capsys, *quantize_args(prepared, tmp_path, model=model))
    assert code == 1 and message in out.err and out.err.count("\n") == 1, out.err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.json").exists()


def test_an_evaluation_refuses_nan_weights(prepared, tiny_model_dir, tmp_path, capsys):
    """A NaN where the quantized model keeps the base model's weights no longer evaluates to "ppl":
    NaN with exit code 0."""
    assert main(quantize_args(prepared, tmp_path)) == 0
    model = copy_of_model(tiny_model_dir, tmp_path, lambda path: nan_weight(path, "model.norm.weight"))
    capsys.readouterr()
    code, out = run(capsys, "eval-ppl", "--model", str(model), "--quantized", str(tmp_path / "q"), "--corpus", str(prepared / "corpus"),
                    "--seqlen", "32", "--max-windows", "2", "--device", "cpu", "--out", str(tmp_path / "ppl.json"))
    assert code == 1 and "parameter model.norm.weight has NaN or infinite entries" in out.err, out.err
    assert out.err.count("\n") == 1 and not (tmp_path / "ppl.json").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "cannot read it (EOFError"),
    (b"not a torch file", "cannot read it ("),
    ("list", "not a file of `ptqrepro calibrate`"),
    ("floats", "not a file of `ptqrepro calibrate`"),
], ids=["empty", "garbage", "a list", "float windows"])
def test_a_bad_calibration_file_is_one_line(prepared, tmp_path, capsys, content, message):
    calibration = tmp_path / "calib.pt"
    if content == "list":
        torch.save([1, 2, 3], calibration)
    elif content == "floats":
        torch.save({"input_ids": torch.rand(4, 32), "corpus": "tiny", "seed": 0}, calibration)
    else:
        calibration.write_bytes(content)
    code, out = run(capsys, *quantize_args(prepared, tmp_path, calibration=calibration))
    assert code == 1 and f"--calibration {calibration}: {message}" in out.err and out.err.count("\n") == 1, out.err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("damage", ["manifest not JSON", "manifest without linears", "tensors empty"])
def test_a_broken_artifact_is_one_line(prepared, tmp_path, capsys, damage):
    assert main(quantize_args(prepared, tmp_path)) == 0
    manifest = tmp_path / "q" / "manifest.json"
    if damage == "manifest not JSON":
        manifest.write_text("{")
    elif damage == "manifest without linears":
        manifest.write_text(json.dumps({key: value for key, value in json.loads(manifest.read_text()).items() if key != "linears"}))
    else:
        (tmp_path / "q" / "quantized.safetensors").write_bytes(b"")
    capsys.readouterr()
    code, out = run(capsys, "eval-ppl", "--model", str(prepared / "model"), "--quantized", str(tmp_path / "q"),
                    "--corpus", str(prepared / "corpus"), "--seqlen", "32", "--device", "cpu", "--out", str(tmp_path / "ppl.json"))
    assert code == 1 and f"{tmp_path / 'q'} is a broken quantized-model artifact: " in out.err and out.err.count("\n") == 1, out.err
    assert not (tmp_path / "ppl.json").exists()


@pytest.mark.parametrize("argv", [
    ["quantize", "--batch-size", "0"], ["eval-ppl", "--batch-size", "-2"], ["eval-ppl", "--max-windows", "0"],
    ["calibrate", "--nsamples", "x"], ["eval-zeroshot", "--limit", "0"], ["zeroshot-tasks", "--items", "0"],
])
def test_a_count_below_one_is_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--out", "nowhere"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert f"ptqrepro {argv[0]}: error: argument {argv[1]}: must be a positive integer, got {argv[2]!r}" in err


def test_an_unwritable_out_is_found_before_the_work(prepared, tmp_path, capsys):
    """--out under a path that is a file: refused before the model is loaded, not after quantizing."""
    (tmp_path / "file").write_text("")
    args = quantize_args(prepared, tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "file" / "q")
    code, out = run(capsys, *args)
    assert code == 2 and out.err.count("\n") == 1
    assert f"--out {tmp_path / 'file' / 'q'}: cannot write there ({tmp_path / 'file'} is not a folder this process may write)" in out.err
    assert out.out == "" and not (tmp_path / "q.json").exists()  # no layer was quantized
    code, out = run(capsys, "eval-ppl", "--model", str(prepared / "model"), "--quantized", str(tmp_path), "--corpus",
                    str(prepared / "corpus"), "--out", str(tmp_path / "file" / "ppl.json"))
    assert code == 2 and "--out" in out.err and "cannot write there" in out.err


def test_a_malformed_corpus_line_is_one_line(prepared, tmp_path, capsys):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(prepared / "corpus", corpus)
    (corpus / "train.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    code, out = run(capsys, "calibrate", "--model", str(prepared / "model"), "--corpus", str(corpus), "--nsamples", "2",
                    "--seqlen", "8", "--out", str(tmp_path / "c.pt"))
    assert code == 1 and f"{corpus / 'train.jsonl'}:2: not a JSON line" in out.err and out.err.count("\n") == 1


def test_a_recipe_without_calibration_data_needs_no_calibration_file(prepared, tmp_path, capsys):
    """RTN reads no calibration windows: without --calibration it gives the very artifact it gives
    with one, and its result records no calibration (so the calibration settings change nothing)."""
    args = quantize_args(prepared, tmp_path)
    assert main(args) == 0
    without = args[: args.index("--calibration")] + args[args.index("--calibration") + 2:]
    without[without.index("--out") + 1] = str(tmp_path / "q2")
    without[without.index("--metrics") + 1] = str(tmp_path / "q2.json")
    assert main(without) == 0
    assert (tmp_path / "q" / "quantized.safetensors").read_bytes() == (tmp_path / "q2" / "quantized.safetensors").read_bytes()
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("q.json", "q2.json"))
    assert first["settings"] == second["settings"] == {"model": "model", "recipe": {"steps": ["rtn"], "weight": "int4"}}
    assert first["dataset"] == second["dataset"] == "none" and first["calibration_seed"] is None
    assert first["provenance"]["config_hash"] == second["provenance"]["config_hash"]


def test_version_prints_the_package_version_that_pyproject_reads(capsys):
    import tomllib

    import ptqrepro

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"ptqrepro {ptqrepro.__version__}\n"
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ptqrepro.__version__"}


def _subcommands() -> dict:
    from ptqrepro.cli import build_parser

    parser = build_parser()
    return parser, next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices


def test_every_subcommand_has_an_example_it_parses_and_every_option_help():
    """Each subcommand's help ends with an example, ``ptqrepro <subcommand> ...``, that its parser
    takes (the recipes and claims in it too); every option has help text, and the help shows
    each option's default where it has one."""
    from ptqrepro.cli import _HelpFormatter, _spec
    from ptqrepro.recipe.recipes import reconstruction_from_config, recipe_from_config
    from ptqrepro.report.claims import claims_from_config

    parser, commands = _subcommands()
    assert len(commands) == 20
    for name, command in commands.items():
        assert command.formatter_class is _HelpFormatter and command.description, name
        example = command.epilog.partition("example:\n")[2].strip()
        assert example.startswith(f"ptqrepro {name} "), name
        args = parser.parse_args(shlex.split(example.replace("\\\n", " "))[1:])
        assert args.command == name
        if name == "quantize":
            recipe_from_config(args.recipe, _spec(args.spec))
        if name == "dwr":
            reconstruction_from_config(args.recipe, _spec(args.spec))
        if name == "claims":
            assert len(claims_from_config(load_yaml(args.claims, "--claims"))) == 1
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.dest}: no help"
            default = action.default
            if default is not None and default is not False and default != []:
                assert "default" in formatter._get_help_string(action), f"{name} {action.dest}: default not shown"
        assert "(default: None)" not in command.format_help(), name


def test_the_module_docstring_lists_every_subcommand():
    import ptqrepro.cli

    listed = re.findall(r"^    ptqrepro ([a-z-]+) ", ptqrepro.cli.__doc__, flags=re.M)
    assert listed == list(_subcommands()[1])
