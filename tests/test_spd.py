"""SPD is lossless: greedy output equals vanilla token for token; sampling keeps the target distribution."""
import pytest
import torch

from spd_engine.decode import generate_vanilla, prefill
from spd_engine.model import Model
from spd_engine.pdm import PDM, auto_anchors
from spd_engine.sampling import SamplingParams, target_probs
from spd_engine.spd import SPDState, generate_spd
from spd_engine.stages import partition_layers
from tiny_models import (assert_counts_follow, first_two_token_counts, make_tiny_model, oracle_drafts,
                         second_token_law)

GREEDY = SamplingParams()
PROMPTS = [[5, 6, 7, 8, 9, 10], [200, 13], [1, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 17]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Five layers, so most stage counts need an uneven split."""
    return Model.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny5"), "llama", layers=5))


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["p6", "p2", "p13"])
def test_greedy_untrained_pdm_is_lossless(model, stages, prompt):
    expected = generate_vanilla(model, prompt, 24, GREEDY, eos_ids=()).token_ids
    pdm = PDM.create(model, partition_layers(5, stages))
    result = generate_spd(model, pdm, prompt, 24, GREEDY, eos_ids=())
    assert result.token_ids == expected
    assert result.stats.rejected_drafts > 0  # an untrained PDM misses, so flushes really happened


@pytest.mark.parametrize("stages", [1, 2, 4, 5])
@pytest.mark.parametrize("hit_rate", [1.0, 0.8, 0.4])
def test_greedy_good_drafts_are_lossless_and_counted(model, monkeypatch, stages, hit_rate):
    prompt = PROMPTS[0]
    expected = generate_vanilla(model, prompt, 30, GREEDY, eos_ids=()).token_ids
    oracle_drafts(monkeypatch, SPDState, "draft", expected, len(prompt), hit_rate)
    result = generate_spd(model, PDM.create(model, partition_layers(5, stages)), prompt, 30, GREEDY, eos_ids=())
    stats = result.stats
    assert result.token_ids == expected
    assert stats.accepted_drafts + stats.rejected_drafts == len(result.trace) == 29
    assert stats.equivalent_accept_length == pytest.approx(stats.stages * 30 / stats.cycles)
    if hit_rate == 1.0:  # full acceptance: one token per cycle after n-1 refill cycles
        assert stats.cycles == 29 + stages - 1 and stats.rejected_drafts == 0


def test_explicit_uneven_split_and_eos_stop(model):
    prompt = PROMPTS[1]
    free_run = generate_vanilla(model, prompt, 20, GREEDY, eos_ids=()).token_ids
    eos = free_run[7]
    expected = generate_vanilla(model, prompt, 20, GREEDY, eos_ids={eos}).token_ids
    pdm = PDM.create(model, partition_layers(5, stage_layers=[1, 3, 1]))
    result = generate_spd(model, pdm, prompt, 20, GREEDY, eos_ids={eos})
    assert result.token_ids == expected and result.token_ids[-1] == eos
    assert result.stats.stage_layers == [1, 3, 1]


def test_cache_after_every_flush_equals_fresh_vanilla_prefix(model):
    """After each rejection, every layer's cache holds exactly what a fresh run on the committed prefix holds."""
    prompt = PROMPTS[0]
    pdm = PDM.create(model, partition_layers(5, 3))
    state = SPDState(model, pdm, 128, GREEDY)
    with torch.inference_mode():
        first = prefill(model, state.cache, prompt).argmax(-1)
        pdm_prefill_len = len(prompt)
        state.cache.reset()
        state.prefill(prompt)
        state.start(first, len(prompt))
        committed = [int(first)]
        flushes = 0
        for _ in range(30):
            rejected_before = int(state.rejected)
            state.cycle()
            committed = [int(first)] + state.out_tokens[: int(state.num_out)].tolist()
            if int(state.rejected) == rejected_before:
                continue
            flushes += 1
            length = len(prompt) + len(committed) - 1  # the corrected token itself has not run yet
            assert state.cache.lengths.flatten().tolist() == [length] * 5
            assert int(state.pdm_cache.lengths.max()) <= length
            fresh = model.new_cache(128)
            prefill(model, fresh, prompt + committed[:-1])
            torch.testing.assert_close(state.cache.k[:, :, :length], fresh.k[:, :, :length], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state.cache.v[:, :, :length], fresh.v[:, :, :length], rtol=1e-5, atol=1e-5)
    assert flushes >= 3 and pdm_prefill_len == len(prompt)


def test_auto_anchors_follow_the_reference_rule():
    assert auto_anchors(32, 4) == [0, 8, 24, 31, 32]
    assert auto_anchors(30, 4) == [0, 7, 21, 29, 30]
    assert auto_anchors(5, 5) == [0, 1, 3, 4, 5]


def test_depth_types_follow_anchor_coverage(model):
    pdm = PDM.create(model, partition_layers(5, stage_layers=[2, 2, 1]), anchors=[0, 2, 3, 5])
    # layers passed by depth: 0, 2, 4, 5 -> largest anchor <= that: 0, 2, 3, 5 -> types 0, 1, 2, 3
    assert pdm.depth_types == [0, 1, 2, 3]


def designed_drafts(monkeypatch, support: list[int]):
    """The PDM still runs (its cache must evolve as usual) but proposes from q = uniform over ``support``.
    The rule is exact for any q; a q that overlaps the target's support exercises accept and reject alike."""
    own_draft = SPDState.draft

    def draft(self):
        own_draft(self)
        q = torch.zeros(self.pdm.config.draft_vocab_size)
        q[torch.tensor(support)] = 1.0 / len(support)  # the untrained PDM's draft vocab is the identity
        return self.pdm.draft_vocab[torch.multinomial(q, 1, generator=self.generator)], q

    monkeypatch.setattr(SPDState, "draft", draft)


@pytest.mark.parametrize("stages", [1, 2])
def test_sampling_keeps_the_target_distribution(model, monkeypatch, stages):
    """Chi-square on the first and second tokens over many seeded SPD runs. The second token is the first
    one settled by the speculative-sampling rule; a rule that just accepted drafts would follow q instead."""
    params = SamplingParams(temperature=1.5, top_k=6, seed=0)
    first_probs = target_probs(prefill(model, model.new_cache(64), PROMPTS[0]), params)[0]
    second_probs = second_token_law(model, PROMPTS[0], params, first_probs)
    designed_drafts(monkeypatch, second_probs.topk(4).indices.tolist() + [3])
    pdm = PDM.create(model, partition_layers(5, stages))
    samples = 800
    firsts, seconds, accepted, rejected = first_two_token_counts(
        lambda seed: generate_spd(model, pdm, PROMPTS[0], 2, SamplingParams(1.5, 6, seed=seed), eos_ids=()), samples)
    assert accepted > 100 and rejected > 100  # both branches of the rule were exercised
    for counts, probs in ((firsts, first_probs), (seconds, second_probs)):
        assert_counts_follow(counts, probs, samples)
