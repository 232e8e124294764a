"""Distributed SPD over torch.distributed (gloo on the CPU).

* Launched by torchrun, the output is token for token that of single-process SPD and of vanilla decoding, on
  both layouts (n + 1 ranks, and n ranks with stage 1 on rank 0), greedy and sampled, with an untrained PDM
  that rejects often so the distributed rollback runs.
* Faults and bad configurations: the ranks are started here one process each, with the environment torchrun
  would give them. torchrun's agent kills the survivors as soon as one rank fails, which would hide what is
  under test: that every rank gets out by itself, non-zero, with one clear line, within the timeout.
"""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from spd_engine import Engine
from spd_engine.cli import build_parser
from spd_engine.pdm import PDM
from spd_engine.stages import partition_layers
from tiny_models import make_tiny_model

PROMPT = "hello world"
LAUNCH_LIMIT_S = 180  # a whole launch; far above what one takes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("dist"), "llama", layers=5)


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    return Engine.load(str(tiny_dir), device="cpu")


def generate_args(model, stages, *extra):
    return ["generate", "--distributed", "--mode", "spd", "--model", str(model), "--stages", str(stages),
            "--prompt", PROMPT, *map(str, extra)]


def torchrun(ranks, *args):
    """The documented launch; returns rank 0's JSON output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "spd_engine", *map(str, args), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def start_ranks(world_size, *args):
    """One process per rank, as torchrun starts them (its agent left out: see the module docstring)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen([sys.executable, "-m", "spd_engine", *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return ranks


def wait_all(ranks, limit_s):
    """(exit codes, stderr texts, seconds until the last exit); kills whatever outlives ``limit_s``."""
    start = time.monotonic()
    codes = []
    for proc in ranks:
        try:
            codes.append(proc.wait(timeout=max(0.1, limit_s - (time.monotonic() - start))))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(f"still running after {limit_s}s")
    elapsed = time.monotonic() - start
    return codes, [proc.stderr.read().decode() for proc in ranks], elapsed


def wait_for_output(proc, limit_s=60):
    """Block until rank 0 streams its first generated text: generation is under way."""
    ready, _, _ = select.select([proc.stdout], [], [], limit_s)
    assert ready and os.read(proc.stdout.fileno(), 1), "rank 0 never started generating"


def assert_one_line_error(stderr, rank):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith(f"spd-engine: error: rank {rank}: "), stderr


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("stages", [2, 3])
def test_dedicated_ranks_match_single_process_and_vanilla(tiny_dir, tiny_engine, stages):
    out = torchrun(stages + 1, *generate_args(tiny_dir, stages, "--pdm", "untrained", "--max-new-tokens", 24))
    single = tiny_engine.generate(PROMPT, mode="spd", stages=stages, pdm="untrained", max_new_tokens=24)
    vanilla = tiny_engine.generate(PROMPT, max_new_tokens=24)
    assert out["token_ids"] == single.token_ids == vanilla.token_ids
    stats = out["stats"]
    assert (stats["layout"], stats["world_size"], stats["stages"]) == ("dedicated", stages + 1, stages)
    for key in ("cycles", "accepted_drafts", "rejected_drafts"):
        assert stats[key] == getattr(single.stats, key), key
    assert stats["rejected_drafts"] > 0  # flushes, so every rank rolled its cache back


def test_hosted_layout_sampling_matches_single_process(tiny_dir, tiny_engine):
    """n ranks: rank 0 runs stage 1 as well. At T=1 drafts are accepted and rejected, and every random draw
    is rank 0's, so a seed fixes the output exactly as in one process."""
    sampling = ("--temperature", 1.0, "--seed", 7, "--max-new-tokens", 32)
    out = torchrun(3, *generate_args(tiny_dir, 3, "--pdm", "untrained", *sampling))
    single = tiny_engine.generate(PROMPT, mode="spd", stages=3, pdm="untrained", max_new_tokens=32,
                                  temperature=1.0, seed=7)
    assert out["token_ids"] == single.token_ids
    assert out["stats"]["layout"] == "hosted"
    assert out["stats"]["cycles"] == single.stats.cycles
    assert out["stats"]["accepted_drafts"] > 0 and out["stats"]["rejected_drafts"] > 0


def test_default_model_matches_vanilla():
    try:
        engine = Engine.load("default", device="cpu", dtype="float32")
    except Exception as exc:  # the default model's wheel is optional
        pytest.skip(f"default model unavailable: {exc}")
    prompt = "Write a haiku about the sea."
    out = torchrun(3, "generate", "--distributed", "--mode", "spd", "--stages", 2, "--pdm", "untrained",
                   "--prompt", prompt, "--chat", "--max-new-tokens", 16)
    assert out["token_ids"] == engine.generate(prompt, chat=True, max_new_tokens=16).token_ids


# ------------------------------------------------------------------------------------------ faults
def test_killed_worker_ends_every_other_rank(tiny_dir):
    ranks = start_ranks(3, *generate_args(tiny_dir, 2, "--pdm", "untrained", "--max-new-tokens", 400))
    wait_for_output(ranks[0])
    ranks[2].kill()
    codes, errors, elapsed = wait_all(ranks[:2], limit_s=20)
    ranks[2].wait()
    assert codes == [1, 1], errors
    for rank, stderr in enumerate(errors):
        assert_one_line_error(stderr, rank)
    assert elapsed < 20


CLI_HAS_DIST_TIMEOUT = not build_parser().parse_known_args(
    ["generate", "--prompt", "x", "--dist-timeout", "1"])[1]


@pytest.mark.skipif(not CLI_HAS_DIST_TIMEOUT, reason="cli.py does not register --dist-timeout yet: it needs "
                                                     "spd_engine.runtime.distributed.add_arguments(gen)")
def test_stalled_worker_times_out_every_other_rank(tiny_dir):
    timeout = 3
    ranks = start_ranks(3, *generate_args(tiny_dir, 2, "--pdm", "untrained", "--max-new-tokens", 400,
                                          "--dist-timeout", timeout))
    wait_for_output(ranks[0])
    ranks[1].send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can notice
    try:
        codes, errors, elapsed = wait_all([ranks[0], ranks[2]], limit_s=timeout + 10)
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert codes == [1, 1], errors
    assert_one_line_error(errors[0], 0)
    assert_one_line_error(errors[1], 2)
    assert elapsed < timeout + 10


# ------------------------------------------------------------------------------------------ bad configurations
def refused_everywhere(world_size, args, message):
    codes, errors, _ = wait_all(start_ranks(world_size, *args), limit_s=60)
    assert codes == [2] * world_size, errors
    for rank, stderr in enumerate(errors):
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("spd-engine: error: ") and message in lines[0], stderr


def test_more_stages_than_ranks_is_refused_on_every_rank(tiny_dir):
    refused_everywhere(2, generate_args(tiny_dir, 4, "--pdm", "untrained"), "4 stages run on 5 ranks")


def test_mismatched_pdm_is_refused_on_every_rank(tiny_dir, tiny_engine, tmp_path):
    pdm_dir = PDM.create(tiny_engine.model, partition_layers(5, stage_layers=[3, 2])).save(tmp_path / "pdm")
    args = ["generate", "--distributed", "--mode", "spd", "--model", tiny_dir, "--stage-layers", "2,3",
            "--pdm", pdm_dir, "--prompt", PROMPT]
    refused_everywhere(2, args, "PDM was trained for stage layers 3,2")
