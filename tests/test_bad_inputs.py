"""Bad inputs, table-driven: every file the engine reads, damaged in many ways.

Model weights, the shard index, config.json, tokenizer.json and tokenizer_config.json, GGUF files (given as
--model and to convert-gguf), PDM checkpoints (pdm.safetensors, pdm_config.json), eval prompt sets and answer
caches, training data and training checkpoints, simulate's inputs, and bad flags. Safetensors and GGUF files
are cut at seeded random offsets, their headers overwritten with garbage, their tensors given the wrong dtype
or shape; JSON files lose keys and get mistyped values.

Every case runs the real command line (``spd_engine.cli.main``, in process; a few also as subprocesses) and
must end with exactly one stderr line starting ``spd-engine: error:``, exit status 2, nothing on stdout, and a
workspace byte-for-byte as it was: a failed command writes nothing, so earlier outputs stay intact.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from spd_engine.cli import main
from test_gguf_convert import hf_weights, write_gguf
from tiny_models import SUBPROCESS_ENV, make_tiny_model, write_tiny_chats

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 19
TRUNCATIONS = 12  # seeded random cut points per binary file


# ---------------------------------------------------------------------------------------------- workspace
@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """One workspace with a good copy of every input: each case corrupts a fresh copy of it."""
    root = tmp_path_factory.mktemp("originals")
    make_tiny_model(root / "model", "llama", layers=4)
    write_gguf(root / "tiny.gguf", hf_weights(layers=2))
    (root / "eval.jsonl").write_text("".join(json.dumps({"question_id": i, "turns": [f"say {w}"]}) + "\n"
                                             for i, w in enumerate(["hi", "yes", "no"])))
    (root / "report.json").write_text('{"an earlier report": true}\n')
    write_tiny_chats(root / "train.jsonl", seed=SEED)
    # A finished training run with its last checkpoint: the PDM cases use its PDM, the resume cases its checkpoint.
    # Relative paths (run from the workspace) keep the run's identity the same in every copy, so --resume accepts it.
    with working_directory(root):
        code, _, err = run_main(TRAIN)
    assert code == 0, err
    # A build-data feature cache (two shards) for the train-pdm --cache cases.
    code, _, err = run_main(["build-data", "--model", root / "model", "--out", root / "cache-data", "--prompts", 4,
                             "--shard-size", 2, "--answer-tokens", 8, "--batch", 4, "--feature-layers", "0,2,4"])
    assert code == 0, err
    (root / "pdm").mkdir()
    for name in ("pdm.safetensors", "pdm_config.json"):
        shutil.copy(root / "trained" / name, root / "pdm")
    return root


@contextmanager
def working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------------------------- commands
def generate(w: Path, *extra) -> list:
    return ["generate", "--model", w / "model", "--prompt", "hi", "--max-new-tokens", 2, "--device", "cpu", *extra]


TRAIN = ["train-pdm", "--model", "model", "--stages", "2", "--data", "train.jsonl", "--out", "trained", "--steps", "2",
         "--checkpoint-every", "1", "--seq-len", "32", "--batch-size", "2", "--draft-vocab", "64"]
COMMANDS: dict[str, Callable[[Path], list]] = {
    "generate": lambda w: generate(w),
    "chat": lambda w: generate(w, "--chat"),
    "spd": lambda w: generate(w, "--mode", "spd", "--pdm", w / "pdm"),
    "gguf-model": lambda w: ["generate", "--model", w / "tiny.gguf", "--prompt", "hi", "--max-new-tokens", 2],
    "convert": lambda w: ["convert-gguf", w / "tiny.gguf", w / "converted"],
    "eval": lambda w: ["eval", "--model", w / "model", "--pdm", "untrained", "--stages", 2, "--data", w / "eval.jsonl",
                       "--max-new-tokens", 2, "--out", w / "report.json"],
    "answers": lambda w: ["eval", "--model", w / "model", "--pdm", w / "pdm", "--data", w / "eval.jsonl",
                          "--max-new-tokens", 2, "--method", "teacher-forced", "--answers-cache",
                          w / "trained" / "answers.json"],
    "train": lambda w: TRAIN,
    "resume": lambda w: TRAIN + ["--resume"],
    "cache": lambda w: ["train-pdm", "--model", "model", "--stages", "2", "--cache", "cache-data", "--out", "trained",
                        "--steps", "1", "--batch-size", "2", "--draft-vocab", "64", "--anchors", "0,2,4"],
    "simulate-times": lambda w: ["simulate", "--acceptance", 0.5, "--times", w / "times.json", "--stages", "2"],
    "simulate-trace": lambda w: ["simulate", "--trace", w / "report.json", "--times", w / "times.json"],
}


@dataclass
class Case:
    name: str
    command: str  # a key of COMMANDS
    damage: Callable[[Path], None]  # corrupts files in the workspace
    message: str = ""  # a substring the error line must contain


# ---------------------------------------------------------------------------------------------- damage
def cut(relative: str, offset: int | float):
    """Keep the first ``offset`` bytes, or, for a float in (0, 1), that fraction of the file."""
    def damage(w: Path):
        path = w / relative
        raw = path.read_bytes()
        path.write_bytes(raw[: int(offset * len(raw)) if isinstance(offset, float) else offset])
    return damage


def cut_points(rng: random.Random, count: int = TRUNCATIONS) -> list[float]:
    """Seeded random fractions of a file's length: where to cut it."""
    return sorted(round(rng.uniform(0.001, 0.999), 4) for _ in range(count))


