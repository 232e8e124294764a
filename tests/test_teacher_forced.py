"""Teacher-forced evaluation: the trace it computes is the trace the real pipeline produces (T=0), and its
acceptance has the real pipeline's distribution (T>0)."""
import json
import math
import random

import pytest
import torch

from spd_engine import evaluate
from spd_engine.engine import Engine
from spd_engine.errors import UserError
from spd_engine.sampling import SamplingParams
from spd_engine.simulate import count_cycles
from spd_engine.spd import generate_spd, resolve_pdm
from spd_engine.teacher_forced import evaluate_teacher_forced
from spd_engine.train import TrainOptions, train_pdm
from tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "the cat dog sat on a mat big red blue ran fast slow and then".split()


def word_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(count)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.load(str(make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", layers=4)))


@pytest.fixture(scope="module")
def pdms(engine, tmp_path_factory):
    """PDMs that accept some drafts and reject others (so traces mix A and R): briefly self-distilled, for
    n=2 with a one-layer tower and n=3 with a two-layer tower; plus untrained n=1 and n=4."""
    data = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    data.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in word_prompts(16, seed=0)))
    trained = {}
    for stages, tower_layers in ((2, 1), (3, 2)):
        out = tmp_path_factory.mktemp(f"pdm{stages}")
        train_pdm(engine, TrainOptions(data=[str(data)], out=str(out), stages=stages, tower_layers=tower_layers,
                                       self_distill=True, answer_tokens=32, seq_len=64, steps=60, batch_size=4,
                                       lr=1e-3, draft_vocab=128, val_fraction=0.1, checkpoint_every=100),
                  progress=False)
        trained[(stages, tower_layers)] = resolve_pdm(engine, str(out))
    trained[(1, 1)] = resolve_pdm(engine, "untrained", stages=1)
    trained[(4, 1)] = resolve_pdm(engine, "untrained", stages=4)
    return trained


def prompt_ids(engine, count, seed):
    return [engine.encode_prompt(text, chat=True) for text in word_prompts(count, seed)]


@pytest.mark.parametrize("config", [(2, 1), (3, 2), (1, 1), (4, 1)])
def test_greedy_trace_equals_the_real_pipeline(engine, pdms, config):
    pdm = pdms[config]
    prompts = prompt_ids(engine, 4, seed=7)
    greedy = SamplingParams()
    forced = evaluate_teacher_forced(engine, {"set": prompts}, [pdm], 40, greedy, progress=False)[0]["set"]
    mixed = 0
    for ids, result in zip(prompts, forced):
        real = generate_spd(engine.model, pdm, ids, 40, greedy, engine.eos_ids)
        assert result["trace"] == "".join("A" if a else "R" for a in real.trace)
        assert result["cycles"] == real.stats.cycles
        assert result["new_tokens"] == real.stats.new_tokens
        assert result["accepted"] == real.stats.accepted_drafts
        mixed += "A" in result["trace"] and "R" in result["trace"]
    if config[0] in (2, 3):  # the trained PDMs exercise both outcomes, and the fill of every accept run
        assert mixed >= 2


def test_sampled_acceptance_matches_the_real_pipeline(engine, pdms):
    """T=1: acceptance over many seeded runs agrees with the real pipeline's within sampling error
    (a few hundred verifications each; the bound is 4.5 standard errors of the difference)."""
    pdm = pdms[(2, 1)]
    prompts = prompt_ids(engine, 6, seed=11)
    real_accepted = real_verified = 0
    for seed in range(8):
        for ids in prompts:
            stats = generate_spd(engine.model, pdm, ids, 24, SamplingParams(1.0, seed=seed), engine.eos_ids).stats
            real_accepted += stats.accepted_drafts
            real_verified += stats.accepted_drafts + stats.rejected_drafts
    forced_accepted = forced_verified = 0
    for seed in range(8):
        results = evaluate_teacher_forced(engine, {"set": prompts}, [pdm], 24, SamplingParams(1.0, seed=100 + seed),
                                          progress=False)[0]["set"]
        for result in results:
            forced_accepted += result["accepted"]
            forced_verified += result["accepted"] + result["rejected"]
            assert result["cycles"] == count_cycles(result["trace"], 2)
    real, forced = real_accepted / real_verified, forced_accepted / forced_verified
    pooled = (real_accepted + forced_accepted) / (real_verified + forced_verified)
    error = math.sqrt(pooled * (1 - pooled) * (1 / real_verified + 1 / forced_verified))
    assert 0.05 < real < 0.95, real  # both outcomes happen: the comparison means something
    assert abs(real - forced) < 4.5 * error, (real, forced, error)


