"""SmoothQuant and AWQ: scaling must leave the float model unchanged; the searches must be right."""

from functools import partial

import pytest
import torch

from ptqrepro.formats import parse_format
from ptqrepro.methods.awq import block_mse, search_clip, search_scales
from ptqrepro.methods.rtn import rtn
from ptqrepro.methods.smoothquant import smoothing_scales
from ptqrepro.models.adapters import architecture_of, decoder_layers, layer_linears
from ptqrepro.layerwise.pipeline import capture_layer_inputs, module_output, recording_inputs, run_layer
from ptqrepro.layerwise.statistics import collect_input_statistics, output_error
from ptqrepro.recipe.steps import AwqStep, LayerContext, SmoothQuantStep


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    return OPTForCausalLM(config).eval()


def with_outlier_channels(model):
    """Real LLM activations have a few huge channels; make the norms produce them."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter[::9] *= 20
    return model


def apply_transform(model, step, data, fmt="int4"):
    """Run one transform step over every layer exactly as the pipeline does (no quantizer)."""
    arch = architecture_of(model)
    inputs = capture_layer_inputs(model, arch, data, "cpu", batch_size=2)
    contexts = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        linears = layer_linears(layer, arch)
        calls = {module: [] for module in step.inspected_modules(arch)}
        with recording_inputs(layer, calls, "cpu"):
            stats = collect_input_statistics(lambda: run_layer(layer, inputs), linears)
        context = LayerContext(index=index, prefix=f"{arch.layers}.{index}", layer=layer, arch=arch,
                               linears=linears, weight_format=parse_format(fmt), stats=stats,
                               module_output=partial(module_output, layer, linears, calls, inputs))
        step.apply(context)
        contexts.append(context)
        inputs.hidden = run_layer(layer, inputs)
    return contexts


def logits(model, data):
    with torch.no_grad():
        return model(input_ids=data).logits


@pytest.mark.parametrize("make", ["llama", "opt"])
@pytest.mark.parametrize("step", [SmoothQuantStep(alpha=0.5), SmoothQuantStep(alpha=0.85), AwqStep(clip=False),
                                  AwqStep(clip=False, loss="linears")])
def test_scaling_leaves_the_float_model_unchanged(make, step, model):
    # float64, so that "unchanged" can be checked far below the effect of any real change
    net = with_outlier_channels(model if make == "llama" else tiny_opt()).double()
    data = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    before = logits(net, data)
    weights_before = {n: p.clone() for n, p in net.named_parameters()}
    contexts = apply_transform(net, step, data)
    after = logits(net, data)
    assert torch.allclose(before, after, atol=1e-9, rtol=1e-9), float((before - after).abs().max())
    changed = [n for n, p in net.named_parameters() if not torch.equal(p, weights_before[n])]
    assert any("norm" in n for n in changed), "the scales were folded into the norms"
    assert all(c.changed for c in contexts)


def test_folded_statistics_equal_statistics_collected_afresh(model):
    net = with_outlier_channels(model).double()
    data = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    arch = architecture_of(net)
    inputs = capture_layer_inputs(net, arch, data, "cpu", 2)
    layer = decoder_layers(net, arch)[0]
    linears = layer_linears(layer, arch)
    stats = collect_input_statistics(lambda: run_layer(layer, inputs), linears)
    context = LayerContext(index=0, prefix="model.layers.0", layer=layer, arch=arch, linears=linears,
                           weight_format=parse_format("int4"), stats=stats)
    SmoothQuantStep(alpha=0.5).apply(context)
    fresh = collect_input_statistics(lambda: run_layer(layer, inputs), linears)
    for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
        folded, collected = context.stats[name], fresh[name]
        assert (folded.gram - collected.gram).norm() / collected.gram.norm() < 1e-5
        assert torch.allclose(folded.absmax, collected.absmax, rtol=1e-5)
        assert torch.allclose(folded.absmean, collected.absmean, rtol=1e-5)
    assert context.stats["self_attn.q_proj"] is context.stats["self_attn.k_proj"]


def test_smoothing_scales_balance_activation_and_weight_ranges():
    act = torch.tensor([1.0, 100.0, 4.0])
    w = torch.tensor([[1.0, 1.0, 4.0], [0.5, 1.0, 1.0]])
    s = smoothing_scales(act, [w], alpha=0.5)
    assert torch.allclose(act / s, w.abs().amax(0) * s)  # alpha 0.5: equal maxima after migration


def correlated_inputs(tokens=512, features=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=generator) @ torch.randn(features, features, generator=generator) / 8
    x[:, ::16] *= 25  # outlier channels
    return x


def test_awq_losses_are_true_output_errors_and_the_search_beats_rtn():
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    fmt = parse_format("int3")
    quantize = lambda weight: rtn(weight, fmt).dequantize()  # noqa: E731
    s, losses = search_scales([w], x.T @ x, x.abs().mean(0), quantize)
    rtn_error = float(((x @ w.T) - x @ quantize(w).T).pow(2).sum())
    assert losses[0] == pytest.approx(rtn_error, rel=1e-3)  # ratio 0 is plain RTN
    awq_error = float(((x @ w.T) - x @ (quantize(w * s) / s).T).pow(2).sum())
    assert awq_error == pytest.approx(min(losses), rel=1e-3)
    assert awq_error < 0.9 * rtn_error


def test_block_loss_is_the_mse_of_the_block_output_by_hand():
    """Hand-checked: X = [[1, 2], [3, -1]], one linear w = [0.3, 0.8] feeding the block
    F(y) = y^2, Q rounds to multiples of 0.5, two ratios. Ratio 0 (s = 1): Q(w) = [0.5, 1.0],
    y = X w = [1.9, 0.1], ŷ = X Q(w) = [2.5, 0.5], F: [3.61, 0.01] vs [6.25, 0.25],
    MSE = (2.64² + 0.24²) / 2 = 3.5136. Ratio 1/2: s_x = mean|X| = [2, 1.5], s = s_x^½ / (2·1.5)^¼
    = [1.0746, 0.9306] (max·min = 1); W s = [0.3224, 0.7445] -> Q = [0.5, 0.5],
    Q / s = [0.4653, 0.5373], ŷ = [1.5399, 0.8586], F: [2.3713, 0.7372],
    MSE = (1.2387² + 0.7272²) / 2 = 1.0316."""
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([[0.3, 0.8]], dtype=torch.float64)
    quantize = lambda weight: torch.round(weight * 2) / 2  # noqa: E731
    block = lambda weights: [(x @ weights[0].double().T) ** 2]  # noqa: E731
    _, losses = search_scales([w], x.T @ x, x.abs().mean(0), quantize, n_grid=2, block=block)
    assert losses == pytest.approx([3.5136, 1.0316], abs=2e-4)
    assert block_mse(block([quantize(w)]), block([w])) == pytest.approx(3.5136)


def test_block_loss_equals_the_directly_computed_block_mse():
    """On a random gated block F = silu(X Gᵀ) * (X Uᵀ) over two calibration batches: each ratio's
    block loss is the MSE of the block output with the scaled, quantized, unscaled weights."""
    generator = torch.Generator().manual_seed(5)
    batches = [correlated_inputs(tokens=64, seed=seed) for seed in (6, 7)]
    x = torch.cat(batches)
    gate, up = (torch.randn(48, 64, generator=generator) for _ in range(2))
    fmt = parse_format("int3-g16")
    quantize = lambda weight: rtn(weight, fmt).dequantize()  # noqa: E731
    block = lambda ws: [torch.nn.functional.silu(b @ ws[0].T) * (b @ ws[1].T) for b in batches]  # noqa: E731
    s, losses = search_scales([gate, up], x.T @ x, x.abs().mean(0), quantize, n_grid=5, block=block)
    float_out = torch.cat(block([gate, up]))
    scales = []
    for step, loss in enumerate(losses):
        scale = x.abs().mean(0).pow(step / 5).clamp(min=1e-4)
        scales.append(scale / torch.sqrt(scale.max() * scale.min()))
        out = torch.cat(block([quantize(gate * scales[-1]) / scales[-1], quantize(up * scales[-1]) / scales[-1]]))
        assert loss == pytest.approx(float((out - float_out).pow(2).mean()), rel=1e-5)
    assert torch.equal(s, scales[losses.index(min(losses))])


def test_block_and_linears_losses_can_pick_different_ratios():
    """A block that weighs its linears unequally (F = 10 X Aᵀ + X Bᵀ/10, say an attention output
    that depends on one projection far more than another): the block loss follows A's error, the
    sum of the linears' errors both alike, and the two choose different ratios."""
    x = correlated_inputs(seed=8)
    generator = torch.Generator().manual_seed(9)
    a, b = torch.randn(32, 64, generator=generator), torch.randn(32, 64, generator=generator) * 4
    b[:, ::16] *= 0.05  # B's weights are small where the outlier channels are: it wants little scaling
    fmt = parse_format("int3")
    quantize = lambda weight: rtn(weight, fmt).dequantize()  # noqa: E731
    block = lambda ws: [10 * (x @ ws[0].T) + (x @ ws[1].T) / 10]  # noqa: E731
    _, linears = search_scales([a, b], x.T @ x, x.abs().mean(0), quantize)
    _, blockwise = search_scales([a, b], x.T @ x, x.abs().mean(0), quantize, block=block)
    assert linears.index(min(linears)) != blockwise.index(min(blockwise))