def overwrite(relative: str, offset: int, data: bytes):
    def damage(w: Path):
        path = w / relative
        raw = bytearray(path.read_bytes())
        raw[offset: offset + len(data)] = data
        path.write_bytes(bytes(raw))
    return damage


def write(relative: str, data: bytes | str):
    def damage(w: Path):
        path = w / relative
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return damage


def edit_json(relative: str, change: Callable[[object], object]):
    def damage(w: Path):
        path = w / relative
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return damage


def edit_safetensors_header(relative: str, change: Callable[[dict], None]):
    """Rewrite the JSON header (data bytes untouched): a header that lies about the data."""
    def damage(w: Path):
        path = w / relative
        raw = path.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8: 8 + size])
        change(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    return damage


def edit_tensors(relative: str, change: Callable[[dict], None]):
    """Load, change and re-save a safetensors file: a well-formed file with the wrong contents."""
    def damage(w: Path):
        path = w / relative
        tensors = load_file(str(path))
        change(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return damage


def without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def replaced(key, value):
    return lambda d: {**d, key: value}


def first_tensor_key(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def set_in_header(field: str, value):
    def change(header):
        header[first_tensor_key(header)][field] = value
    return change


def gguf_tensor_type(name: str, new_type: int):
    """Patch the storage type of one tensor in a GGUF file's tensor-info table."""
    def damage(w: Path):
        path = w / "tiny.gguf"
        raw = bytearray(path.read_bytes())
        encoded = name.encode()
        at = raw.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
        n_dims = struct.unpack_from("<I", raw, at)[0]
        struct.pack_into("<I", raw, at + 4 + 8 * n_dims, new_type)
        path.write_bytes(bytes(raw))
    return damage


def regguf(**kwargs):
    return lambda w: write_gguf(w / "tiny.gguf", hf_weights(layers=2), **kwargs)


def save_state(change: Callable[[dict], object]):
    def damage(w: Path):
        path = checkpoint_dir(w) / "trainer_state.pt"
        torch.save(change(torch.load(path, weights_only=True)), path)
    return damage


def checkpoint_dir(w: Path) -> Path:
    root = w / "trained" / "checkpoints"
    return root / (root / "latest").read_text().strip()


def in_checkpoint(name: str, damage_of: Callable[[str], Callable[[Path], None]]):
    """Apply a damage built for a workspace-relative path to a file of the latest checkpoint."""
    def damage(w: Path):
        damage_of(str((checkpoint_dir(w) / name).relative_to(w)))(w)
    return damage


# ---------------------------------------------------------------------------------------------- the table
def safetensors_cases(prefix: str, command: str, relative: str, rng: random.Random) -> list[Case]:
    cases = [Case(f"{prefix}-cut-{offset}", command, cut(relative, offset), "safetensors")
             for offset in [0, 4, 8, 100] + cut_points(rng)]
    cases += [
        Case(f"{prefix}-header-size-huge", command, overwrite(relative, 0, struct.pack("<Q", 2 ** 62))),
        Case(f"{prefix}-header-size-past-end", command, lambda w: overwrite(
            relative, 0, struct.pack("<Q", (w / relative).stat().st_size))(w)),
        Case(f"{prefix}-header-size-zero", command, overwrite(relative, 0, struct.pack("<Q", 0))),
        Case(f"{prefix}-header-not-json", command, overwrite(relative, 8, b"\x00\xff{garbage" * 4)),
        Case(f"{prefix}-header-random-bytes", command,
             overwrite(relative, 8, bytes(rng.randrange(256) for _ in range(64)))),
        Case(f"{prefix}-header-a-list", command, overwrite(relative, 8, b"[" + b" " * 30)),
        Case(f"{prefix}-header-dtype-unknown", command, edit_safetensors_header(relative, set_in_header("dtype", "Q9"))),
        Case(f"{prefix}-header-dtype-wider", command, edit_safetensors_header(relative, set_in_header("dtype", "F64"))),
        Case(f"{prefix}-header-shape-lies", command, edit_safetensors_header(relative, set_in_header("shape", [3, 7]))),
        Case(f"{prefix}-header-offsets-past-end", command,
             edit_safetensors_header(relative, set_in_header("data_offsets", [0, 10 ** 9]))),
        Case(f"{prefix}-header-offsets-backwards", command,
             edit_safetensors_header(relative, set_in_header("data_offsets", [64, 0]))),
        Case(f"{prefix}-missing", command, lambda w: (w / relative).unlink()),
        Case(f"{prefix}-is-a-directory", command, lambda w: ((w / relative).unlink(), (w / relative).mkdir())),
    ]
    return cases


def build_cases() -> list[Case]:
    rng = random.Random(SEED)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    cases = safetensors_cases("weights", "generate", "model/model.safetensors", rng)
    cases += [
        Case("weights-int32", "generate", edit_tensors("model/model.safetensors",
                                                       lambda t: t.update({q_proj: t[q_proj].to(torch.int32)})),
             "must be floating point"),
        Case("weights-bool", "generate", edit_tensors("model/model.safetensors",
                                                      lambda t: t.update({q_proj: t[q_proj] > 0})),
             "must be floating point"),
        Case("weights-transposed", "generate", edit_tensors("model/model.safetensors",
                                                            lambda t: t.update({q_proj: t[q_proj].t()[:32]})),
             "has shape"),
        Case("weights-extra-row", "generate", edit_tensors(
            "model/model.safetensors", lambda t: t.update({q_proj: torch.cat([t[q_proj], t[q_proj][:1]])})), "has shape"),
        Case("weights-norm-2d", "generate", edit_tensors(
            "model/model.safetensors", lambda t: t.update({"model.norm.weight": t["model.norm.weight"][None]})),
             "has shape"),
        Case("weights-embedding-short", "generate", edit_tensors(
            "model/model.safetensors",
            lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:100]})), "has shape"),
        Case("weights-missing-tensor", "generate", edit_tensors("model/model.safetensors", lambda t: t.pop(q_proj)),
             q_proj),
        Case("shard-index-not-json", "generate", write("model/model.safetensors.index.json", "{not json")),
        Case("shard-index-no-map", "generate", write("model/model.safetensors.index.json", '{"metadata": {}}')),
        Case("shard-index-map-a-list", "generate", write("model/model.safetensors.index.json", '{"weight_map": []}')),
        Case("shard-index-missing-shard", "generate",
             write("model/model.safetensors.index.json", json.dumps({"weight_map": {q_proj: "gone.safetensors"}}))),
    ]

    # config.json: every required key missing, mistyped values, impossible sizes, not JSON at all.
    config = "model/config.json"
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
        cases.append(Case(f"config-without-{key}", "generate", edit_json(config, without(key))))
    for key, value in [("hidden_size", "sixty-four"), ("hidden_size", None), ("hidden_size", [64]),
                       ("hidden_size", 0), ("num_attention_heads", 0), ("num_attention_heads", -4),
                       ("num_key_value_heads", 3), ("vocab_size", 100), ("hidden_size", 32), ("intermediate_size", 95),
                       ("num_attention_heads", 8), ("rms_norm_eps", "small"), ("max_position_embeddings", "long"),
                       ("eos_token_id", "end"), ("eos_token_id", ["end"]), ("model_type", "gpt2"),
                       ("model_type", 7), ("rope_scaling", {"rope_type": "llama3"}),
                       ("rope_scaling", {"rope_type": "llama3", "factor": "x", "low_freq_factor": 1,
                                         "high_freq_factor": 4, "original_max_position_embeddings": 64}),
                       ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}), ("rope_scaling", "llama3")]:
        cases.append(Case(f"config-{key}-{json.dumps(value)}", "generate", edit_json(config, replaced(key, value))))
    cases += [Case("config-not-json", "generate", write(config, "{'hidden_size': 64")),
              Case("config-a-list", "generate", write(config, "[1, 2]")),
              Case("config-empty", "generate", write(config, "")),
              Case("config-not-utf8", "generate", write(config, b'{"model_type": "\xff\xfe"}')),
              Case("config-missing", "generate", lambda w: (w / config).unlink(), "no config.json")]

    # tokenizer.json and tokenizer_config.json.
    tokenizer, tokenizer_config = "model/tokenizer.json", "model/tokenizer_config.json"
    cases += [Case(f"tokenizer-cut-{offset}", "generate", cut(tokenizer, offset))
              for offset in [0] + cut_points(rng, 6)]
    cases += [
        Case("tokenizer-empty-object", "generate", write(tokenizer, "{}")),
        Case("tokenizer-unknown-model", "generate", edit_json(tokenizer, lambda t: {**t, "model": {"type": "Nope"}})),
        Case("tokenizer-vocab-a-list", "generate",
             edit_json(tokenizer, lambda t: {**t, "model": {**t["model"], "vocab": [1, 2]}})),
        Case("tokenizer-not-utf8", "generate", write(tokenizer, b"\xff\xfe\x00{")),
        Case("tokenizer-ids-past-the-embeddings", "generate",
             edit_json(tokenizer, lambda t: {**t, "model": {**t["model"], "vocab": {**t["model"]["vocab"], "h": 999}}}),
             "not this model's"),
        Case("tokenizer-missing", "generate", lambda w: (w / tokenizer).unlink(), "no tokenizer.json"),
        Case("tokenizer-config-not-json", "generate", write(tokenizer_config, "{chat_template: 1")),
        Case("tokenizer-config-a-list", "generate", write(tokenizer_config, "[]")),
        Case("tokenizer-config-bos-a-number", "generate", edit_json(tokenizer_config, replaced("bos_token", 5))),
        Case("tokenizer-config-template-a-number", "chat", edit_json(tokenizer_config, replaced("chat_template", 5))),
        Case("tokenizer-config-template-broken", "chat",
             edit_json(tokenizer_config, replaced("chat_template", "{% for m in messages %}{{ m['content'] }"))),
        Case("tokenizer-config-template-raises", "chat",
             edit_json(tokenizer_config, replaced("chat_template", "{{ raise_exception('no user turns here') }}")),
             "no user turns here"),
    ]

    # GGUF, as --model (converted into the cache) and through convert-gguf.
    for command in ("gguf-model", "convert"):
        cases += [Case(f"{command}-cut-{offset}", command, cut("tiny.gguf", offset))
                  for offset in [0, 3, 16] + cut_points(rng)]
        cases += [
            Case(f"{command}-bad-magic", command, overwrite("tiny.gguf", 0, b"GGUX")),
            Case(f"{command}-safetensors-bytes", command, lambda w: shutil.copy(w / "model" / "model.safetensors",
                                                                                w / "tiny.gguf")),
            Case(f"{command}-bad-version", command, overwrite("tiny.gguf", 4, struct.pack("<I", 99))),
            Case(f"{command}-tensor-count-huge", command, overwrite("tiny.gguf", 8, struct.pack("<Q", 2 ** 40))),
            Case(f"{command}-kv-count-huge", command, overwrite("tiny.gguf", 16, struct.pack("<Q", 2 ** 40))),
            Case(f"{command}-random-after-header", command,
                 overwrite("tiny.gguf", 24, bytes(rng.randrange(256) for _ in range(256)))),
            Case(f"{command}-unsupported-type-i32", command, gguf_tensor_type("output_norm.weight", 26),
                 "cannot be dequantised"),
            Case(f"{command}-unsupported-type-f64", command, gguf_tensor_type("output_norm.weight", 28)),
            Case(f"{command}-unknown-type-id", command, gguf_tensor_type("output_norm.weight", 250)),
            Case(f"{command}-other-architecture", command, regguf(arch="gpt2"), "architecture"),
            Case(f"{command}-unknown-pre-tokenizer", command, regguf(pre="mystery"), "pre-tokenizer"),
        ]

    # PDM checkpoints given as --pdm.
    cases += safetensors_cases("pdm-weights", "spd", "pdm/pdm.safetensors", rng)
    pdm_weights, pdm_config = "pdm/pdm.safetensors", "pdm/pdm_config.json"
    cases += [
        Case("pdm-agg-wrong-shape", "spd", edit_tensors(pdm_weights, lambda t: t.update(agg_weight=t["agg_weight"][:, :5])),
             "has shape"),
        Case("pdm-vocab-floats", "spd", edit_tensors(pdm_weights, lambda t: t.update(draft_vocab=t["draft_vocab"].float())),
             "integers"),
        Case("pdm-agg-integers", "spd", edit_tensors(pdm_weights, lambda t: t.update(agg_weight=t["agg_weight"].int())),
             "floats"),
        Case("pdm-vocab-out-of-range", "spd", edit_tensors(pdm_weights,
                                                           lambda t: t.update(draft_vocab=t["draft_vocab"] + 10_000)),
             "outside"),
        Case("pdm-missing-head", "spd", edit_tensors(pdm_weights, lambda t: t.pop("draft_head")), "draft_head"),
        Case("pdm-missing-tower", "spd", edit_tensors(pdm_weights, lambda t: t.pop("tower.0.qkv")), "tower.0.qkv"),
        Case("pdm-tower-wrong-shape", "spd", edit_tensors(pdm_weights,
                                                          lambda t: t.update({"tower.0.down": t["tower.0.down"].t()})),
             "has shape"),
    ]
    for key in ("target", "stage_bounds", "anchors", "tower_layers", "draft_vocab_size"):
        cases.append(Case(f"pdm-config-without-{key}", "spd", edit_json(pdm_config, without(key))))
    for key, value in [("target", "tiny"), ("stage_bounds", [[0, 2], [3, 4]]), ("stage_bounds", [[0, 2], [2, 2]]),
                       ("stage_bounds", "0-2,2-4"), ("stage_bounds", []), ("stage_bounds", [[0, 2, 4]]),
                       ("anchors", [1, 2]), ("anchors", [0, 9]), ("anchors", [0, 2, 2]), ("anchors", ["0"]),
                       ("tower_layers", 0), ("tower_layers", "1"), ("tower_layers", 2), ("draft_vocab_size", 63),
                       ("draft_vocab_size", 1.5), ("target", {"hidden_size": 32})]:
        cases.append(Case(f"pdm-config-{key}-{json.dumps(value)}", "spd", edit_json(pdm_config, replaced(key, value))))
    cases += [Case("pdm-config-not-json", "spd", write(pdm_config, "{")),
              Case("pdm-config-extra-key", "spd", edit_json(pdm_config, replaced("learning_rate", 1))),
              Case("pdm-config-a-list", "spd", write(pdm_config, "[]")),
              Case("pdm-config-missing", "spd", lambda w: (w / pdm_config).unlink(), "not a PDM checkpoint")]

    # Eval prompt sets (the earlier report must survive) and teacher-forced answer caches.
    eval_file = "eval.jsonl"
    for name, text in [("not-json", "{turns: [hi]}\n"), ("a-list", "[1, 2]\n"), ("no-turns", '{"question": "hi"}\n'),
                       ("turns-a-string", '{"turns": "hello"}\n'), ("turns-empty", '{"turns": []}\n'),
                       ("turn-a-number", '{"turns": [5]}\n'), ("empty", ""), ("blank-lines", "\n\n"),
                       ("second-line-broken", '{"turns": ["hi"]}\n{"turns": \n'),
                       ("too-long", json.dumps({"turns": ["x" * 600]}) + "\n")]:
        cases.append(Case(f"eval-{name}", "eval", write(eval_file, text)))
    cases += [Case("eval-not-utf8", "eval", write(eval_file, b'{"turns": ["\xff"]}\n'), "not UTF-8"),
              Case("eval-a-directory", "eval", lambda w: ((w / eval_file).unlink(), (w / eval_file).mkdir())),
              Case("eval-missing", "eval", lambda w: (w / eval_file).unlink(), "does not exist")]
    answers = "trained/answers.json"
    cases += [Case("answers-not-json", "answers", write(answers, "{")),
              Case("answers-not-utf8", "answers", write(answers, b"\xff\xfe")),
              Case("answers-cut", "answers", lambda w: (w / answers).write_text(answer_cache(w)[:-20])),
              Case("answers-wrong-types", "answers", lambda w: (w / answers).write_text(json.dumps(
                  mistyped_answers(json.loads(answer_cache(w))))), "damaged")]

    # Training data (the earlier run's outputs must survive).
    train_file = "train.jsonl"
    for name, text in [("not-json", "{messages: []}\n"), ("a-list", "[]\n"), ("messages-a-string", '{"messages": "hi"}\n'),
                       ("message-without-role", '{"messages": [{"content": "hi"}]}\n'),
                       ("content-a-number", '{"messages": [{"role": "user", "content": 5}]}\n'),
                       ("turns-a-number", '{"turns": 5}\n'), ("empty", ""), ("one-word", '{"turns": ["hi"]}\n')]:
        cases.append(Case(f"train-{name}", "train", write(train_file, text)))
    cases += [Case("train-not-utf8", "train", write(train_file, b'{"turns": ["\xff"]}\n'), "not UTF-8"),
              Case("train-a-directory", "train", lambda w: ((w / train_file).unlink(), (w / train_file).mkdir()))]
    cases.append(Case("train-missing", "train", lambda w: (w / train_file).unlink(), "does not exist"))

    # Training checkpoints, resumed with --resume.
    cases += [Case(f"checkpoint-state-cut-{offset}", "resume", in_checkpoint("trainer_state.pt",
                                                                              lambda rel, o=offset: cut(rel, o)),
                   "damaged")
              for offset in [0, 10] + cut_points(rng, 8)]
    cases += [
        Case("checkpoint-state-garbage", "resume",
             in_checkpoint("trainer_state.pt", lambda rel: write(rel, bytes(rng.randrange(256) for _ in range(512)))),
             "damaged"),
        Case("checkpoint-state-a-list", "resume", save_state(lambda s: [1, 2, 3]), "damaged"),
        Case("checkpoint-latest-names-nothing", "resume", write("trained/checkpoints/latest", "step-99999999"),
             "names no checkpoint"),
        Case("checkpoint-latest-empty", "resume", write("trained/checkpoints/latest", ""), "names no checkpoint"),
        Case("checkpoint-state-without-step", "resume", save_state(lambda s: {k: v for k, v in s.items() if k != "step"}),
             "damaged"),
        Case("checkpoint-state-identity-a-string", "resume", save_state(lambda s: {**s, "identity": "x"}), "damaged"),
        Case("checkpoint-state-optimizer-garbage", "resume", save_state(lambda s: {**s, "optimizer": {"state": 5}}),
             "damaged"),
        Case("checkpoint-state-other-run", "resume",
             save_state(lambda s: {**s, "identity": {**s["identity"], "lr": 1.0}}), "cannot resume"),
        Case("checkpoint-weights-cut", "resume", in_checkpoint("pdm.safetensors", lambda rel: cut(rel, 0.5)),
             "corrupt or truncated"),
        Case("checkpoint-weights-garbage", "resume",
             in_checkpoint("pdm.safetensors", lambda rel: overwrite(rel, 0, b"\xff" * 64)), "corrupt or truncated"),
        Case("checkpoint-config-not-json", "resume", in_checkpoint("pdm_config.json", lambda rel: write(rel, "{")),
             "not valid JSON"),
    ]

    # build-data feature caches, read by train-pdm --cache (the earlier run's outputs must survive).
    manifest, text, features = "cache-data/manifest.json", "cache-data/shard-00000.jsonl.gz", \
        "cache-data/shard-00000.features.npy"
    cases += [Case(f"cache-features-cut-{offset}", "cache", cut(features, offset)) for offset in [0] + cut_points(rng, 6)]
    cases += [Case(f"cache-text-cut-{offset}", "cache", cut(text, offset)) for offset in [0] + cut_points(rng, 4)]
    cases += [
        Case("cache-features-garbage", "cache", overwrite(features, 0, b"\x00" * 64)),
        Case("cache-features-wrong-shape", "cache", lambda w: np.save(w / features, np.zeros((3, 5, 64), np.uint16))),
        Case("cache-features-missing", "cache", lambda w: (w / features).unlink()),
        Case("cache-text-garbage", "cache", write(text, b"\x1f\x8b garbage")),
        Case("cache-manifest-not-json", "cache", write(manifest, "{")),
        Case("cache-manifest-missing", "cache", lambda w: (w / manifest).unlink()),
        Case("cache-manifest-without-shards", "cache", edit_json(manifest, without("shards"))),
        Case("cache-manifest-shard-without-file", "cache",
             edit_json(manifest, lambda m: {**m, "shards": [without("file")(m["shards"][0])] + m["shards"][1:]})),
        Case("cache-manifest-shards-of-numbers", "cache", edit_json(manifest, replaced("shards", [1, 2]))),
        Case("cache-manifest-other-model", "cache",
             edit_json(manifest, lambda m: {**m, "model": {**m["model"], "hidden_size": 32}})),
        Case("cache-manifest-other-layers", "cache", edit_json(manifest, replaced("feature_layers", [0, 4]))),
    ]

    # simulate's inputs.
    cases += [Case("times-not-json", "simulate-times", write("times.json", "{")),
              Case("times-empty-layers", "simulate-times", write("times.json", json.dumps(step_times(layer_ms=[])))),
              Case("times-wrong-type", "simulate-times", write("times.json", json.dumps(step_times(head_ms="fast")))),
              Case("trace-not-a-report", "simulate-trace", lambda w: (w / "times.json").write_text(
                  json.dumps(step_times())))]
    return cases


