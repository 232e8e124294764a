"""The ``spd-engine`` command line: the --json contract, and one clear line + non-zero exit per bad input."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from spd_engine.cli import main
from spd_engine.evaluate import load_questions
from spd_engine.simulate import busy_machine_warning
from spd_engine.tokenizer import StreamDecoder, Tokenizer
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
    (["--pdm", "untrained"], "--pdm applies to --mode spd only"),
    (["--stages", "2"], "--stages applies to --mode spd only"),
    (["--mode", "vanilla", "--stage-layers", "2,2"], "--stage-layers applies to --mode spd only"),
    (["--threads", "0"], "--threads must be >= 1"),
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


def test_spd_prints_vanilla_beside_it_and_explains_the_numbers(tiny_dir, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "hello", "--max-new-tokens", 8,
                             "--mode", "spd", "--stages", 2, "--pdm", "untrained")
    assert code == 0 and out.endswith("\n")
    table = err.split("to compare (--no-compare skips this)\n", 1)[1].splitlines()
    assert table[0].split() == ["vanilla", "SPD,", "n=2"]
    assert table[1].split()[:2] == ["new", "tokens"]
    assert "same tokens as vanilla: yes" in err
    assert "equivalent accept length" in err and "2 devices (one stage each) or the graphed GPU path" in err
    assert "checks correctness, not speed" in err


def test_no_compare_and_vanilla_print_one_summary_line(tiny_dir, capsys):
    for extra in (["--mode", "spd", "--stages", 2, "--pdm", "untrained", "--no-compare"], []):
        code, out, err = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "hello", "--max-new-tokens", 4,
                                 *extra)
        assert code == 0 and out.endswith("\n") and err.count("\n") == 1 and err.startswith("[")


def test_printed_text_leaves_out_special_tokens(tiny_dir, capsys):
    tokenizer = Tokenizer(tiny_dir)
    ids = tokenizer.encode("hi<|im_end|>")
    assert ids[-1] == 2  # <|im_end|> is one special token
    assert StreamDecoder(tokenizer).push(ids) == "hi"
    _, out, _ = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "hi", "--max-new-tokens", 12, "--json")
    payload = json.loads(out)
    assert payload["text"] == tokenizer.decode(payload["token_ids"], skip_special_tokens=True)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "(default: 128)" in out and "(default: vanilla)" in out and "(default: None)" not in out


def test_bad_flag_is_one_line_and_exit_2(capsys):
    code, out, err = run_cli(capsys, "generate", "--mode", "fast", "--prompt", "hi")
    assert code == 2 and out == ""
    assert err.startswith("spd-engine: error: argument --mode: invalid choice") and err.count("\n") == 1


def test_threads_sets_torch_threads(tiny_dir, capsys):
    before = torch.get_num_threads()
    try:
        code, _, _ = run_cli(capsys, "info", "--model", tiny_dir, "--threads", 1, "--json")
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_hub_id_resolves_from_the_local_hugging_face_cache(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--SomeOrg--Tiny-Model"
    shutil.copytree(tiny_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    code, out, _ = run_cli(capsys, "info", "--model", "SomeOrg/Tiny-Model", "--json")
    assert code == 0 and json.loads(out)["path"] == str(repo / "snapshots" / "abc123")
    code, _, err = run_cli(capsys, "info", "--model", "SomeOrg/Missing")
    assert code == 2 and f"looked in {tmp_path / 'hub' / 'models--SomeOrg--Missing'}" in err


def test_hf_home_locates_the_hub_cache(tmp_path, monkeypatch):
    from spd_engine.weights import hub_cache_dir

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"


def test_simulate_warns_on_a_busy_machine():
    assert "busy (load average 3.00 on 2 cores)" in busy_machine_warning(load=3.0, cores=2)
    assert busy_machine_warning(load=0.4, cores=2) is None


def test_a_sample_prompt_set_ships_with_the_package():
    questions = load_questions("sample")
    assert len(questions) == 12 and all(q["prompt"] for q in questions)


def test_an_output_path_the_file_system_refuses_is_one_line(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hi"]}\n')
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(capsys, "eval", "--model", tiny_dir, "--pdm", "untrained", "--stages", 2, "--data", prompts,
                           "--max-new-tokens", 2, "--out", tmp_path / "taken")
    assert code == 2 and err.splitlines()[-1].startswith("spd-engine: error: ") and "taken" in err.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "taken"]  # no temporary file left behind


def test_eval_on_the_sample_set_explains_its_columns(tiny_dir, capsys):
    code, out, _ = run_cli(capsys, "eval", "--model", tiny_dir, "--pdm", "untrained", "--stages", 2, "--data", "sample",
                           "--limit", 1, "--max-new-tokens", 2)
    lines = out.splitlines()
    assert code == 0 and lines[2].split()[:3] == ["sample", "1", "1/1"]  # dataset, prompts, lossless
    assert lines[1].split()[-1] == "predicted" and lines[2].split()[-2:] == ["on", "3"]  # n + 1 devices
    assert lines[-3].startswith("eq. accept len: n x new tokens / cycles, the speedup over vanilla that 2 devices")
    assert lines[-2].startswith("wall ratio: spd tok/s / vanilla tok/s;") and "checks correctness, not speed" in out
    assert lines[-1].startswith("predicted: the simulator's speedup over vanilla on one device")
