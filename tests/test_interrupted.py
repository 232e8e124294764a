"""Interrupted work: `train-pdm` and `convert-gguf` killed with SIGKILL at seeded random points.

After each kill, nothing partial may pass for complete: a PDM or model directory that looks finished must load
and equal the uninterrupted run's. A rerun (`train-pdm --resume`, or `convert-gguf` again) must then finish with
files byte-identical to an uninterrupted run's. Kill points are drawn inside the phases that write files: after
a seeded number of training checkpoints, or once the conversion's staging directory appears, plus a seeded
delay of a few milliseconds; one conversion is killed anywhere in its run.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spd_engine.gguf_convert import MODEL_FILES
from spd_engine.pdm import CONFIG_FILE, WEIGHTS_FILE
from test_gguf_convert import hf_weights, write_gguf
from tiny_models import SUBPROCESS_ENV, make_tiny_model, write_tiny_chats

pytestmark = pytest.mark.slow

SEED = 19
KILLS = 3
STEPS = 12


def spd_engine(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spd_engine", *map(str, args)], cwd=cwd, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def kill_when(proc: subprocess.Popen, ready, delay_s: float, timeout_s: float = 300) -> bool:
    """SIGKILL ``proc`` ``delay_s`` after ``ready()`` first holds; False if it finished before that."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.0005)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def files(directory: Path) -> dict[str, bytes]:
    """The visible files of ``directory`` (hidden names are temporary files nothing ever reads)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".")}


# ---------------------------------------------------------------------------------------------- train-pdm
@pytest.fixture(scope="module")
def training_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    make_tiny_model(root / "model", "llama", layers=4)
    write_tiny_chats(root / "train.jsonl", count=32, seed=SEED)
    return root


def train_args(out: str, *extra) -> list:
    # Relative paths: the run's identity (checked by --resume) is the same in every directory it runs from.
    return ["train-pdm", "--model", "model", "--stages", 2, "--data", "train.jsonl", "--out", out, "--steps", STEPS,
            "--checkpoint-every", 1, "--seq-len", 32, "--batch-size", 2, "--draft-vocab", 64, *extra]


def checkpoint_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_train_pdm_killed_then_resumed_equals_an_uninterrupted_run(training_inputs):
    finish(spd_engine(*train_args("straight"), cwd=training_inputs))
    straight = files(training_inputs / "straight")
    assert {WEIGHTS_FILE, CONFIG_FILE, "train_report.json"} <= set(straight)

    rng = random.Random(SEED)
    for attempt in range(KILLS):
        out_name = f"killed-{attempt}"
        out = training_inputs / out_name
        after_step, delay = rng.randrange(1, STEPS), rng.uniform(0, 0.05)
        proc = spd_engine(*train_args(out_name), cwd=training_inputs)
        killed = kill_when(proc, lambda: checkpoint_step(out) >= after_step, delay)
        if killed:
            left = files(out)
            if WEIGHTS_FILE in left and CONFIG_FILE in left:  # looks finished: it must be the finished PDM
                assert left[WEIGHTS_FILE] == straight[WEIGHTS_FILE] and left[CONFIG_FILE] == straight[CONFIG_FILE]
        finish(spd_engine(*train_args(out_name, "--resume"), cwd=training_inputs))
        resumed = files(out)
        assert resumed[WEIGHTS_FILE] == straight[WEIGHTS_FILE], f"kill after step {after_step}"
        assert resumed[CONFIG_FILE] == straight[CONFIG_FILE]
        assert set(resumed) == set(straight)


# ---------------------------------------------------------------------------------------------- convert-gguf
def test_convert_gguf_killed_then_rerun_equals_an_uninterrupted_run(tmp_path):
    gguf_file = write_gguf(tmp_path / "model.gguf", hf_weights(seed=1, hidden=256, ffn=512, layers=6))
    started = time.monotonic()
    finish(spd_engine("convert-gguf", gguf_file, tmp_path / "straight", cwd=tmp_path))
    run_s = time.monotonic() - started
    straight = files(tmp_path / "straight")
    assert set(straight) == set(MODEL_FILES)

    rng = random.Random(SEED)
    for attempt in range(KILLS):
        out = tmp_path / f"killed-{attempt}"
        proc = spd_engine("convert-gguf", gguf_file, out, cwd=tmp_path)
        if attempt == 0:  # anywhere in the run
            kill_when(proc, lambda: True, rng.uniform(0, run_s))
        else:  # while the output is being written (a window of milliseconds)
            kill_when(proc, lambda: any(p.name.startswith(f".{out.name}.partial-") for p in tmp_path.iterdir()),
                      rng.uniform(0, 0.005))
        if out.exists():  # published before the kill: then it is whole
            assert files(out) == straight
            continue
        finish(spd_engine("convert-gguf", gguf_file, out, cwd=tmp_path))
        assert files(out) == straight
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.partial-")]  # the rerun cleaned up
