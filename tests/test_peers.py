"""Peer toolkits: llm-compressor and Brevitas run our recipes on the same data and land on the same
grids; the translations refuse what they cannot express; the grid agreement and the peers table
measure what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ptqrepro.export.artifact import Artifact, load_artifact
from ptqrepro.cli import main
from ptqrepro.checks.config import check_config, recipe_job_spec, recipe_seeds
from ptqrepro.errors import PtqError
from ptqrepro.formats import QuantizedWeight, parse_format
from ptqrepro.models.sources import load_model
from ptqrepro.peers import TOOLKITS, Toolkit, toolkit
from ptqrepro.peers import brevitas
from ptqrepro.peers.llmcompressor import plan
from ptqrepro.peers.recipes import peer_from_spec, peer_spec
from ptqrepro.recipe.recipes import recipe_from_config
from ptqrepro.report.peers import grid_agreement, peers_table
from ptqrepro.report.result_format import undeclared_keys
from ptqrepro.report.tables import gather_results
from ptqrepro.report.uncertainty import BootstrapSettings
from ptqrepro.layerwise.statistics import output_error
from conftest import prepare_tiny_run
from test_dag import SNAKEMAKE, snakemake, tiny_config, write_config

LLMC = TOOLKITS["llm-compressor"]
BREVITAS = TOOLKITS["brevitas"]


def needs(kit: Toolkit):
    """Skip without the toolkit, unless CI requires the peers (PTQ_REQUIRE_PEERS): then its absence fails."""
    return pytest.mark.skipif(kit.missing() is not None and not os.environ.get("PTQ_REQUIRE_PEERS"),
                              reason=f"peer tests need {kit.name}: {kit.missing()}")


needs_llmcompressor = needs(LLMC)
needs_brevitas = needs(BREVITAS)


# --- translation ------------------------------------------------------------------------------

def test_gptq_translates_with_its_settings_and_names_the_group_difference():
    recipe = recipe_from_config("r", {"steps": [{"gptq": {"blocksize": 64, "percdamp": 0.05}}], "weight": "int4-g32-sym"})
    steps = plan(recipe)
    (name, arguments), = steps.steps
    assert name == "GPTQModifier"
    assert (arguments["block_size"], arguments["dampening_frac"], arguments["actorder"]) == (64, 0.05, None)
    weights = arguments["config_groups"]["group_0"]["weights"]
    assert weights == {"num_bits": 4, "type": "int", "symmetric": True, "observer": "minmax", "strategy": "group",
                       "group_size": 32}
    assert arguments["ignore"] == ["lm_head"]
    assert any("group parameters" in difference and "groups reference" in difference for difference in steps.differences)
    static = plan(recipe_from_config("r", {"steps": [{"gptq": {"act_order": True}}], "weight": "int4-g32"}))
    assert static.steps[0][1]["actorder"] == "static" and static.differences == []


def test_transforms_come_before_the_quantizer_and_activations_are_per_token():
    recipe = recipe_from_config("r", {"steps": [{"smoothquant": {"alpha": 0.7}}, "rtn"], "weight": "int8", "act": "int8"})
    steps = plan(recipe)
    assert [name for name, _ in steps.steps] == ["SmoothQuantModifier", "QuantizationModifier"]
    assert steps.steps[0][1] == {"smoothing_strength": 0.7}
    scheme = steps.steps[1][1]["config_groups"]["group_0"]
    assert scheme["weights"]["strategy"] == "channel" and "group_size" not in scheme["weights"]
    assert scheme["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                           "dynamic": True}
    awq = plan(recipe_from_config("r", {"steps": ["awq", "rtn"], "weight": "int4-g32"}))
    assert awq.steps[0] == ("AWQModifier", {"n_grid": 20, "duo_scaling": False})
    assert [difference.split(":")[0] for difference in awq.differences] == ["AWQ"]
    assert "clip" in awq.differences[0]
    linears = plan(recipe_from_config("r", {"steps": [{"awq": {"loss": "linears", "clip": False}}, "rtn"], "weight": "int4-g32"}))
    assert len(linears.differences) == 1 and "loss linears" in linears.differences[0]


@pytest.mark.parametrize("spec, message", [
    ({"steps": ["magr", "gptq"], "weight": "int3"}, "step 'magr' has no llm-compressor equivalent"),
    ({"steps": ["rtn"], "weight": "mxint4"}, "weight format mxint4"),
    ({"steps": ["gptq"], "weight": "int3-beta0.9"}, "shrunk grid"),
    ({"steps": ["rtn"], "weight": "int8", "act": "mxint8"}, "activation format mxint8"),
    ({"steps": [{"gptq": {"true_sequential": True}}], "weight": "int4"}, "true-sequential"),
])
def test_what_llm_compressor_cannot_express_is_refused(spec, message):
    with pytest.raises(PtqError, match=message):
        plan(recipe_from_config("r", spec))


def test_brevitas_runs_gptq_on_its_quantizers_with_their_settings():
    recipe = recipe_from_config("r", {"steps": [{"gptq": {"act_order": True}}], "weight": "int4-g32"})
    steps = brevitas.plan(recipe)
    assert [name for name, _ in steps.steps] == ["quantize", "gptq"]
    quantizers, gptq = steps.steps[0][1], steps.steps[1][1]
    assert gptq == {"act_order": True}
    assert {key: quantizers[key] for key in ("weight_bit_width", "weight_quant_type", "weight_quant_granularity",
                                              "weight_group_size", "quantize_weight_zero_point")} == {
        "weight_bit_width": 4, "weight_quant_type": "asym", "weight_quant_granularity": "per_group",
        "weight_group_size": 32, "quantize_weight_zero_point": True}
    assert "weight_kwargs" not in quantizers
    assert [difference.split(",")[0] for difference in steps.differences] == ["GPTQ: true-sequential"]
    exact = brevitas.plan(recipe_from_config("r", {"steps": [{"gptq": {"true_sequential": True, "groups": "static"}}],
                                                   "weight": "int4-g32"}))
    assert exact.differences == []


def test_brevitas_runs_magr_first_on_a_shrunk_grid_and_names_its_penalty():
    recipe = recipe_from_config("r", {"steps": [{"magr": {"iterations": 20}}, "gptq"], "weight": "int3-beta0.9"})
    steps = brevitas.plan(recipe)
    assert steps.steps[0] == ("magr", {"alpha": 1e-3, "num_steps": 20})
    quantizers = steps.steps[1][1]
    assert quantizers["weight_quant_granularity"] == "per_channel"
    assert quantizers["weight_kwargs"] == {"scaling_affine_rescaling_init": 0.9}
    assert sum(difference.startswith("MagR") for difference in steps.differences) == 2
    symmetric = brevitas.plan(recipe_from_config("r", {"steps": ["rtn"], "weight": "int4-sym"}))
    assert symmetric.steps[0][1]["weight_quant_type"] == "sym" and "symmetric grid" in symmetric.differences[0]


@pytest.mark.parametrize("spec, message", [
    ({"steps": ["awq", "rtn"], "weight": "int4"}, "step 'awq' has no Brevitas equivalent"),
    ({"steps": ["rtn"], "weight": "mxint4"}, "weight format mxint4"),
    ({"steps": ["rtn"], "weight": "int8", "act": "int8"}, "activation quantization"),
    ({"steps": [{"gptq": {"percdamp": 0.05}}], "weight": "int4"}, "damps by 0.01"),
    ({"steps": ["magr", "gptq"], "weight": "int3-g64"}, "per-group MagR"),
])
def test_what_brevitas_cannot_express_is_refused(spec, message):
    with pytest.raises(PtqError, match=message):
        brevitas.plan(recipe_from_config("r", spec))


# --- peer recipes in a config -----------------------------------------------------------------

def _config_with_peer(tmp_path, peer: dict, mirrored: dict | None = None) -> dict:
    config = tiny_config(tmp_path / "model", tmp_path / "corpus")
    config["recipes"]["gptq@int4-g32"] = mirrored or {"steps": ["gptq"], "weight": "int4-g32", "seeds": [0, 1]}
    config["recipes"]["llmc-gptq@int4-g32"] = peer
    return config


def test_a_peer_recipe_runs_the_mirrored_recipe_at_its_seeds(tmp_path):
    config = _config_with_peer(tmp_path, {"toolkit": "llm-compressor", "mirrors": "gptq@int4-g32"})
    check_config(config)
    spec = recipe_job_spec(config, "llmc-gptq@int4-g32")
    assert spec == {"toolkit": "llm-compressor", "mirrors": "gptq@int4-g32", "steps": ["gptq"], "weight": "int4-g32"}
    assert recipe_seeds(config, "llmc-gptq@int4-g32") == [0, 1]
    assert peer_from_spec("llmc-gptq@int4-g32", spec).mirrors.name == "gptq@int4-g32"


@pytest.mark.parametrize("peer, mirrored, message", [
    ({"toolkit": "llm-compressor", "mirrors": "nope"}, None, "'mirrors' must name another recipe"),
    ({"toolkit": "llm-compressor"}, None, "'mirrors' must name another recipe"),
    ({"toolkit": "optimum", "mirrors": "gptq@int4-g32"}, None, "toolkit"),
    ({"toolkit": "llm-compressor", "mirrors": "gptq@int4-g32", "steps": ["rtn"]}, None, "only toolkit and mirrors"),
    ({"toolkit": "llm-compressor", "mirrors": "gptq@int4-g32"}, {"steps": ["magr", "gptq"], "weight": "int3"},
     "peer recipe 'llmc-gptq@int4-g32': llm-compressor: .*step 'magr' has no llm-compressor equivalent"),
    ({"toolkit": "llm-compressor", "mirrors": "gptq@int4-g32"}, {"steps": []}, "not a quantization recipe"),
])
def test_a_bad_peer_recipe_is_a_config_error(tmp_path, peer, mirrored, message):
    with pytest.raises(PtqError, match=message):
        check_config(_config_with_peer(tmp_path, peer, mirrored))


def test_a_peer_cannot_mirror_a_peer():
    recipes = {"a": {"steps": ["rtn"], "weight": "int4"}, "b": {"toolkit": "llm-compressor", "mirrors": "a"}}
    with pytest.raises(PtqError, match="not a quantization recipe of ours"):
        peer_spec("c", {"toolkit": "llm-compressor", "mirrors": "b"}, recipes)


def test_a_toolkit_that_is_not_installed_says_how_to_install_it():
    absent = Toolkit("absent", "absent-dist", "ptqrepro_no_such_package", "ptqrepro.peers.llmcompressor")
    assert absent.missing() == 'absent is not installed (pip install -e ".[peers]")'
    assert absent.version() is None
    with pytest.raises(PtqError, match="unknown peer toolkit"):
        toolkit("absent")


# --- grid agreement ---------------------------------------------------------------------------

def _artifact(weight: torch.Tensor, fmt_name: str = "int4-g8") -> Artifact:
    fmt = parse_format(fmt_name)
    groups = weight.view(weight.shape[0] * weight.shape[1] // 8, 8)
    params = fmt.fit(groups)
    codes = fmt.encode(groups, params).to(fmt.code_dtype).view_as(weight)
    quantized = QuantizedWeight(codes, {key: value.view(weight.shape[0], -1) for key, value in params.items()}, fmt)
    return Artifact({"layer.linear": quantized}, {}, {}, {"recipe": "r"})


def test_grid_agreement_counts_codes_and_parameters():
    torch.manual_seed(0)
    ours = _artifact(torch.randn(4, 16))
    same = grid_agreement(ours, _artifact(ours.quantized["layer.linear"].dequantize()))
    assert same["weights"] == 64 and same["same_code"] == 1.0 and same["same_grid_point"] == 1.0
    assert same["weight_rel_diff"] < 1e-6
    moved = _artifact(ours.quantized["layer.linear"].dequantize())
    codes = moved.quantized["layer.linear"].codes
    codes[0, 0] = (int(codes[0, 0]) + 1) % 16
    one_code = grid_agreement(ours, moved)
    assert one_code["same_code"] == one_code["same_grid_point"] == 63 / 64
    assert one_code["weight_rel_diff"] > 0
    moved.quantized["layer.linear"].params["scale"][1, 0] *= 1.01  # row 1's first group: 8 weights
    scaled = grid_agreement(ours, moved)
    assert scaled["same_code"] == 63 / 64 and scaled["same_grid_point"] == 55 / 64


def test_grid_agreement_by_decoder_layer_in_their_order():
    torch.manual_seed(0)
    weights = {f"model.layers.{index}.{linear}": torch.randn(4, 16) for index in (0, 2, 10) for linear in ("q", "o")}
    artifacts = [_artifact(weights[name]) for name in weights]
    ours = Artifact({name: a.quantized["layer.linear"] for name, a in zip(weights, artifacts)}, {}, {}, {})
    peer = Artifact({name: _artifact(a.quantized["layer.linear"].dequantize()).quantized["layer.linear"]
                     for name, a in zip(weights, artifacts)}, {}, {}, {})
    peer.quantized["model.layers.10.o"].codes[:, :8] += 1  # half of layer 10's "o": a quarter of the layer
    agreement = grid_agreement(ours, peer)
    assert agreement["same_grid_point_by_layer"] == [1.0, 1.0, 0.75]


# --- llm-compressor against ours on a tiny random LLaMA ----------------------------------------

@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_corpus, tmp_path_factory):
    return prepare_tiny_run(tmp_path_factory.mktemp("peers"), tiny_model_dir, tiny_corpus, nsamples=8, seqlen=64)


def _quantize(prepared, recipe: str, spec: dict):
    out = prepared / "quantized" / recipe
    assert main(["quantize", "--model", str(prepared / "model"), "--calibration", str(prepared / "calib.pt"),
                 "--recipe", recipe, "--spec", json.dumps(spec), "--device", "cpu", "--batch-size", "4",
                 "--dtype", "float32", "--out", str(out), "--metrics", str(prepared / "metrics" / recipe / "quantize.json")]) == 0
    return out


def _float_grams(prepared) -> dict[str, torch.Tensor]:
    """XᵀX of every linear's inputs in the float model on the calibration windows."""
    model, _ = load_model(prepared / "model", dtype="float32")
    grams, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            def record(_module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x
            hooks.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(torch.load(prepared / "calib.pt")["input_ids"])
    return {name: gram.float() for name, gram in grams.items()}


def _same_grid_as_ours(prepared, kit: Toolkit, prefix: str, gptq: dict, weight: str = "int4-g32"):
    """Our recipe and the peer with the same settings: at least 95 % of the weights on the same grid
    point and every linear's layer error ||X(W - Ŵ)ᵀ||² within 1 %; the peer's result names its
    version and no difference."""
    mirrored = {"steps": [{"gptq": gptq}], "weight": weight}
    name = "gptq-" + "-".join(f"{key}-{value}" for key, value in gptq.items())
    ours = load_artifact(_quantize(prepared, name, mirrored))
    peer = load_artifact(_quantize(prepared, f"{prefix}-{name}", {"toolkit": kit.name, "mirrors": name, **mirrored}))
    assert peer.manifest["toolkit"] == kit.name and peer.manifest["mirrors"] == name
    assert grid_agreement(ours, peer)["same_grid_point"] >= 0.95
    model, _ = load_model(prepared / "model", dtype="float32")
    for linear, gram in _float_grams(prepared).items():
        weight = model.get_submodule(linear).weight.detach()
        error_ours = float(output_error(weight - ours.quantized[linear].dequantize(), gram))
        error_peer = float(output_error(weight - peer.quantized[linear].dequantize(), gram))
        assert error_peer == pytest.approx(error_ours, rel=0.01), linear
    result = json.loads((prepared / "metrics" / f"{prefix}-{name}" / "quantize.json").read_text())
    assert result["toolkit_version"] == kit.version() and result["differences"] == []
    assert undeclared_keys(result) == []  # a peer's quantize result keeps to report.result_format


@needs_llmcompressor
@pytest.mark.slow
@pytest.mark.parametrize("gptq", [{"groups": "static"}, {"act_order": True}])
def test_llm_compressor_gptq_lands_on_our_grid_points(prepared, gptq):
    """Static group parameters, as llm-compressor fits them."""
    _same_grid_as_ours(prepared, LLMC, "llmc", gptq)


@needs_brevitas
@pytest.mark.slow
@pytest.mark.parametrize("gptq, weight", [({"groups": "static", "true_sequential": True}, "int4-g32"),
                                          ({"act_order": True, "true_sequential": True}, "int3-beta0.9")])
def test_brevitas_gptq_lands_on_our_grid_points(prepared, gptq, weight):
    """True-sequential with static group parameters, as Brevitas quantizes; MagR's shrunk grid."""
    _same_grid_as_ours(prepared, BREVITAS, "brv", gptq, weight)


@needs_brevitas
@pytest.mark.slow
def test_brevitas_magr_lowers_the_largest_weights_that_gptq_then_quantizes(prepared):
    """MagR before GPTQ: a grid of smaller steps than the same GPTQ without it (MagR shrank each
    row's largest magnitudes), and the differences it names in the result."""
    plain = {"steps": [{"gptq": {"true_sequential": True}}], "weight": "int3"}
    with_magr = {"steps": [{"magr": {"iterations": 30}}, {"gptq": {"true_sequential": True}}], "weight": "int3"}
    without = load_artifact(_quantize(prepared, "brv-gptq", {"toolkit": "brevitas", "mirrors": "gptq", **plain}))
    magr = load_artifact(_quantize(prepared, "brv-magr", {"toolkit": "brevitas", "mirrors": "magr", **with_magr}))
    for linear, quantized in magr.quantized.items():
        assert bool((quantized.params["scale"] <= without.quantized[linear].params["scale"] * (1 + 1e-6)).all()), linear
    smaller = [float((quantized.params["scale"] < without.quantized[linear].params["scale"]).float().mean())
               for linear, quantized in magr.quantized.items()]
    assert min(smaller) > 0.5
    result = json.loads((prepared / "metrics" / "brv-magr" / "quantize.json").read_text())
    assert [difference.split(":")[0] for difference in result["differences"]] == ["MagR", "MagR"]


@needs_llmcompressor
@pytest.mark.slow
def test_a_peer_artifact_is_evaluated_like_ours_and_keeps_its_smoothed_norms(prepared):
    mirrored = {"steps": [{"smoothquant": {"alpha": 0.5}}, "rtn"], "weight": "int8", "act": "int8"}
    out = _quantize(prepared, "llmc-sq", {"toolkit": "llm-compressor", "mirrors": "sq", **mirrored})
    artifact = load_artifact(out)
    assert artifact.manifest["act_format"] == "int8"
    assert artifact.float_parameters and all("layernorm" in name for name in artifact.float_parameters)
    result = prepared / "ppl.json"
    assert main(["eval-ppl", "--model", str(prepared / "model"), "--quantized", str(out), "--corpus",
                 str(prepared / "corpus"), "--seqlen", "64", "--max-windows", "4", "--device", "cpu", "--out", str(result)]) == 0
    evaluated = json.loads(result.read_text())
    assert evaluated["recipe"] == "llmc-sq" and np.isfinite(evaluated["metrics"]["ppl"])


# --- the peers table --------------------------------------------------------------------------

def _result(recipe: str, kind: str, seed, value: float, window_nll=None, **extra) -> dict:
    result = {"model": "m", "recipe": recipe, "method": "gptq", "weight_format": "int4-g64", "weight_scheme": "int-g64",
              "weight_bits": 4, "bits_per_weight": 4.5, "act_format": None, "kind": kind,
              "dataset": "wiki" if kind == "perplexity" else "calib", "calibration_seed": seed,
              "metrics": {"ppl": value} if kind == "perplexity" else {"quantize_time_s": value},
              "provenance": {"config_hash": "h", "git_commit": "c", "device": "cpu", "wall_time_s": value,
                             "peak_rss_mb": 1000.0 + value, "packages": {"ptqrepro": "0.1.0"}}, **extra}
    if window_nll is not None:
        result |= {"window_nll": window_nll, "protocol": {"windows_sha256": "w"}}
    return result


def test_the_peers_table_pairs_each_peer_with_the_recipe_it_mirrors(tmp_path):
    rng = np.random.default_rng(0)
    ours_nll = rng.normal(3.0, 0.3, size=12)
    documents = []
    for seed in (0, 1):
        documents += [
            _result("gptq@int4-g64", "quantize", seed, 40.0, calibration_dtype="bfloat16"),
            _result("llmc-gptq@int4-g64", "quantize", seed, 200.0, toolkit="llm-compressor", toolkit_version="0.14.0.1",
                    mirrors="gptq@int4-g64", differences=["GPTQ: groups"], calibration_dtype="float32"),
            _result("gptq@int4-g64", "perplexity", seed, float(np.exp(ours_nll.mean())), list(ours_nll)),
            _result("llmc-gptq@int4-g64", "perplexity", seed, float(np.exp(ours_nll.mean() + 0.1)), list(ours_nll + 0.1)),
        ]
    paths = []
    for index, document in enumerate(documents):
        paths.append(tmp_path / f"{index}.json")
        paths[-1].write_text(json.dumps(document))
    quantize_results = [d for d in documents if d["kind"] == "quantize"]
    agreements = [{"model": "m", "recipe": "llmc-gptq@int4-g64", "seed": seed, "same_grid_point": share, "same_code": 1.0,
                   "weight_rel_diff": 0.01, "same_grid_point_by_layer": [1.0, share, share - 0.1]}
                  for seed, share in ((0, 0.9), (1, 0.8))]
    table = peers_table(gather_results(paths), quantize_results, agreements, BootstrapSettings())
    assert list(table["implementation"]) == ["ptqrepro 0.1.0", "llm-compressor 0.14.0.1"]
    ours, peer = table.iloc[0], table.iloc[1]
    assert pd.isna(ours["change"]) and ours["quantize_time_s"] == 40.0 and ours["peak_rss_mb"] == 1040.0
    assert peer["change"] == pytest.approx(np.expm1(0.1)) and peer["change_low"] == pytest.approx(peer["change_high"])
    assert peer["same_grid_point"] == pytest.approx(0.85)
    assert peer["same_grid_point_first_layer"] == 1.0 and peer["same_grid_point_last_layer"] == pytest.approx(0.75)
    assert peer["differences"] == "calibration forward passes in float32 (ours: bfloat16); GPTQ: groups"
    assert peer["seeds"] == "0 1"


def test_the_peers_table_needs_every_measurement(tmp_path):
    quantize_results = [_result("a", "quantize", 0, 1.0),
                        _result("llmc", "quantize", 0, 1.0, toolkit="llm-compressor", mirrors="a")]
    path = tmp_path / "ppl.json"
    path.write_text(json.dumps(_result("a", "perplexity", 0, 21.0, [3.0, 3.1])))
    with pytest.raises(PtqError, match="no perplexity of llmc"):
        peers_table(gather_results([path]), quantize_results, [], BootstrapSettings())


# --- the DAG ----------------------------------------------------------------------------------

PEER_RECIPES = {
    "fp16": {"steps": []},
    "gptq@int4-g16": {"steps": [{"gptq": {"act_order": True}}], "weight": "int4-g16"},
    "llmc-gptq@int4-g16": {"toolkit": "llm-compressor", "mirrors": "gptq@int4-g16"},
}


def test_without_the_toolkit_the_peer_recipes_are_skipped_with_a_message(tmp_path, tiny_model_dir, tiny_corpus):
    """llm-compressor hidden from the Snakefile: the default target plans as before, `peers` plans
    nothing and says why."""
    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus, recipes=PEER_RECIPES))
    hide = ("import dataclasses, sys, ptqrepro.peers as peers; "
            "peers.TOOLKITS['llm-compressor'] = dataclasses.replace(peers.TOOLKITS['llm-compressor'], package='ptqrepro_absent'); "
            "from snakemake.cli import main; sys.argv[0] = 'snakemake'; main()")
    for target in ([], ["peers"]):
        run = subprocess.run([sys.executable, "-c", hide, *SNAKEMAKE[3:], "--directory", str(tmp_path), "-n", *target],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert 'peer recipe llmc-gptq@int4-g16 skipped: llm-compressor is not installed (pip install -e ".[peers]")' in run.stderr
        assert "llmc-gptq" not in run.stdout.replace("skipped", "")
    assert "grid_agreement" not in run.stdout and "peers_table" not in run.stdout


@needs_llmcompressor
@pytest.mark.slow
def test_snakemake_peers_runs_the_peer_recipes_into_the_peers_table(tmp_path, tiny_model_dir, tiny_corpus):
    """The peer calibrates in float32, as ours here: the two land on the same grid points."""
    config = tiny_config(tiny_model_dir, tiny_corpus, recipes=PEER_RECIPES)
    config["calibration"]["dtype"] = "float32"
    write_config(tmp_path, config)
    planned = snakemake(tmp_path, "-n")
    assert planned.returncode == 0 and "llmc-gptq" not in planned.stdout  # the default target runs no peer
    run = snakemake(tmp_path, "peers")
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "tables" / "peers.csv")
    assert list(table["recipe"]) == ["gptq@int4-g16", "llmc-gptq@int4-g16"]
    assert table["implementation"].iloc[1] == f"llm-compressor {LLMC.version()}"
    assert table["same_grid_point"].iloc[1] >= 0.95
    assert table["ci_low"].iloc[1] <= table["ppl"].iloc[1] <= table["ci_high"].iloc[1]
    assert "| llmc-gptq@int4-g16 |" in (tmp_path / "results" / "tables" / "peers.md").read_text()


@needs_llmcompressor
def test_a_claim_naming_a_peer_recipe_brings_it_into_the_report(tmp_path, tiny_model_dir, tiny_corpus):
    claims = [{"paper": "peers", "claim": "llm-compressor's GPTQ within 1 % of ours",
               "within": {"recipe": "llmc-gptq@int4-g16", "of": "gptq@int4-g16", "relative": 0.01}}]
    write_config(tmp_path, tiny_config(tiny_model_dir, tiny_corpus, recipes=PEER_RECIPES, claims=claims))
    planned = snakemake(tmp_path, "-n")
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "recipe=llmc-gptq@int4-g16" in planned.stdout and "rule tables" in planned.stdout
