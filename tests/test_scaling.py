"""SmoothQuant and AWQ: scaling must leave the float model unchanged; the searches must be right."""

import pytest
import torch

from ptqrepro.formats import parse_format
from ptqrepro.methods.awq import search_clip, search_scales
from ptqrepro.methods.rtn import rtn
from ptqrepro.methods.smoothquant import smoothing_scales
from ptqrepro.models.adapters import architecture_of, decoder_layers, layer_linears
from ptqrepro.pipeline import run_layer, capture_layer_inputs
from ptqrepro.statistics import collect_input_statistics, output_error
from ptqrepro.steps import AwqStep, LayerContext, SmoothQuantStep


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
        stats = collect_input_statistics(lambda: run_layer(layer, inputs), linears)
        context = LayerContext(index=index, prefix=f"{arch.layers}.{index}", layer=layer, arch=arch,
                               linears=linears, weight_format=parse_format(fmt), stats=stats)
        step.apply(context)
        contexts.append(context)
        inputs.hidden = run_layer(layer, inputs)
    return contexts


def logits(model, data):
    with torch.no_grad():
        return model(input_ids=data).logits


@pytest.mark.parametrize("make", ["llama", "opt"])
@pytest.mark.parametrize("step", [SmoothQuantStep(alpha=0.5), SmoothQuantStep(alpha=0.85), AwqStep(clip=False)])
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
