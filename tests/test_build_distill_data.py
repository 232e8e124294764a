"""bench/build_distill_data.py: corpus passages -> prompts -> the target's own answers -> JSONL chats."""
import json
from pathlib import Path

from module_loader import load_module
from tiny_models import make_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "build_distill_data.py"


def load_script():
    return load_module(SCRIPT, "build_distill_data")


def test_writes_one_chat_per_prompt_with_the_targets_answer(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", "llama", layers=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{p}x{i}" for i in range(60)) for p in range(6)))
    out = tmp_path / "data.jsonl"
    code = load_script().main([str(corpus), "--out", str(out), "--prompts", "3", "--answer-tokens", "5",
                               "--model", str(model_dir), "--device", "cpu", "--max-words", "30"])
    assert code == 0
    chats = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assert len(chats) == 3
    for user, assistant in chats:
        assert user["role"] == "user" and assistant["role"] == "assistant"
        passage = user["content"].split("\n\n", 1)[1]
        assert 0 < len(passage.split()) <= 30
        assert assistant["content"]  # the tiny model's greedy answer, up to 5 tokens
