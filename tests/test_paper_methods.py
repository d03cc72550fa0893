"""MagR, coordinate descent, LQER/L2QER and DWR inside the pipeline, the artifact and the search
(the methods' own math is tested in test_magr.py and test_lqer_dwr.py)."""

import copy
import math

import pytest
import torch

from ptqrepro.export.artifact import apply_artifact, load_artifact, save_artifact
from ptqrepro.errors import PtqError
from ptqrepro.layerwise.pipeline import quantize_model
from ptqrepro.layerwise.reconstruction import search_model
from ptqrepro.recipe.recipes import DwrSettings, recipe_from_config, reconstruction_from_config


def calibration(vocab=96, n=6, seqlen=32, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def mean_output_error(result, key="output_rel_error"):
    return sum(r[key] for r in result.records) / len(result.records)


def quantize(model, entry, **kwargs):
    return quantize_model(model, recipe_from_config("r", entry), calibration(), **kwargs)


@pytest.mark.parametrize(
    "steps, message",
    [
        (["gptq", "magr"], "'magr' must come before the quantizer 'gptq'"),
        (["lqer", "rtn"], "'lqer' refines a quantizer's result and must come after 'rtn'"),
        (["rtn", "gptq"], "exactly one quantizer"),
        (["magr"], "exactly one quantizer"),
        ([{"lqer": {"rank": 4, "factor_format": "fp16"}}], "factor_format must be a quantized format"),
        ([{"magr": {"precision": "float16"}}, "rtn"], "precision must be float32, bfloat16 or auto, not 'float16'"),
        ([{"awq": {"precision": "fp8"}}, "rtn"], "step awq: precision must be float32, bfloat16 or auto, not 'fp8'"),
        ([{"awq": {"loss": "mse"}}, "rtn"], "step awq: loss must be one of block, linears, not 'mse'"),
        ([{"gptq": {"groups": "dynamic"}}], "step gptq: groups must be one of reference, sweep, static, not 'dynamic'"),
        ([{"gptq": {"act_order": True, "groups": "reference"}}], "step gptq: act_order takes static group parameters"),
        ([{"gptq": {"static_groups": True}}], "step 'gptq' has no setting.s. static_groups"),
    ],
)
def test_step_order_and_settings_are_checked(steps, message):
    with pytest.raises(PtqError, match=message):
        recipe_from_config("bad", {"steps": steps, "weight": "int4"})


@pytest.mark.parametrize(
    "settings, mode",
    [({}, "reference"), ({"act_order": True}, "static"), ({"groups": "sweep"}, "sweep"),
     ({"act_order": True, "groups": "static"}, "static")],
)
def test_gptq_group_mode_defaults_to_the_references(settings, mode):
    """``groups`` left out: the reference's fitting, and static groups under act-order (the only
    mode it takes)."""
    assert recipe_from_config("r", {"steps": [{"gptq": settings}], "weight": "int4-g16"}).quantizer.group_mode == mode


@pytest.mark.parametrize(
    "entry, message",
    [({"gptq": {"groups": "dynamic"}}, "'dynamic' is not one of \\['reference', 'sweep', 'static', None\\]"),
     ({"awq": {"loss": "mse"}}, "'mse' is not one of \\['block', 'linears'\\]"),
     ({"gptq": {"act_order": "yes"}}, "'yes' is not of type 'boolean'")],
)
def test_schema_types_the_gptq_and_awq_settings(entry, message):
    from pathlib import Path

    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    config = {"models": {"m": {"hub": "x"}}, "calibration": {"corpus": "c"}, "eval": {"ppl": {"datasets": ["c"]}},
              "recipes": {"r": {"steps": [entry], "weight": "int4"}}}
    schema = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
    with pytest.raises(WorkflowError, match=message):
        validate(config, str(schema))
    config["recipes"]["r"]["steps"] = [{"gptq": {"act_order": True, "groups": "static"}}]
    validate(config, str(schema))
    assert config["recipes"]["r"]["steps"] == [{"gptq": {"act_order": True, "groups": "static"}}]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_magr_lowers_the_largest_weights_before_gptq(model, precision):
    result = quantize(model, {"steps": [{"magr": {"iterations": 30, "precision": precision}}, "gptq"], "weight": "int3-beta0.9"})
    for record in result.records:
        assert record["magr_max_abs_after"] < record["magr_max_abs_before"]
        assert record["magr_output_rel_error"] < 0.05
        assert record["magr_iterations"] == 30 and record["magr_alpha"] == 1e-3
        assert record["magr_products"] == precision
        before, after = record["magr_row_max_quantiles_before"], record["magr_row_max_quantiles_after"]
        assert len(before) == len(after) == 11 and before == sorted(before) and after == sorted(after)
        assert before[-1] == pytest.approx(record["magr_max_abs_before"], rel=1e-3)
        assert after[-1] == pytest.approx(record["magr_max_abs_after"], rel=1e-3)


def test_magr_is_per_group_when_the_format_has_groups(model):
    result = quantize(model, {"steps": [{"magr": {"iterations": 10}}, "rtn"], "weight": "int3-g16"})
    assert all(r["magr_alpha"] == 1e-4 for r in result.records)


def test_coordinate_descent_does_not_worsen_gptq(model):
    plain = quantize(copy.deepcopy(model), {"steps": ["gptq"], "weight": "int2"})
    refined = quantize(copy.deepcopy(model), {"steps": ["gptq", {"cd": {"sweeps": 3}}], "weight": "int2"})
    assert mean_output_error(refined) <= mean_output_error(plain) * 1.02
    assert all(r["cd_sweeps"] == 3 for r in refined.records)


def test_lqer_lowers_the_output_error_and_counts_its_bits(model):
    plain = quantize(copy.deepcopy(model), {"steps": ["rtn"], "weight": "mxint4"})
    lqer = quantize(copy.deepcopy(model), {"steps": ["rtn", {"lqer": {"rank": 8}}], "weight": "mxint4"})
    assert mean_output_error(lqer, "weight_rel_error") < 0.8 * mean_output_error(plain, "weight_rel_error")
    assert set(lqer.corrections) == set(lqer.quantized)
    term = next(iter(lqer.corrections.values()))
    assert term.rank == 8 and term.up.fmt.name == "mxint8-b8"  # B's blocks span the rank of 8
    assert lqer.stored_bits() - plain.stored_bits() == sum(extra_of(t) for t in lqer.corrections.values())
    assert lqer.bits_per_weight() > plain.bits_per_weight()


def extra_of(term):
    """Bits of a low-rank term: 8-bit codes plus one 8-bit exponent per block of each factor."""
    down, up = term.down.codes, term.up.codes
    return down.numel() * 8 + down.numel() // term.down.fmt.block * 8 + up.numel() * 8 + up.numel() // term.up.fmt.block * 8


@pytest.mark.parametrize("act", [None, "mxint8"])
def test_lqer_artifact_reproduces_the_layer_formula(model, tmp_path, act):
    """apply_artifact computes Q_a(x) Q(W)^T + Q_a(Q_a(x) A) B; without activation quantization that
    is the merged weight the pipeline propagated."""
    fresh = copy.deepcopy(model)
    entry = {"steps": ["rtn", {"l2qer": {"rank": 8}}], "weight": "mxint4", "act": act}
    result = quantize(model, entry)
    save_artifact(tmp_path / "a", result.quantized, result.float_parameters, {"recipe": "r", "act_format": act},
                  corrections=result.corrections)
    loaded = load_artifact(tmp_path / "a")
    name = next(iter(result.corrections))
    assert torch.equal(loaded.corrections[name].down.codes, result.corrections[name].down.codes)
    apply_artifact(fresh, tmp_path / "a")
    data = calibration(n=2, seed=9)
    with torch.no_grad():
        hooked, merged = fresh(input_ids=data).logits, model(input_ids=data).logits
    if act is None:
        torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-4)
    else:
        assert not torch.allclose(hooked, merged, atol=1e-4)  # the activation quantization is in place
        assert (hooked - merged).abs().mean() < 0.1 * merged.abs().mean()
    with torch.no_grad():  # evaluation in bfloat16 (eval.ppl.dtype auto on bf16 hardware) runs the same formula;
        cast = fresh.to(torch.bfloat16)(input_ids=data).logits.float()  # quantized activations flip some grid points
    assert (cast - hooked).abs().mean() < (0.02 if act is None else 0.1) * hooked.abs().mean()


