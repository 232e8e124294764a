"""Sampling parameters: validation and the exact distribution that temperature, top-k and top-p define."""
import pytest
import torch

from spd_engine.errors import UserError
from spd_engine.sampling import Noise, SamplingParams, draw, next_token, target_probs


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), "--temperature"), (dict(temperature=float("nan")), "--temperature"),
    (dict(top_k=-1), "--top-k"), (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p")])
def test_invalid_values_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**kwargs)


def test_top_k_and_top_p_cuts():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    top2 = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 (which crosses it) stays in; 0.1 and 0.05 go.
    nucleus = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(nucleus, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)


def test_temperature_sharpens_and_seed_repeats():
    logits = torch.randn(1, 50)
    hot, cold = (target_probs(logits, SamplingParams(temperature=t)) for t in (2.0, 0.5))
    assert cold.max() > hot.max()
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [next_token(logits, params, params.generator("cpu")).item() for _ in range(2)]
    assert draws[0] == draws[1]
    assert next_token(logits, SamplingParams(), None).item() == logits.argmax().item()


def test_draw_follows_unnormalised_weights():
    """The exponential race draws index i with probability w_i / sum(w); zero weights are never drawn."""
    from scipy.stats import chisquare

    weights = torch.tensor([0.0, 3.0, 1.0, 0.5, 0.0, 2.5])
    samples = 20000
    generator = torch.Generator().manual_seed(1)
    picks = draw(weights.expand(samples, -1), torch.rand(samples, 6, generator=generator))
    counts = torch.bincount(picks, minlength=6).double()
    assert counts[weights == 0].sum() == 0
    expected = weights[weights > 0].double() / weights.sum() * samples
    assert chisquare(counts[weights > 0].numpy(), expected.numpy()).pvalue > 1e-3


def test_noise_refills_in_place_and_repeats_per_seed():
    first, second = (Noise(SamplingParams(temperature=1.0, seed=3), "cpu", 8) for _ in range(2))
    buffer = first.uniforms
    first.refill()
    second.refill()
    assert first.uniforms is buffer and torch.equal(first.uniforms, second.uniforms)
    assert ((buffer >= 0) & (buffer < 1)).all()
    before = buffer.clone()
    first.refill()
    assert not torch.equal(buffer, before)
    assert torch.equal(first.take(2, 3), buffer[2:5])
