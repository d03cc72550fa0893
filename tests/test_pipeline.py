from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from ptqrepro.export.artifact import apply_artifact, save_artifact
from ptqrepro.errors import PtqError
from ptqrepro.formats import parse_format
from ptqrepro.methods.rtn import rtn
from ptqrepro.models.adapters import LLAMA, architecture_of
from ptqrepro.layerwise.pipeline import quantize_model
from ptqrepro.layerwise.statistics import add_gram, add_gram_blocks, add_gram_syrk, relative_output_error
from ptqrepro.recipe.recipes import Recipe, recipe_from_config
from ptqrepro.recipe.steps import LayerContext, RtnStep


@dataclass(frozen=True)
class RecordingRtn(RtnStep):
    """RTN that also keeps the Gram matrices the pipeline handed it (test double)."""

    name: ClassVar[str] = "recording-rtn"
    needs_stats: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = True
    sequential: ClassVar[bool] = True
    seen: list = None

    def quantize(self, context: LayerContext, names) -> None:
        self.seen.append({name: context.stats[name].gram.clone() for name in names})
        super().quantize(context, names)


@dataclass(frozen=True)
class FloatRecordingRtn(RecordingRtn):
    """The same, calibrated on the float model's activations (as AWQ, SmoothQuant, L2QER)."""

    sequential: ClassVar[bool] = False