def answer_cache(w: Path) -> str:
    """A well-formed answers cache for the "answers" command, made by running it."""
    path = w / "trained" / "answers.json"
    code, _, err = run_main(COMMANDS["answers"](w))
    assert code == 0, err
    return path.read_text()


def mistyped_answers(cache: dict) -> dict:
    first = next(iter(cache["answers"]))
    cache["answers"][first][0] = ["x"]
    return cache


def step_times(**overrides) -> dict:
    return {"layer_ms": [1.0] * 4, "head_ms": 0.5, "verify_ms": 0.2, "pdm_ms": {"2": 1.0}, "hidden_size": 64,
            "dtype_bytes": 4, **overrides}


CASES = build_cases()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, originals, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(originals, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("SPD_ENGINE_CACHE", str(work / "cache"))
    case.damage(work)
    before = snapshot(work)
    code, out, err = run_main(COMMANDS[case.command](work))
    assert (code, out) == (2, ""), err
    assert err.startswith("spd-engine: error: ") and err.count("\n") == 1, err
    assert case.message in err
    assert snapshot(work) == before  # nothing written: no partial outputs, earlier outputs intact


# The issue's own reports (a corrupt pdm.safetensors, a garbage .gguf as --model and to convert-gguf) and a bad
# flag, as real processes: the entry point itself must print one line and exit 2.
SUBPROCESS_CASES = ["pdm-weights-header-size-huge", "gguf-model-bad-magic", "convert-bad-magic",
                    "config-hidden_size-null"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(name, originals, tmp_path):
    case = next(case for case in CASES if case.name == name)
    work = tmp_path / "w"
    shutil.copytree(originals, work)
    case.damage(work)
    before = snapshot(work)
    env = dict(SUBPROCESS_ENV, SPD_ENGINE_CACHE=str(work / "cache"))
    proc = subprocess.run([sys.executable, "-m", "spd_engine", *map(str, COMMANDS[case.command](work))], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.startswith("spd-engine: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert snapshot(work) == before


def test_bad_flag_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spd_engine", "generate", "--max-new-tokens", "many"], cwd=tmp_path,
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("spd-engine: error: argument --max-new-tokens: invalid int value: 'many'")