def test_clip_search_lowers_each_groups_error():
    x = correlated_inputs(seed=3)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    w[:, 5] *= 6
    fmt = parse_format("int3-g16")
    quantize = lambda weight: rtn(weight, fmt).dequantize()  # noqa: E731
    threshold = search_clip(w, x.T @ x, 16, quantize)
    assert threshold.shape == (16, 4)
    assert (threshold <= w.view(16, 4, 16).abs().amax(2) + 1e-6).all()
    clipped = torch.maximum(torch.minimum(w.view(16, 4, 16), threshold[..., None]), -threshold[..., None]).view(16, 64)
    assert output_error(w - quantize(clipped), x.T @ x) < output_error(w - quantize(w), x.T @ x)


def test_bfloat16_products_rank_awq_candidates_as_float32_does():
    """AWQ's searches only rank candidates: with bfloat16 products the scale search's losses stay
    within bf16's rounding of the float32 ones and the clip search keeps each group's error low."""
    x = correlated_inputs(seed=5)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    fmt = parse_format("int3")
    quantize = lambda weight: rtn(weight, fmt).dequantize()  # noqa: E731
    gram = x.T @ x
    _, exact = search_scales([w], gram, x.abs().mean(0), quantize)
    s, rounded = search_scales([w], gram, x.abs().mean(0), quantize, product_dtype=torch.bfloat16)
    assert rounded != exact
    assert rounded == pytest.approx(exact, rel=1e-2)
    assert float(output_error(w - quantize(w * s) / s, gram)) <= min(exact) * 1.01
    threshold = search_clip(w, gram, None, quantize, product_dtype=torch.bfloat16)
    clipped = torch.maximum(torch.minimum(w, threshold), -threshold)
    assert output_error(w - quantize(clipped), gram) <= output_error(w - quantize(w), gram)


def test_output_error_is_the_squared_output_difference_in_either_precision():
    x = correlated_inputs(seed=7)
    delta = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    direct = float((x @ delta.T).pow(2).sum())
    assert float(output_error(delta, x.T @ x)) == pytest.approx(direct, rel=1e-5)
    assert float(output_error(delta, (x.T @ x).bfloat16())) == pytest.approx(direct, rel=1e-2)