def q_proj_grams(model, data) -> list[torch.Tensor]:
    """X^T X of every decoder layer's q_proj input when ``model`` runs on ``data``."""
    captured = {index: [] for index in range(len(model.model.layers))}
    handles = [
        layer.self_attn.q_proj.register_forward_pre_hook(lambda _m, args, i=index: captured[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for index, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(input_ids=data)
    for handle in handles:
        handle.remove()
    return [torch.cat(xs).T @ torch.cat(xs) for xs in captured.values()]


def calibration(vocab=96, n=5, seqlen=24, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_fp16_recipe_changes_nothing(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantize_model(model, recipe_from_config("fp16", {"steps": []}), calibration())
    assert result.quantized == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rtn_pipeline_equals_rtn_of_each_weight(model):
    fmt = parse_format("int4-g16")
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    result = quantize_model(model, recipe_from_config("r", {"steps": ["rtn"], "weight": "int4-g16"}), calibration())
    assert set(result.quantized) == set(originals)
    for name, weight in originals.items():
        expected = rtn(weight, fmt)
        assert torch.equal(result.quantized[name].codes, expected.codes)
        assert torch.equal(model.get_submodule(name).weight, expected.dequantize())
    assert len(result.records) == len(originals)
    assert all(0 < r["weight_rel_error"] < 0.2 for r in result.records)


def test_pipeline_grams_come_from_the_quantized_previous_layers(model):
    """Layer i's statistics must be taken on the outputs of the already-quantized layers < i."""
    seen = []
    recipe = Recipe(name="rec", steps=(RecordingRtn(seen=seen),), weight=parse_format("int3"))
    data = calibration()
    result = quantize_model(model, recipe, data, batch_size=2)
    assert len(seen) == 2 and "output_rel_error" in result.records[0]
    # In the final model every layer is quantized; q_proj's input in layer i depends only on
    # layers < i and layer i's (unchanged) input norm, so it must reproduce the pipeline's Gram.
    for grams, gram in zip(seen, q_proj_grams(model, data), strict=True):
        assert torch.allclose(grams["self_attn.q_proj"], gram, rtol=1e-4, atol=1e-2)
    # and the two layers saw different data, so propagation happened
    assert not torch.allclose(seen[0]["self_attn.q_proj"], seen[1]["self_attn.q_proj"])


def test_non_sequential_steps_calibrate_on_the_float_model(model):
    """A recipe without a sequential step (AWQ, SmoothQuant, L2QER) sees the float model's
    activations in every layer, not the quantized layers' outputs."""
    import copy

    float_model = copy.deepcopy(model)
    data = calibration()
    seen = []
    quantize_model(model, Recipe(name="rec", steps=(FloatRecordingRtn(seen=seen),), weight=parse_format("int2")),
                   data, batch_size=2)
    float_grams, quantized_grams = q_proj_grams(float_model, data), q_proj_grams(model, data)
    for grams, gram, quantized in zip(seen, float_grams, quantized_grams, strict=True):
        assert torch.allclose(grams["self_attn.q_proj"], gram, rtol=1e-4, atol=1e-2)
    assert not torch.allclose(seen[1]["self_attn.q_proj"], quantized_grams[1], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("steps, sequential", [(["smoothquant", "rtn"], False), (["smoothquant", "gptq"], True)])
def test_smoothing_depends_on_the_weight_format_only_when_sequential(model, steps, sequential):
    """SmoothQuant's factors come from activation maxima: on the float model's activations they
    are the same whatever the weight format; behind GPTQ they follow the quantized layers."""
    import copy

    smoothed = [
        quantize_model(copy.deepcopy(model), recipe_from_config("s", {"steps": steps, "weight": weight}), calibration(),
                       batch_size=2).float_parameters
        for weight in ("int8", "int2")
    ]
    assert set(smoothed[0]) == set(smoothed[1])
    assert any(".0." in name for name in smoothed[0]) and any(".1." in name for name in smoothed[0])
    for name in smoothed[0]:
        same = torch.equal(smoothed[0][name], smoothed[1][name])
        assert same if (".0." in name or not sequential) else not same, name


def test_bfloat16_calibration_keeps_float32_statistics(model):
    """With bf16 forward passes (autocast) the statistics stay float32: layer 0's q_proj input
    (embedding and norm, no matrix product) is bit for bit the float32 one; o_proj's input comes
    out of bf16 products, so its Gram matrix moves, by about bf16's precision."""
    import copy

    data = calibration()
    grams = {}
    for dtype in (torch.float32, torch.bfloat16):
        seen = []
        recipe = Recipe(name="rec", steps=(RecordingRtn(seen=seen),), weight=parse_format("int4"))
        quantize_model(copy.deepcopy(model), recipe, data, batch_size=2, dtype=dtype)
        grams[dtype] = seen[0]
    exact, rounded = grams[torch.float32], grams[torch.bfloat16]
    assert all(gram.dtype == torch.float32 for gram in rounded.values())
    assert torch.equal(rounded["self_attn.q_proj"], exact["self_attn.q_proj"])
    o_exact, o_rounded = exact["self_attn.o_proj"], rounded["self_attn.o_proj"]
    assert not torch.equal(o_rounded, o_exact)
    assert float((o_rounded - o_exact).norm() / o_exact.norm()) < 0.02


@pytest.mark.parametrize("update", [add_gram, add_gram_syrk, add_gram_blocks])
@pytest.mark.parametrize("features", [1, 7, 64])
def test_gram_accumulation_is_exactly_symmetric_and_equals_x_transpose_x(features, update):
    generator = torch.Generator().manual_seed(features)
    gram = torch.zeros(features, features)
    batches = [torch.randn(100, features, generator=generator) for _ in range(3)]
    for x in batches:
        update(gram, x)
    stacked = torch.cat(batches)
    assert torch.equal(gram, gram.T)
    assert torch.allclose(gram, stacked.T @ stacked, rtol=1e-5, atol=1e-4)


def test_relative_output_error_matches_direct_computation():
    x = torch.randn(200, 32)
    w = torch.randn(8, 32)
    q = rtn(w, parse_format("int3")).dequantize()
    direct = (x @ (w - q).T).norm() / (x @ w.T).norm()
    assert relative_output_error(w, q, x.T @ x) == pytest.approx(float(direct), rel=1e-4)


def test_artifact_round_trip_reproduces_the_quantized_model(model, tmp_path):
    import copy

    fresh = copy.deepcopy(model)
    result = quantize_model(model, recipe_from_config("r", {"steps": ["rtn"], "weight": "int3"}), calibration())
    save_artifact(tmp_path / "artifact", result.quantized, result.float_parameters, {"recipe": "r"})
    manifest = apply_artifact(fresh, tmp_path / "artifact")
    assert manifest["recipe"] == "r" and set(manifest["linears"]) == set(result.quantized)
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, fresh.state_dict()[name]), name


def test_unknown_architecture_is_a_clear_error(model):
    model.config.model_type = "gpt_neox"
    with pytest.raises(PtqError, match="unsupported model_type 'gpt_neox'"):
        architecture_of(model)
    assert LLAMA.linears[0] == "self_attn.q_proj"


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"steps": ["rtm"], "weight": "int4"}, "unknown step 'rtm'"),
        ({"steps": ["rtn"], "weight": "int4-q"}, "cannot parse format 'int4-q'"),
        ({"steps": ["rtn"]}, "need a 'weight' format"),
        ({"steps": [], "weight": "int4"}, "no quantizer step"),
        ({"steps": [{"rtn": {"alpha": 1}}], "weight": "int4"}, "step 'rtn' has no setting"),
        ({"steps": ["rtn"], "weight": "int4", "wieght": 1}, "unknown key"),
    ],
)
def test_bad_recipes_name_the_problem(entry, message):
    with pytest.raises(PtqError, match=message):
        recipe_from_config("bad", entry)


def mean_output_error(result):
    return sum(r["output_rel_error"] for r in result.records) / len(result.records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gptq_in_the_pipeline_beats_rtn_on_output_error(model, dtype):
    import copy

    data = calibration(n=8, seqlen=32)
    gptq_model, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    gptq_result = quantize_model(gptq_model, recipe_from_config("g", {"steps": ["gptq"], "weight": "int3"}), data, dtype=dtype)
    recorder = Recipe(name="rec", steps=(RecordingRtn(seen=[]),), weight=parse_format("int3"))
    rtn_result = quantize_model(rtn_model, recorder, data, dtype=dtype)
    assert mean_output_error(gptq_result) < mean_output_error(rtn_result)
    assert all(r["cholesky_retries"] == 0 for r in gptq_result.records)


def test_true_sequential_recollects_statistics_group_by_group(model):
    import copy

    data = calibration(n=8, seqlen=32)
    plain, sequential = copy.deepcopy(model), copy.deepcopy(model)
    a = quantize_model(plain, recipe_from_config("a", {"steps": ["gptq"], "weight": "int3"}), data)
    b = quantize_model(sequential, recipe_from_config("b", {"steps": [{"gptq": {"true_sequential": True}}], "weight": "int3"}), data)
    assert set(a.quantized) == set(b.quantized)
    q_proj, o_proj = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert torch.equal(a.quantized[q_proj].codes, b.quantized[q_proj].codes)  # first group: same statistics
    assert not torch.equal(a.quantized[o_proj].codes, b.quantized[o_proj].codes)  # o_proj saw quantized q/k/v


@pytest.mark.parametrize(
    "entry",
    [
        {"steps": [{"smoothquant": {"alpha": 0.5}}, "awq", "gptq"], "weight": "mxint4", "act": "mxint8"},
        {"steps": ["awq", "rtn"], "weight": "int4-g16"},
        {"steps": ["smoothquant", "rtn"], "weight": "int8", "act": "int8"},
    ],
)
def test_compositions_round_trip_through_the_artifact(model, tmp_path, entry):
    """Scaled norms, codes and activation quantization all survive save/apply."""
    import copy

    from ptqrepro.export.artifact import ActivationQuantizer

    fresh = copy.deepcopy(model)
    recipe = recipe_from_config("combo", entry)
    result = quantize_model(model, recipe, calibration(n=6, seqlen=32))
    assert len(result.quantized) == 14
    if "smoothquant" in str(entry) or "awq" in str(entry):
        assert any("layernorm" in name for name in result.float_parameters)
    save_artifact(tmp_path / "a", result.quantized, result.float_parameters,
                  {"recipe": "combo", "act_format": recipe.act.name if recipe.act else None})
    apply_artifact(fresh, tmp_path / "a")
    if recipe.act is not None:
        activations = ActivationQuantizer(recipe.act)
        for name in result.quantized:
            activations.install(model.get_submodule(name))
    data = calibration(n=2, seqlen=32, seed=9)
    with torch.no_grad():
        assert torch.equal(model(input_ids=data).logits, fresh(input_ids=data).logits)


def test_the_gram_matrix_is_collected_only_for_steps_that_need_it(model):
    import copy

    smooth = quantize_model(copy.deepcopy(model), recipe_from_config("s", {"steps": ["smoothquant", "rtn"], "weight": "int8"}), calibration())
    gptq = quantize_model(copy.deepcopy(model), recipe_from_config("g", {"steps": ["gptq"], "weight": "int8"}), calibration())
    assert not any("output_rel_error" in r for r in smooth.records)
    assert all("output_rel_error" in r for r in gptq.records)


def test_module_output_reruns_the_inspected_module_on_its_calibration_inputs(model):
    """The plumbing of AWQ's block loss: the recorded calls of self_attn and mlp, run again, give
    the outputs the statistics pass saw; given weights replace the linears' for that call only."""
    from ptqrepro.models.adapters import decoder_layers, layer_linears
    from ptqrepro.layerwise.pipeline import capture_layer_inputs, module_output, recording_inputs, run_layer

    arch = architecture_of(model)
    inputs = capture_layer_inputs(model, arch, calibration(), "cpu", batch_size=2)
    layer = decoder_layers(model, arch)[0]
    linears = layer_linears(layer, arch)
    calls, seen = {"self_attn": [], "mlp": []}, {"self_attn": [], "mlp": []}
    handles = [layer.get_submodule(name).register_forward_hook(
        lambda _m, _args, out, name=name: seen[name].append(out[0] if isinstance(out, tuple) else out)) for name in seen]
    with recording_inputs(layer, calls, "cpu"):
        run_layer(layer, inputs)
    for handle in handles:
        handle.remove()
    for name in calls:
        assert len(calls[name]) == 3  # 5 windows in batches of 2
        again = module_output(layer, linears, calls, inputs, name, {})
        assert all(torch.equal(a, b) for a, b in zip(again, seen[name], strict=True))
    up = linears["mlp.up_proj"].weight.data.clone()
    silenced = module_output(layer, linears, calls, inputs, "mlp", {"mlp.up_proj": torch.zeros_like(up)})
    assert all(not out.any() for out in silenced)  # down_proj(silu(gate) * 0) = 0
    assert torch.equal(linears["mlp.up_proj"].weight.data, up) and up.any()


def test_awq_block_loss_runs_in_the_pipeline_and_differs_from_linears(model):
    """AWQ's reference loss through the whole pipeline: both losses quantize every linear, and on
    this model they pick different scales for some group."""
    import copy

    results = {
        loss: quantize_model(copy.deepcopy(model), recipe_from_config("a", {"steps": [{"awq": {"loss": loss, "clip": False}}, "rtn"],
                                                                        "weight": "int3"}), calibration(), batch_size=2)
        for loss in ("block", "linears")
    }
    ratios = {loss: [r["awq_ratio"] for r in result.records if "awq_ratio" in r] for loss, result in results.items()}
    assert len(ratios["block"]) == len(ratios["linears"]) > 0
    assert ratios["block"] != ratios["linears"]
