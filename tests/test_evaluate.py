"""spd-engine eval: losslessness on every prompt, acceptance bookkeeping, traces, JSON and table output."""
import argparse
import json

import pytest

from spd_engine import evaluate
from spd_engine.engine import Engine
from spd_engine.errors import UserError
from tiny_models import make_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", layers=4)


@pytest.fixture(scope="module")
def question_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sets = {"writing": ["Write a poem about rivers.", "Describe a cat.", "List three colours.", "Say hi."],
            "math": ["What is 7 times 8?", "Add 12 and 30."]}
    paths = []
    for name, prompts in sets.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"question_id": 100 + i, "category": name, "turns": [p, "second turn"]})
                                + "\n" for i, p in enumerate(prompts)))
        paths.append(path)
    return paths


def parse(argv):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(argv)


def test_eval_is_lossless_and_writes_traces(model_dir, question_sets, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = parse(["--model", str(model_dir), "--stages", "2", "--pdm", "untrained", "--max-new-tokens", "12",
                  "--limit", "3", "--data", *map(str, question_sets), "--out", str(out)])
    assert evaluate.run(args) == 0
    table = capsys.readouterr().out
    assert "writing" in table and "math" in table and "3/3" in table and "2/2" in table
    report = json.loads(out.read_text())
    assert list(report["datasets"]) == ["writing", "math"] and report["stages"] == 2
    for name, expected_prompts in (("writing", 3), ("math", 2)):  # --limit 3 cuts the first set only
        d = report["datasets"][name]
        assert d["prompts"] == len(d["per_prompt"]) == expected_prompts and d["lossless"] is True
        for p in d["per_prompt"]:
            assert p["lossless"] is True and p["first_mismatch"] is None
            assert len(p["trace"]) == p["accepted"] + p["rejected"] and set(p["trace"]) <= {"A", "R"}
            assert p["trace"].count("A") == p["accepted"] and p["new_tokens"] == p["vanilla_new_tokens"]
        assert [p["question_id"] for p in d["per_prompt"]] == list(range(100, 100 + expected_prompts))
        verified = d["accepted"] + d["rejected"]
        assert d["acceptance_rate"] == pytest.approx(d["accepted"] / verified)
        assert d["equivalent_accept_length"] == pytest.approx(2 * d["new_tokens"] / d["cycles"])
        assert d["vanilla_tokens_per_s"] > 0 and d["spd_tokens_per_s"] > 0
        assert d["wall_clock_ratio"] == pytest.approx(d["spd_tokens_per_s"] / d["vanilla_tokens_per_s"])


def test_eval_reports_a_lossless_failure(model_dir, question_sets, monkeypatch):
    """A broken SPD decoder (here: one wrong token) must show up as lossless=False and a failing exit status."""
    own = Engine.generate

    def broken(self, *args, **kwargs):
        result = own(self, *args, **kwargs)
        if kwargs["mode"] == "spd":
            result.token_ids[-1] = (result.token_ids[-1] + 1) % 200
        return result

    monkeypatch.setattr(Engine, "generate", broken)
    args = parse(["--model", str(model_dir), "--stages", "2", "--pdm", "untrained", "--max-new-tokens", "6",
                  "--limit", "1", "--data", str(question_sets[1])])
    assert evaluate.run(args) == 1
    engine = Engine.load(str(model_dir))
    report = evaluate.evaluate(engine, [str(question_sets[1])], pdm="untrained", stages=2, max_new_tokens=6,
                               limit=1, progress=False)
    prompt = report["datasets"]["math"]["per_prompt"][0]
    assert prompt["lossless"] is False and prompt["first_mismatch"] == prompt["new_tokens"] - 1


def test_sampling_skips_the_identity_check(model_dir, question_sets):
    engine = Engine.load(str(model_dir))
    report = evaluate.evaluate(engine, [str(question_sets[1])], pdm="untrained", stages=2, max_new_tokens=6,
                               temperature=0.8, seed=1, progress=False)
    d = report["datasets"]["math"]
    assert d["lossless"] is None and all(p["lossless"] is None for p in d["per_prompt"])


@pytest.mark.parametrize("case", ["missing file", "bad json", "no turns", "empty", "untrained without stages",
                                  "bad limit"])
def test_bad_inputs_are_user_errors(model_dir, question_sets, tmp_path, case):
    engine = Engine.load(str(model_dir))
    files = {"bad json": "{oops\n", "no turns": json.dumps({"question_id": 1}) + "\n", "empty": "\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    data = str(tmp_path / f"{case}.jsonl") if case in files or case == "missing file" else str(question_sets[0])
    kwargs = dict(pdm="untrained", stages=2, max_new_tokens=4, progress=False)
    kwargs.update({"untrained without stages": dict(stages=None), "bad limit": dict(limit=0)}.get(case, {}))
    with pytest.raises(UserError):
        evaluate.evaluate(engine, [data], **kwargs)
