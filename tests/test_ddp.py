"""Data-parallel training and data building under torchrun, gloo on the CPU (``pytest -k ddp``).

* 2 ranks train exactly what 1 rank trains on the same global batch: bit for bit when the one rank accumulates
  the same two shares (gloo's sum of two gradients is the accumulation's sum), within float32 tolerance when
  it takes the whole batch in one pass (other summation order inside the matmuls).
* A 2-rank checkpoint resumes on 1 rank: bit-identical to an uninterrupted run with the same pieces, within
  tolerance with the whole batch per pass.
* Killing a rank makes the other exit 1 with one line within the timeout; the checkpoint it leaves loads.
* 2 ranks build the same data set as 1 process, byte for byte.
"""
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from spd_engine.cli import main
from spd_engine.distill_data import MANIFEST_FILE, build_data
from spd_engine.pdm import WEIGHTS_FILE
from spd_engine.prompt_gen import make_prompt
from spd_engine.train import CHECKPOINT_DIR, TRAINER_STATE_FILE, TrainOptions, latest_checkpoint, train_pdm

pytestmark = pytest.mark.usefixtures("one_thread")
LAUNCH_LIMIT_S = 180
# 1 rank over the whole batch vs 2 ranks over halves: only float summation order differs, but AdamW divides each
# gradient by its own running RMS, so a rounding difference in a near-zero gradient can move its weight by a
# sizeable part of one step (lr 3e-3). Measured: at most 2.7e-5 on weights of size ~1 after 6 steps.
WHOLE_BATCH_TOLERANCE = dict(rtol=0, atol=1e-4)
TRAIN = dict(stages=2, steps=6, batch_size=4, lr=3e-3, draft_vocab=128, val_fraction=0.2, checkpoint_every=2,
             fill_mix="regime", normalize_anchors=True, max_rows=96)
DATA = dict(prompts=10, shard_size=3, seed=0, answer_tokens=12, batch=3, feature_layers=[0, 1, 2, 3, 4])


def cli_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [] if value is False else [flag, str(value)]
    return flags


def train_args(tiny_dir, cache_dir, out, **overrides) -> list[str]:
    return ["train-pdm", "--distributed", "--model", str(tiny_dir), "--cache", str(cache_dir), "--out", str(out),
            *cli_flags({**TRAIN, **overrides})]


def start_ranks(world_size, args, timeout_s=30):
    """One process per rank with the environment torchrun gives (its agent left out: it would kill the
    survivors of a fault itself, hiding what is under test). ``args``: a list, or a function of the rank."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    args_of = args if callable(args) else lambda rank: args
    return [subprocess.Popen([sys.executable, "-m", "spd_engine", *args_of(rank), "--dist-timeout", str(timeout_s)],
                             env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for rank in range(world_size)]


def torchrun(world_size, args):
    """The documented launch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
           "-m", "spd_engine", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_LIMIT_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(out):
    return load_file(str(out / WEIGHTS_FILE))


def assert_weights_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_weights_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **WHOLE_BATCH_TOLERANCE, msg=key)


def one_rank(engine, cache_dir, out, **overrides):
    return train_pdm(engine, TrainOptions(data=[], out=str(out), cache=[str(cache_dir)], **{**TRAIN, **overrides}),
                     progress=False)