def test_one_teacher_pass_serves_several_pdms(engine, pdms):
    prompts = prompt_ids(engine, 3, seed=5)
    both = evaluate_teacher_forced(engine, {"set": prompts}, [pdms[(2, 1)], pdms[(3, 2)]], 30, SamplingParams(),
                                   progress=False)
    for pdm, results in zip((pdms[(2, 1)], pdms[(3, 2)]), both):
        alone = evaluate_teacher_forced(engine, {"set": prompts}, [pdm], 30, SamplingParams(), progress=False)[0]
        assert [r["trace"] for r in results["set"]] == [r["trace"] for r in alone["set"]]


def test_cli_teacher_forced_report(engine, pdms, tmp_path, capsys, monkeypatch):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question_id": i, "turns": [p]}) + "\n"
                            for i, p in enumerate(word_prompts(3, seed=2))))
    out_dir = tmp_path / "pdm"
    pdms[(2, 1)].save(out_dir)
    parser = __import__("argparse").ArgumentParser()
    evaluate.add_arguments(parser)
    monkeypatch.setattr("spd_engine.engine.Engine.load", lambda *a, **k: engine)
    args = parser.parse_args(["--model", "tiny", "--pdm", str(out_dir), "--data", str(data), "--method",
                              "teacher-forced", "--max-new-tokens", "20", "--out", str(tmp_path / "r.json")])
    assert evaluate.run(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "teacher-forced" and report["stages"] == 2
    q = report["datasets"]["q"]
    assert q["prompts"] == 3 and q["lossless"] is None and "spd_tokens_per_s" not in q
    assert q["accepted"] + q["rejected"] == sum(len(p["trace"]) for p in q["per_prompt"])
    assert "teacher-forced" in capsys.readouterr().out
    with torch.no_grad():
        real = evaluate.evaluate(engine, [str(data)], pdm=str(out_dir), max_new_tokens=20, progress=False)
    assert [p["trace"] for p in real["datasets"]["q"]["per_prompt"]] == [p["trace"] for p in q["per_prompt"]]


def test_answers_cache_is_reused_only_when_it_matches(engine, pdms, tmp_path, monkeypatch):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in word_prompts(2, seed=4)))
    cache = tmp_path / "answers.json"
    out_dir = tmp_path / "pdm"
    pdms[(2, 1)].save(out_dir)
    first = evaluate.evaluate(engine, [str(data)], pdm=str(out_dir), max_new_tokens=12, method="teacher-forced",
                              answers_cache=cache, progress=False)
    assert cache.is_file()
    calls = []
    real_answers = evaluate.target_answers
    monkeypatch.setattr(evaluate, "target_answers", lambda *a, **k: calls.append(1) or real_answers(*a, **k))
    again = evaluate.evaluate(engine, [str(data)], pdm=str(out_dir), max_new_tokens=12, method="teacher-forced",
                              answers_cache=cache, progress=False)
    assert calls == [] and again["datasets"] == first["datasets"]
    longer = evaluate.evaluate(engine, [str(data)], pdm=str(out_dir), max_new_tokens=16, method="teacher-forced",
                               answers_cache=cache, progress=False)
    assert calls == [1] and longer["datasets"]["q"]["new_tokens"] > first["datasets"]["q"]["new_tokens"]
    with pytest.raises(UserError):
        evaluate.evaluate(engine, [str(data)], pdm=str(out_dir), max_new_tokens=12, answers_cache=cache,
                          progress=False)
