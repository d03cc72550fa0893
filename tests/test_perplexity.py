import math

import pytest
import torch

from ptqrepro.eval.perplexity import perplexity, windows_fingerprint


def hand_perplexity(model, windows):
    """exp of the mean over windows of the mean next-token negative log-probability, by loops."""
    window_means = []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].double()
            total = 0.0
            for position in range(len(window) - 1):
                log_probs = logits[position] - torch.logsumexp(logits[position], dim=0)
                total -= float(log_probs[window[position + 1]])
            window_means.append(total / (len(window) - 1))
    return math.exp(sum(window_means) / len(window_means))


def test_perplexity_equals_hand_computation(model):
    windows = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, windows, batch_size=2)[0]["ppl"] == pytest.approx(hand_perplexity(model, windows), rel=1e-5)


def test_each_windows_loss_is_kept_and_the_perplexity_is_their_mean(model):
    windows = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(1))
    metrics, per_window = perplexity(model, windows, batch_size=2)
    window_nll = per_window["window_nll"]
    hand = [math.log(hand_perplexity(model, windows[i : i + 1])) for i in range(5)]
    assert window_nll == pytest.approx(hand, rel=1e-5) and len(set(window_nll)) == 5
    assert metrics["nll"] == pytest.approx(sum(window_nll) / 5) and metrics["ppl"] == pytest.approx(math.exp(metrics["nll"]))


def test_windows_fingerprint_names_the_tokens_scored():
    windows = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(1))
    assert windows_fingerprint(windows) == windows_fingerprint(windows.clone().to(torch.int32))
    changed = windows.clone()
    changed[4, 15] = (changed[4, 15] + 1) % 96
    assert windows_fingerprint(changed) != windows_fingerprint(windows)
    assert windows_fingerprint(windows[:4]) != windows_fingerprint(windows)


def test_perplexity_does_not_depend_on_batch_size(model):
    windows = torch.randint(0, 96, (7, 16), generator=torch.Generator().manual_seed(2))
    values = {perplexity(model, windows, batch_size=b)[0]["ppl"] for b in (1, 3, 7)}
    assert max(values) == pytest.approx(min(values), rel=1e-5)


def test_a_model_that_knows_the_text_has_lower_perplexity(model):
    windows = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.lm_head.weight.mul_(0)  # uniform predictions: ppl == vocab size
    assert perplexity(model, windows)[0]["ppl"] == pytest.approx(96, rel=1e-4)


def test_bfloat16_evaluation_stays_close_to_float32(model):
    """The cast `auto` picks on bf16-capable hardware: same windows, perplexity within 1 %."""
    import copy

    windows = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(4))
    reference = perplexity(model, windows)[0]["ppl"]
    assert perplexity(copy.deepcopy(model).to(torch.bfloat16), windows)[0]["ppl"] == pytest.approx(reference, rel=0.01)


def test_auto_dtype_follows_the_hardware(monkeypatch):
    from ptqrepro.errors import PtqError
    from ptqrepro.models import sources

    assert sources.compute_dtype("float16", "cpu") == "float16"
    with pytest.raises(PtqError, match="unknown dtype 'fp8'"):
        sources.compute_dtype("fp8", "cpu")
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(sources, "cpu_has_native_bf16", lambda: native)
        assert sources.compute_dtype("auto", "cpu") == expected
    monkeypatch.setattr(sources.torch.cuda, "is_bf16_supported", lambda: False)
    assert sources.compute_dtype("auto", "cuda") == "float16"


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_chunked_cross_entropy_equals_the_whole_batch_at_once(monkeypatch, chunk):
    """``next_token_losses`` converts a few positions at a time to float32: bit for bit what one
    cross-entropy over the whole float32 batch gives, whatever the chunk."""
    import torch.nn.functional as F

    from ptqrepro.eval import perplexity as module

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=generator).bfloat16()
    ids = torch.randint(0, 50, (3, 9), generator=generator)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", chunk)
    whole = F.cross_entropy(logits[:, :-1].float().reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="none")
    assert torch.equal(module.next_token_losses(logits, ids), whole.view(3, -1).mean(dim=1))