@pytest.fixture(scope="module")
def two_rank_run(tiny_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    torchrun(2, train_args(tiny_dir, cache_dir, out, json=True))
    return out


# ------------------------------------------------------------------------------------------ equality
def test_ddp_two_ranks_train_what_one_rank_trains(engine, cache_dir, two_rank_run, tmp_path):
    report = json.loads((two_rank_run / "train_report.json").read_text())
    assert report["ranks"] == 2 and report["steps"] == 6
    same_pieces = one_rank(engine, cache_dir, tmp_path / "micro", micro_batch=2)
    whole = one_rank(engine, cache_dir, tmp_path / "whole")
    assert_weights_equal(weights(two_rank_run), weights(tmp_path / "micro"))
    assert_weights_close(weights(two_rank_run), weights(tmp_path / "whole"))
    # the global tallies: every answer token counted once, whatever the split
    assert report["answer_tokens_seen"] == same_pieces["answer_tokens_seen"] == whole["answer_tokens_seen"]
    val, single_val = report["val"], whole["val"]
    assert val["answer_tokens"] == single_val["answer_tokens"]
    for fill, acceptance in val["acceptance_by_fill"].items():
        assert abs(acceptance - single_val["acceptance_by_fill"][fill]) < 0.02


# ------------------------------------------------------------------------------------------ faults and resume
def assert_one_line_error(stderr, rank):
    """Ends with one error line (rank 0's progress bar may share its terminal line: tqdm ends none)."""
    assert "Traceback" not in stderr, stderr
    assert stderr.count("spd-engine: error:") == 1, stderr
    last = stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert f"spd-engine: error: rank {rank}: " in last and last.endswith("another rank died or stalled"), stderr


@pytest.mark.parametrize("killed", [1, 0])
def test_ddp_killed_rank_ends_the_other_and_its_checkpoint_resumes_on_one_rank(tiny_dir, cache_dir, engine,
                                                                             tmp_path, killed):
    """A long 2-rank run loses a rank once a checkpoint exists: the survivor exits 1 with one line within the
    timeout. The checkpoint (rank 0 may have been writing the next one) is whole and resumes on 1 rank: bit for
    bit the uninterrupted run with the same pieces (1 rank accumulating the 2 shares), within tolerance over
    whole batches."""
    steps, timeout = 30, 10
    run = dict(steps=steps, checkpoint_every=1)
    out = tmp_path / "killed"
    ranks = start_ranks(2, train_args(tiny_dir, cache_dir, out, **run), timeout_s=timeout)
    deadline = time.monotonic() + LAUNCH_LIMIT_S
    while latest_checkpoint(out) is None and time.monotonic() < deadline and ranks[1 - killed].poll() is None:
        time.sleep(0.02)
    ranks[killed].kill()
    survivor = ranks[1 - killed]
    started = time.monotonic()
    try:
        code = survivor.wait(timeout=timeout + 10)
    finally:
        survivor.kill()
    elapsed = time.monotonic() - started
    ranks[killed].wait()
    stderr = survivor.stderr.read()
    assert code == 1, stderr
    assert_one_line_error(stderr, 1 - killed)
    assert elapsed < timeout + 10

    checkpoint = latest_checkpoint(out)  # what "latest" names is complete, whatever was being written
    state = torch.load(checkpoint / TRAINER_STATE_FILE, weights_only=True)
    assert 1 <= state["step"] < steps  # interrupted mid-run
    load_file(str(checkpoint / WEIGHTS_FILE))
    if killed == 1:  # one resume check is enough
        return

    whole_batches = tmp_path / "resumed_whole"
    shutil.copytree(out / CHECKPOINT_DIR, whole_batches / CHECKPOINT_DIR)
    resumed = one_rank(engine, cache_dir, out, resume=True, micro_batch=2, **run)
    uninterrupted = one_rank(engine, cache_dir, tmp_path / "uninterrupted", micro_batch=2, **run)
    assert resumed["steps"] == uninterrupted["steps"] == steps
    assert_weights_equal(weights(out), weights(tmp_path / "uninterrupted"))
    one_rank(engine, cache_dir, whole_batches, resume=True, **run)
    assert_weights_close(weights(whole_batches), weights(tmp_path / "uninterrupted"))


# ------------------------------------------------------------------------------------------ mistakes
def test_ddp_mistakes_are_one_line_errors_on_every_rank(tiny_dir, cache_dir, tmp_path, capsys):
    assert main(train_args(tiny_dir, cache_dir, tmp_path / "a")) == 2  # not under torchrun
    assert capsys.readouterr().err.startswith("spd-engine: error: --distributed runs under torchrun")
    for args, message in ((train_args(tiny_dir, cache_dir, tmp_path / "b", batch_size=1), "the global batch"),
                          (["train-pdm", "--distributed", "--model", str(tiny_dir), "--data", "chats.jsonl",
                            "--stages", "2", "--out", str(tmp_path / "c")], "trains from a feature cache")):
        ranks = start_ranks(2, args)
        for rank in ranks:
            stderr = rank.communicate(timeout=LAUNCH_LIMIT_S)[1]
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert rank.returncode == 2 and len(lines) == 1, stderr
            assert lines[0].startswith("spd-engine: error: ") and message in lines[0], stderr


def test_ddp_a_mistake_one_rank_sees_refuses_the_run_on_every_rank(tiny_dir, cache_dir, tmp_path):
    """Only rank 1's cache path is missing (a machine without the shared file system): rank 1 says why, rank 0
    that rank 1 refused; both exit 2 with one line, without waiting for the timeout."""
    good = train_args(tiny_dir, cache_dir, tmp_path / "out")
    bad = train_args(tiny_dir, tmp_path / "nowhere", tmp_path / "out")
    ranks = start_ranks(2, lambda rank: bad if rank == 1 else good, timeout_s=LAUNCH_LIMIT_S)
    messages = ["rank 1 refused the run: ", "has no manifest.json"]
    for rank, message in zip(ranks, messages):
        stderr = rank.communicate(timeout=LAUNCH_LIMIT_S / 2)[1]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert rank.returncode == 2 and len(lines) == 1, stderr
        assert lines[0].startswith("spd-engine: error: ") and message in lines[0], stderr


# ------------------------------------------------------------------------------------------ data building
def test_ddp_data_build_equals_one_process(tiny_dir, engine, tmp_path):
    """4 shards over 2 ranks (each builds 2, dealt round-robin): the same files, byte for byte, and the same
    manifest as one process; a rerun finds nothing left to do."""
    single, shared = tmp_path / "single", tmp_path / "shared"
    build_data(engine, single, progress=False, **DATA)
    args = ["build-data", "--distributed", "--model", str(tiny_dir), "--out", str(shared), "--json",
            "--feature-layers", ",".join(map(str, DATA["feature_layers"])),
            *cli_flags({k: v for k, v in DATA.items() if k != "feature_layers"})]
    torchrun(2, args)
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in shared.iterdir())
    for path in single.iterdir():
        if path.name != MANIFEST_FILE:
            assert path.read_bytes() == (shared / path.name).read_bytes(), path.name
    strip = lambda m: {**m, "shards": [{k: v for k, v in s.items() if k != "seconds"} for s in m["shards"]]}  # noqa
    manifest = json.loads((shared / MANIFEST_FILE).read_text())
    assert strip(manifest) == strip(json.loads((single / MANIFEST_FILE).read_text()))
    ids = []
    for shard in manifest["shards"]:
        with gzip.open(shared / shard["file"], "rt") as handle:
            ids += [json.loads(line)["id"] for line in handle]
    assert ids == [make_prompt(DATA["seed"], i).id for i in range(DATA["prompts"])]  # every prompt once, in order
    before = {p.name: p.stat().st_mtime_ns for p in shared.iterdir() if p.name != MANIFEST_FILE}
    torchrun(2, args)
    assert before == {p.name: p.stat().st_mtime_ns for p in shared.iterdir() if p.name != MANIFEST_FILE}