def dwr_case(model, tmp_path, ranks=(2, 8, 32), windows=None, dtype=torch.float32):
    fresh = copy.deepcopy(model)
    result = quantize(model, {"steps": ["gptq"], "weight": "int2"})
    save_artifact(tmp_path / "base", result.quantized, result.float_parameters, {"recipe": "base", "act_format": None})
    artifact = load_artifact(tmp_path / "base")
    settings = DwrSettings(ranks=ranks, windows=windows)
    return fresh, artifact, search_model(fresh, artifact, calibration(n=4, seed=3), settings, batch_size=2, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dwr_never_increases_calibration_perplexity(model, tmp_path, dtype):
    fresh, artifact, result = dwr_case(model, tmp_path, dtype=dtype)
    assert result.final_ppl <= result.initial_ppl
    for block in result.blocks:
        assert set(block.curve) == {0, 2, 8, 32}
        assert block.curve[block.chosen] <= block.curve[0]
    for name, weight in result.quantized.items():
        block = result.blocks[int(name.split(".")[2])]
        assert torch.equal(weight.params["scale"], artifact.quantized[name].params["scale"])  # the same grid
        if block.chosen == 0:
            assert torch.equal(weight.codes, artifact.quantized[name].codes)
    # with the chosen weights, the model's perplexity in the search's dtype is the final one
    for name, weight in result.quantized.items():
        fresh.get_submodule(name).weight.data = weight.dequantize()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        losses = [fresh(input_ids=b, labels=b).loss.float() for b in calibration(n=4, seed=3).split(2)]
    assert math.exp(float(torch.stack(losses).mean())) == pytest.approx(result.final_ppl, rel=1e-4 if dtype == torch.float32 else 2e-3)


def test_dwr_rejects_a_base_with_folded_scales(model, tmp_path):
    result = quantize(model, {"steps": ["smoothquant", "rtn"], "weight": "int4"})
    save_artifact(tmp_path / "b", result.quantized, result.float_parameters, {"recipe": "sq", "act_format": None})
    artifact = load_artifact(tmp_path / "b")
    with pytest.raises(PtqError, match="folded scales"):
        search_model(model, artifact, calibration(), DwrSettings())


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"base": "missing"}, "base recipe 'missing' is not in the config"),
        ({"base": "r", "dwr": {"space": "afm"}}, "dwr space 'afm'"),
        ({"base": "r", "dwr": {"ranks": [0, 8]}}, "positive integers"),
        ({"base": "r", "dwr": {"rank": 8}}, "no setting"),
        ({"base": "fp16"}, "must be a quantization recipe"),
        ({"base": "r", "steps": ["rtn"]}, "only 'base' and 'dwr'"),
    ],
)
def test_bad_reconstruction_recipes_name_the_problem(entry, message):
    recipes = {"r": {"steps": ["gptq"], "weight": "int3"}, "fp16": {"steps": []}}
    with pytest.raises(PtqError, match=message):
        reconstruction_from_config("bad", entry, recipes)


