"""The ``spd-engine`` command line: the --json contract, and one clear line + non-zero exit per bad input."""
import json
import subprocess
import sys

import pytest

from spd_engine.cli import main
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("cli"), "llama", layers=4))


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_contract(tiny_dir, capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "hello", "--max-new-tokens", 6,
                           "--device", "cpu", "--json")
    assert code == 0
    payload = json.loads(out)  # stdout is exactly one JSON object
    assert set(payload) == {"text", "token_ids", "prompt_ids", "stats"}
    assert len(payload["prompt_ids"]) == 5  # one byte token per character, no BOS
    assert len(payload["token_ids"]) == payload["stats"]["new_tokens"] <= 6
    assert {"mode", "new_tokens", "seconds", "tokens_per_s"} <= set(payload["stats"])


def test_spd_json_stats_and_equality_with_vanilla(tiny_dir, capsys):
    base = ["generate", "--model", tiny_dir, "--prompt", "<|im_start|>user\nhi", "--max-new-tokens", 12, "--json"]
    _, vanilla, _ = run_cli(capsys, *base)
    _, spd, _ = run_cli(capsys, *base, "--mode", "spd", "--stage-layers", "2,1,1", "--pdm", "untrained")
    vanilla, spd = json.loads(vanilla), json.loads(spd)
    assert spd["token_ids"] == vanilla["token_ids"]
    assert spd["prompt_ids"][0] == 1  # the special-token string was recognised
    stats = spd["stats"]
    for key in ("stages", "stage_layers", "cycles", "accepted_drafts", "rejected_drafts", "acceptance_rate",
                "tokens_per_cycle", "equivalent_accept_length", "theoretical_speedup", "wall_seconds"):
        assert key in stats
    assert stats["stages"] == 3 and stats["stage_layers"] == [2, 1, 1]


def test_chat_uses_the_models_template(tiny_dir, capsys):
    _, out, _ = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "hi", "--chat", "--max-new-tokens", 2,
                        "--json")
    prompt_ids = json.loads(out)["prompt_ids"]
    assert prompt_ids[0] == 1 and prompt_ids.count(2) == 1  # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature must be"),
    (["--top-p", "0"], "--top-p must be"),
    (["--top-k", "-3"], "--top-k must be"),
    (["--mode", "spd", "--stages", "0", "--pdm", "untrained"], "--stages must be in [1, 4]"),
    (["--mode", "spd", "--stages", "5", "--pdm", "untrained"], "--stages must be in [1, 4]"),
    (["--mode", "spd", "--stage-layers", "2,1", "--pdm", "untrained"], "must be positive counts summing"),
    (["--mode", "spd", "--stage-layers", "2,x", "--pdm", "untrained"], "--stage-layers must be comma-separated"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["--graph", "maybe"], "argument --graph: invalid choice: 'maybe'"),
    (["--mode", "spd", "--stages", "2", "--pdm", "/nonexistent"], "is not a PDM checkpoint"),
    (["--mode", "spd", "--stages", "2"], "no draft module (PDM) is known"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-new-tokens", "600"], "exceeds the model's context of 512"),
])
def test_bad_generate_input(tiny_dir, capsys, args, message):
    code, out, err = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "hello", *args)
    assert code == 2 and out == ""
    assert err.startswith("spd-engine: error: ") and message in err and err.count("\n") == 1


def test_prompt_over_capacity(tiny_dir, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "x" * 510, "--max-new-tokens", 8)
    assert code == 2 and "exceeds the model's context" in err


def test_missing_model_directory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "missing", "--prompt", "hi")
    assert code == 2 and "does not exist" in err


def test_info_json(tiny_dir, capsys):
    code, out, _ = run_cli(capsys, "info", "--model", tiny_dir, "--json")
    info = json.loads(out)
    assert code == 0 and info["config"]["num_layers"] == 4 and info["eos_ids"] == [2]


def test_module_entry_point_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spd_engine", "generate", "--model", str(tmp_path / "x"),
                           "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr
