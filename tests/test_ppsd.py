"""PPSD is lossless: greedy output equals vanilla token for token, sampling keeps the target distribution, and a
flush leaves every layer's cache as a fresh prefill of the committed prefix would."""
import re

import pytest
import torch

from spd_engine.decode import generate_vanilla, prefill
from spd_engine.errors import UserError
from spd_engine.exit_adapter import ExitAdapter, ExitAdapterConfig
from spd_engine.model import Model
from spd_engine.modes import mode_class
from spd_engine.pdm import target_identity
from spd_engine.modes.ppsd import ExitDraft, PPSDMode, PPSDState, exit_traces, generate_ppsd, predict_ppsd
from spd_engine.sampling import SamplingParams, target_probs
from spd_engine.simulate import LINK_PRESETS, Link, count_cycles
from tiny_models import (VOCAB, assert_counts_follow, first_two_token_counts, make_tiny_model, oracle_drafts,
                         second_token_law)

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams()
PROMPTS = [[5, 6, 7, 8, 9, 10], [200, 13], [1, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 17]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Five layers: exit layers 1..4, balanced and not."""
    return Model.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny5"), "llama", layers=5))


@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["p6", "p2", "p13"])
def test_greedy_early_exit_is_lossless(model, exit_layer, prompt):
    expected = generate_vanilla(model, prompt, 24, GREEDY, eos_ids=()).token_ids
    result = generate_ppsd(model, prompt, 24, GREEDY, (), exit_layer)
    assert result.token_ids == expected
    assert result.stats.rejected_drafts > 0  # a random model's early exit misses, so flushes really happened
    assert result.stats.mode == "ppsd" and result.stats.exit_layer == exit_layer


@pytest.mark.parametrize("exit_layer", [1, 2, 4])
@pytest.mark.parametrize("hit_rate", [1.0, 0.7, 0.3])
def test_greedy_good_drafts_are_lossless_and_counted(model, monkeypatch, exit_layer, hit_rate):
    prompt = PROMPTS[0]
    expected = generate_vanilla(model, prompt, 30, GREEDY, eos_ids=()).token_ids
    oracle_drafts(monkeypatch, PPSDState, "draft_after_exit", expected, len(prompt), hit_rate)
    result = generate_ppsd(model, prompt, 30, GREEDY, (), exit_layer)
    stats = result.stats
    assert result.token_ids == expected
    assert stats.accepted_drafts + stats.rejected_drafts == len(result.trace) == 29
    # Each reject costs one refill cycle; the start costs one. The engine's cycles are the simulator's.
    assert stats.cycles == 29 + 1 + stats.rejected_drafts - (not result.trace[-1])
    assert stats.cycles == count_cycles("".join("A" if a else "R" for a in result.trace), 2)
    assert stats.tokens_per_target_pass == stats.theoretical_speedup
    assert stats.theoretical_speedup == pytest.approx(29 * 5 / (stats.cycles * max(exit_layer, 5 - exit_layer)))
    if hit_rate == 1.0:
        assert stats.cycles == 30 and stats.rejected_drafts == 0 and stats.acceptance_rate == 1.0


def test_eos_stop(model):
    prompt = PROMPTS[1]
    free_run = generate_vanilla(model, prompt, 20, GREEDY, eos_ids=()).token_ids
    eos = free_run[7]
    expected = generate_vanilla(model, prompt, 20, GREEDY, eos_ids={eos}).token_ids
    result = generate_ppsd(model, prompt, 20, GREEDY, {eos}, 3)
    assert result.token_ids == expected and result.token_ids[-1] == eos
    assert len(result.trace) == len(expected) - 1


def test_cache_after_every_flush_equals_fresh_vanilla_prefix(model):
    """After each rejection, every layer's cache holds exactly what a fresh run on the committed prefix holds."""
    prompt = PROMPTS[0]
    state = PPSDState(model, ExitDraft(model, 2), 128, GREEDY)
    with torch.inference_mode():
        first = state.prefill(prompt).argmax(-1)
        state.start(first, len(prompt))
        flushes = 0
        for _ in range(30):
            rejected_before = int(state.rejected)
            state.cycle()
            if int(state.rejected) == rejected_before:
                continue
            flushes += 1
            committed = [int(first)] + state.out_tokens[: int(state.num_out)].tolist()
            length = len(prompt) + len(committed) - 1  # the corrected token itself has not run yet
            assert state.cache.lengths.flatten().tolist() == [length] * 5
            fresh = model.new_cache(128)
            prefill(model, fresh, prompt + committed[:-1])
            torch.testing.assert_close(state.cache.k[:, :, :length], fresh.k[:, :, :length], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state.cache.v[:, :, :length], fresh.v[:, :, :length], rtol=1e-5, atol=1e-5)
    assert flushes >= 3


def test_sampling_keeps_the_target_distribution(model, monkeypatch):
    """Chi-square on the first and second tokens over many seeded runs. The second token is the first one
    settled by the speculative-sampling rule; a rule that just accepted drafts would follow q instead. The
    exit head still runs, but drafts from q = uniform over a support overlapping the target's."""
    params = SamplingParams(temperature=1.5, top_k=6, seed=0)
    first_probs = target_probs(prefill(model, model.new_cache(64), PROMPTS[0]), params)[0]
    second_probs = second_token_law(model, PROMPTS[0], params, first_probs)
    support = second_probs.topk(4).indices.tolist() + [3]
    own_draft = PPSDState.draft_after_exit

    def designed_draft(self, hidden):
        own_draft(self, hidden)
        q = torch.zeros(VOCAB)
        q[torch.tensor(support)] = 1.0 / len(support)
        return torch.multinomial(q, 1, generator=self.generator), q

    monkeypatch.setattr(PPSDState, "draft_after_exit", designed_draft)
    samples = 800
    firsts, seconds, accepted, rejected = first_two_token_counts(
        lambda seed: generate_ppsd(model, PROMPTS[0], 2, SamplingParams(1.5, 6, seed=seed), (), 2), samples)
    assert accepted > 100 and rejected > 100  # both branches of the rule were exercised
    for counts, probs in ((firsts, first_probs), (seconds, second_probs)):
        assert_counts_follow(counts, probs, samples)


def test_sampling_with_the_exit_head_runs_and_repeats_per_seed(model):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    first = generate_ppsd(model, PROMPTS[2], 16, params, (), 3)
    again = generate_ppsd(model, PROMPTS[2], 16, params, (), 3)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 16
    assert first.stats.accepted_drafts + first.stats.rejected_drafts == 15


def test_exit_traces_replay_greedy_ppsd(model):
    """The teacher-forced traces the default exit layer was chosen by are exactly greedy PPSD's traces."""
    prompt = PROMPTS[2]
    answer = generate_vanilla(model, prompt, 20, GREEDY, eos_ids=()).token_ids
    traces = exit_traces(model, [(prompt + answer, len(prompt))], [1, 3])
    for exit_layer in (1, 3):
        result = generate_ppsd(model, prompt, 20, GREEDY, (), exit_layer)
        assert traces[exit_layer] == ["".join("A" if a else "R" for a in result.trace)]


@pytest.mark.parametrize("exit_layer", [0, 5, -1])
def test_exit_layer_outside_the_model_is_one_line_error(model, exit_layer):
    with pytest.raises(UserError, match=r"--exit-layer must be in \[1, 4\]") as info:
        generate_ppsd(model, PROMPTS[0], 4, GREEDY, (), exit_layer)
    assert "\n" not in str(info.value)


def test_mode_registry_options_and_defaults(engine):
    """The conftest's tiny 4-layer engine: the registry finds the mode; no exit layer means L // 2."""
    assert mode_class("ppsd") is PPSDMode and PPSDMode.capturable
    assert PPSDMode(engine).draft.exit_layer == 2
    with pytest.raises(UserError, match=r"\[1, 3\] for this 4-layer model, got 4"):
        PPSDMode(engine, exit_layer=4)
    import argparse

    parser = argparse.ArgumentParser()
    PPSDMode.add_arguments(parser)
    args = parser.parse_args(["--exit-layer", "3", "--exit-adapter", "x"])
    assert (args.exit_layer, args.exit_adapter) == (3, "x")


def test_adapter_round_trip_and_mismatches(engine, model, tmp_path):
    target = engine.model
    generator = torch.Generator().manual_seed(0)
    adapter = ExitAdapter(ExitAdapterConfig(target_identity(target.config), exit_layer=1, rank=4),
                          torch.randn(4, 64, generator=generator), torch.randn(64, 4, generator=generator))
    adapter.save(tmp_path / "a")
    mode = PPSDMode(engine, exit_adapter=str(tmp_path / "a"))  # its exit layer becomes the default
    assert mode.draft.exit_layer == 1
    torch.testing.assert_close(mode.draft.adapter.up, adapter.up)
    prompt = PROMPTS[0]
    expected = generate_vanilla(target, prompt, 16, GREEDY, eos_ids=()).token_ids
    assert generate_ppsd(target, prompt, 16, GREEDY, (), 1, adapter=mode.draft.adapter).token_ids == expected
    with pytest.raises(UserError, match="trained at exit layer 1, not --exit-layer 2"):
        PPSDMode(engine, exit_layer=2, exit_adapter=str(tmp_path / "a"))
    mismatch = f"was trained for a model with name={target.config.name}, this model has {model.config.name}"
    with pytest.raises(UserError, match=re.escape(mismatch)):
        ExitAdapter.load(tmp_path / "a", model, None)
    with pytest.raises(UserError, match="is not an exit adapter directory"):
        PPSDMode(engine, exit_adapter=str(tmp_path / "missing"))


def test_verification_trace_leaves_out_cycles_past_the_last_kept_token(model):
    state = PPSDState(model, ExitDraft(model, 2), 128, GREEDY)
    with torch.inference_mode():
        state.start(state.prefill(PROMPTS[0]).argmax(-1), len(PROMPTS[0]))
        for _ in range(12):
            state.cycle()
    produced = int(state.num_out)
    _, cycles, trace = state.verification_history(produced)
    assert len(trace) == produced and cycles <= 12
    _, shorter_cycles, shorter = state.verification_history(3)
    assert shorter == trace[:3] and shorter_cycles < cycles


def test_predict_ppsd_two_devices():
    layer_ms = [1.0] * 10
    free = LINK_PRESETS["free"]
    # Every draft accepted, balanced split, free heads and link: one token per cycle at half the layers.
    full = predict_ppsd(layer_ms, 0.0, free, ["A" * 99], exit_layer=5, hidden_size=64)
    assert (full.tokens, full.cycles, full.cycle_ms) == (99, 100, 5.0)
    assert full.speedup == pytest.approx(99 * 10 / (100 * 5)) == full.theoretical_speedup
    # An unbalanced split is as slow as its slower stage; each reject costs a refill cycle.
    skewed = predict_ppsd(layer_ms, 0.0, free, ["ARRA"], exit_layer=3, hidden_size=64)
    assert skewed.cycles == count_cycles("ARRA", 2) == 7 and skewed.cycle_ms == 7.0
    assert skewed.acceptance_rate == 0.5
    # The link: the early device's hidden message hides behind its exit head, the verdict does not.
    link = Link("test", latency_us=500.0, bandwidth_gbs=None)
    timed = predict_ppsd(layer_ms, 2.0, link, ["A" * 9], exit_layer=5, hidden_size=64, adapter_ms=0.25)
    assert timed.early_ms == 5 + 2.25 and timed.late_ms == 5 + 2.0
    assert timed.cycle_ms == pytest.approx(max(5 + max(2.25, 0.5), 7.0 + 0.5))
    assert timed.vanilla_tokens_per_s == pytest.approx(1e3 / 12.0)
    with pytest.raises(UserError, match="exit layer must be in"):
        predict_ppsd(layer_ms, 0.0, free, ["A"], exit_layer=10, hidden_size=64)


def test_default_model_greedy_equals_vanilla():
    """The real default model (SmolLM2-135M-Instruct), short answers, at its default and two other exits."""
    from spd_engine import Engine
    from spd_engine.modes.ppsd import DEFAULT_EXIT_LAYER

    engine = Engine.load("default", device="cpu", dtype="float32")
    assert PPSDMode(engine).draft.exit_layer == DEFAULT_EXIT_LAYER
    for text, exit_layer in (("What is the capital of France?", DEFAULT_EXIT_LAYER),
                             ("List three prime numbers.", 8), ("Write a haiku about the sea.", 24)):
        ids = engine.encode_prompt(text, chat=True)
        expected = generate_vanilla(engine.model, ids, 12, GREEDY, engine.eos_ids).token_ids
        result = generate_ppsd(engine.model, ids, 12, GREEDY, engine.eos_ids, exit_layer)
        assert result.token_ids == expected, (text, exit_layer)


def test_train_exit_adapter_from_a_feature_cache(engine, cache_dir, tmp_path):
    """The conftest's tiny engine and its feature cache (every layer cached): least squares, a few distillation
    steps, an atomic save that loads back and drafts losslessly."""
    from spd_engine.exit_adapter import train_exit_adapter

    report = train_exit_adapter(engine, str(cache_dir), exit_layer=2, out=str(tmp_path / "ea"), rank=8, steps=3,
                                batch_rows=16, max_rows=400, val_rows=20, progress=False)
    assert report["train_rows"] == 400 and report["val_rows"] == 20 and report["steps"] == 3
    for key in ("val_agreement_plain_exit", "val_agreement_least_squares", "val_agreement_adapter"):
        assert 0.0 <= report[key] <= 1.0
    assert sorted(p.name for p in (tmp_path / "ea").iterdir()) == [
        "exit_adapter.json", "exit_adapter.safetensors", "train_report.json"]  # no temporary left behind
    mode = PPSDMode(engine, exit_adapter=str(tmp_path / "ea"))
    assert mode.draft.exit_layer == 2 and mode.draft.adapter.config.rank == 8
    expected = generate_vanilla(engine.model, PROMPTS[0], 12, GREEDY, eos_ids=()).token_ids
    assert generate_ppsd(engine.model, PROMPTS[0], 12, GREEDY, (), 2, adapter=mode.draft.adapter).token_ids == expected


@pytest.mark.parametrize("flags, message", [
    (["--exit-layer", "4"], r"--exit-layer must be in \[1, 3\]"),
    (["--exit-layer", "2", "--rank", "0"], r"--rank must be in \[1, 64\]"),
    (["--exit-layer", "2", "--steps", "-1"], "--steps must be >= 0"),
])
def test_train_exit_adapter_user_errors_are_one_line(tiny_dir, cache_dir, tmp_path, capsys, flags, message):
    from spd_engine.cli import main

    code = main(["train-exit-adapter", "--model", str(tiny_dir), "--cache", str(cache_dir), "--out",
                 str(tmp_path / "ea"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("spd-engine: error:")
    assert re.search(message, err) and not (tmp_path / "ea").exists()


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampling"])
def test_ppsd_cycle_compiles_without_graph_breaks(tmp_path_factory, monkeypatch, temperature):
    """capturable = True rests on this: the step a CUDA graph replays has no host sync (test_capture_safety's
    CPU proof, on the GPU attention path), with the pipeline full so verification runs."""
    from spd_engine.ops import reference
    from test_capture_safety import assert_no_graph_break

    monkeypatch.setattr(reference, "attention_live_length", reference.attention_capacity_masked)
    model = Model.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("capture"), "qwen3", layers=3),
                                  backend="torch")
    params = SamplingParams(temperature=temperature, top_k=20, seed=0)
    state = PPSDState(model, ExitDraft(model, 1), 64, params)
    with torch.inference_mode():
        state.start(state.prefill(PROMPTS[0]).argmax(-1), len(PROMPTS[0]))
        for _ in range(2):
            state.cycle()
        if state.noise is not None:
            state.noise.refill()  # the cycle's one generator call, which the CUDA graph registers instead
        assert_no_graph_break(state.step)