def test_relative_costs_order_recipes_by_their_work():
    """The scheduling estimate grows with the work a recipe does: data-free < needs statistics <
    GPTQ < AWQ; MagR with its iterations; DWR with its ranks and scoring windows."""
    cost = lambda steps: recipe_from_config("r", {"steps": steps, "weight": "int4"}).relative_cost()
    assert cost(["rtn"]) == 0 < cost(["rtn", {"lqer": {"rank": 8}}]) < cost(["rtn", {"l2qer": {"rank": 8}}])
    assert cost(["rtn"]) < cost(["smoothquant", "rtn"]) < cost(["gptq"]) < cost(["awq", "rtn"]) < cost(["awq", "gptq"])
    assert cost([{"magr": {"iterations": 50}}, "gptq"]) < cost([{"magr": {"iterations": 150}}, "gptq"])
    assert cost([{"awq": {"loss": "linears"}}, "rtn"]) < cost([{"awq": {"loss": "block"}}, "rtn"])
    dwr = lambda **settings: reconstruction_from_config("d", {"base": "b", "dwr": settings}).settings.relative_cost(16)
    assert dwr(ranks=[16, 32], windows=1) < dwr(ranks=[16, 32, 64], windows=1) < dwr(ranks=[16, 32, 64], windows=4)
    assert dwr(ranks=[16], windows=None) == dwr(ranks=[16], windows=64)
