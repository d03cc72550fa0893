import copy

import pytest
import torch

from ptqrepro.errors import PtqError
from ptqrepro.eval.divergence import FloatReference, float_reference
from ptqrepro.eval.perplexity import perplexity, windows_fingerprint

VOCAB = 96


def windows(seed=1, n=5, seqlen=16):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def perturbed(model, scale=0.05, seed=0):
    """A stand-in for a quantized model: every weight matrix with relative noise added."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            if parameter.dim() == 2:
                parameter.add_(scale * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    return other


def exact_scores(float_model, model, ids):
    """Per window, by hand in float64 over the whole vocabulary: the mean exact KL(p || q), the
    mean of the lumped tail's share p(rest) · KL(p(.|rest) || q(.|rest)) for top-k sets of size k,
    and the share of positions where argmax q != argmax p."""
    with torch.no_grad():
        logp = torch.log_softmax(float_model(input_ids=ids).logits[:, :-1].double(), dim=-1)
        logq = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)
    exact = (logp.exp() * (logp - logq)).sum(-1).mean(-1)
    flips = (logp.argmax(-1) != logq.argmax(-1)).double().mean(-1)

    def tail_gap(k):
        rest = torch.ones_like(logp, dtype=torch.bool).scatter(-1, logp.topk(k, dim=-1).indices, False)
        p_rest = (logp.exp() * rest).sum(-1)
        q_rest = (logq.exp() * rest).sum(-1)
        conditional = torch.where(rest, logp.exp() / p_rest[..., None] * ((logp - p_rest.log()[..., None])
                                                                          - (logq - q_rest.log()[..., None])), 0.0)
        return (p_rest * conditional.sum(-1)).mean(-1)

    return exact, flips, tail_gap


def test_top_k_kl_is_the_exact_kl_less_the_lumped_tails_share(model):
    """KL_k = KL - p(rest) KL(p(.|rest) || q(.|rest)) for every k: so KL_k <= KL, it grows with k
    and equals KL once k covers the vocabulary."""
    ids = windows()
    quantized = perturbed(model)
    exact, _, tail_gap = exact_scores(model, quantized, ids)
    assert (exact > 1e-4).all()  # the perturbation moved the distributions
    previous = torch.zeros_like(exact)
    for k in (4, 16, 48, VOCAB):
        reference = float_reference(model, ids, k, batch_size=2, device="cpu", fingerprint=windows_fingerprint(ids))
        metrics, per_window = perplexity(quantized, ids, batch_size=3, reference=reference)
        kld = torch.tensor(per_window["window_kld"], dtype=torch.float64)
        assert torch.allclose(exact - kld, tail_gap(k), rtol=1e-3, atol=1e-7)
        assert (previous <= kld + 1e-9).all() and (kld <= exact + 1e-7).all()
        assert metrics["kld"] == pytest.approx(float(kld.mean()))
        previous = kld
    assert torch.allclose(kld, exact, rtol=1e-5, atol=0)


def test_top1_flips_are_counted_exactly(model):
    ids = windows(seed=2)
    quantized = perturbed(model, scale=0.3)
    reference = float_reference(model, ids, 8, batch_size=5, device="cpu", fingerprint=windows_fingerprint(ids))
    _, per_window = perplexity(quantized, ids, batch_size=2, reference=reference)
    _, flips, _ = exact_scores(model, quantized, ids)
    assert 0 < sum(per_window["window_flips"]) and per_window["window_flips"] == [float(f) for f in flips]


def test_the_float_model_against_itself_scores_zero_and_keeps_its_losses_to_the_bit(model):
    ids = windows(seed=3)
    reference = float_reference(model, ids, 8, batch_size=2, device="cpu", fingerprint=windows_fingerprint(ids))
    metrics, per_window = perplexity(model, ids, batch_size=2, reference=reference)
    assert per_window["window_kld"] == [0.0] * 5 and per_window["window_flips"] == [0.0] * 5
    plain_metrics, plain = perplexity(model, ids, batch_size=2)
    assert plain == {"window_nll": per_window["window_nll"]} and plain_metrics["ppl"] == metrics["ppl"]


def test_a_reference_round_trips_and_refuses_other_windows(model, tmp_path):
    ids = windows(seed=4, n=3)
    reference = float_reference(model, ids, 8, batch_size=2, device="cpu", fingerprint=windows_fingerprint(ids))
    reference.save(tmp_path / "ref.safetensors", {"k": 8, "seqlen": 16})
    loaded = FloatReference.load(tmp_path / "ref.safetensors")
    assert loaded.k == 8 and loaded.windows_sha256 == reference.windows_sha256
    assert torch.equal(loaded.ids, reference.ids) and torch.equal(loaded.logprobs, reference.logprobs)
    loaded.check_windows(windows_fingerprint(ids), "ref")
    with pytest.raises(PtqError, match="other test windows"):
        loaded.check_windows(windows_fingerprint(windows(seed=5, n=3)), "ref")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PtqError, match="cannot read it"):
        FloatReference.load(tmp_path / "bad.safetensors")


def test_the_commands_keep_kl_and_flips_per_window_beside_the_losses(tmp_path, tiny_model_dir, tiny_corpus):
    """float-reference once, then eval-ppl of fp16 (KL 0, no flips) and of RTN INT3 (KL > 0) with
    it; a reference of other windows is refused with one line."""
    import json

    from conftest import prepare_tiny_run
    from ptqrepro.cli import main

    prepared = prepare_tiny_run(tmp_path, tiny_model_dir, tiny_corpus, nsamples=2, seqlen=16)
    protocol = ["--corpus", str(prepared / "corpus"), "--seqlen", "16", "--max-windows", "4", "--dtype", "float32"]
    assert main(["float-reference", "--model", str(prepared / "model"), *protocol, "--top-k", "8",
                 "--out", str(tmp_path / "ref.safetensors")]) == 0
    results = {}
    for recipe, spec in (("fp16", "{steps: []}"), ("rtn@int3", "{steps: [rtn], weight: int3}")):
        assert main(["quantize", "--model", str(prepared / "model"), "--calibration", str(prepared / "calib.pt"),
                     "--recipe", recipe, "--spec", spec, "--out", str(tmp_path / recipe),
                     "--metrics", str(tmp_path / f"{recipe}.json")]) == 0
        assert main(["eval-ppl", "--model", str(prepared / "model"), "--quantized", str(tmp_path / recipe), *protocol,
                     "--reference", str(tmp_path / "ref.safetensors"), "--out", str(tmp_path / f"ppl-{recipe}.json")]) == 0
        results[recipe] = json.loads((tmp_path / f"ppl-{recipe}.json").read_text())
    assert results["fp16"]["window_kld"] == [0.0] * 4 and results["fp16"]["window_flips"] == [0.0] * 4
    assert all(kld > 0 for kld in results["rtn@int3"]["window_kld"]) and len(results["rtn@int3"]["window_flips"]) == 4
    assert results["rtn@int3"]["protocol"]["kld_top_k"] == 8 and results["rtn@int3"]["metrics"]["kld"] > 0
    other = [*protocol[:-4], "--max-windows", "3", "--dtype", "float32"]
    assert main(["eval-ppl", "--model", str(prepared / "model"), "--quantized", str(tmp_path / "fp16"), *other,
                 "--reference", str(tmp_path / "ref.safetensors"), "--out", str(tmp_path / "other.json")]) == 2


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_the_losses_beside_the_kl_are_next_token_losses_to_the_bit_whatever_the_chunk(monkeypatch, chunk):
    from ptqrepro.eval import divergence
    from ptqrepro.eval.divergence import divergence_from_reference, top_k_of_logits
    from ptqrepro.eval.perplexity import next_token_losses

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=generator).bfloat16()
    ids = torch.randint(0, 50, (3, 9), generator=generator)
    reference = top_k_of_logits(torch.randn(3, 9, 50, generator=generator), 5)
    monkeypatch.setattr(divergence, "ROWS_PER_CHUNK_ELEMENTS", chunk)
    losses, kld, flips = divergence_from_reference(logits, ids, *reference)
    assert torch.equal(losses, next_token_losses(logits, ids)) and (kld > 0).all() and kld.shape == flips.shape == (3,)
