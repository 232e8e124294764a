"""Graphed execution (spd_engine/runtime/graph.py): the choice of mode, reading back every k cycles, the eager
fallback when capture fails; on a GPU, graphed decoding equals eager decoding token for token."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA, requires_cuda
from spd_engine.cli import main
from spd_engine.decode import generate_vanilla
from spd_engine.errors import UserError
from spd_engine.model import Model
from spd_engine.pdm import PDM
from spd_engine.runtime import graph
from spd_engine.sampling import SamplingParams
from spd_engine.modes.base import run_decoder
from spd_engine.spd import SPDState, generate_spd
from spd_engine.stages import partition_layers
from tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 6, 7, 8, 9, 10]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("graph"), "llama", layers=4)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return Model.from_pretrained(tiny_dir)


def test_graph_mode_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not graph.use_graphs("auto", cpu) and graph.use_graphs("auto", cuda)
    assert graph.use_graphs("on", cuda) and not graph.use_graphs("off", cuda)
    with pytest.raises(UserError, match="--graph on needs a CUDA device"):
        graph.use_graphs("on", cpu)
    with pytest.raises(UserError, match="--graph must be one of"):
        graph.use_graphs("sometimes", cpu)


def test_graph_on_without_a_gpu_is_a_one_line_error(tiny_dir, capsys):
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    code = main(["generate", "--model", str(tiny_dir), "--device", "cpu", "--prompt", "hi", "--graph", "on",
                 "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["spd-engine: error: --graph on needs a CUDA device (--device cuda); use --graph auto "
                                 "or off"]


@pytest.mark.parametrize("stages", [1, 3])
def test_reading_back_every_k_cycles_changes_nothing(model, stages):
    """Cycles run in batches past the last token; the per-cycle history still gives the exact tokens, cycle
    count and trace of reading back after every cycle."""
    pdm = PDM.create(model, partition_layers(4, stages))
    results = []
    for every in (1, 5):
        state = SPDState(model, pdm, 128, GREEDY)
        results.append(run_decoder(state, "spd", PROMPT, 11, GREEDY, eos_ids=(), readback=every))
    (one, batched) = results
    assert batched.token_ids == one.token_ids and batched.trace == one.trace
    for key in ("cycles", "accepted_drafts", "rejected_drafts", "new_tokens"):
        assert getattr(batched.stats, key) == getattr(one.stats, key), key
    assert one.stats.cycles >= 10 and one.trace  # verification ran


def test_failed_capture_falls_back_to_eager_with_one_warning(model, capsys):
    """On this CPU, capture fails at once (no CUDA streams); the cycle it returns is the eager one."""
    if HAS_CUDA:
        pytest.skip("capture works on this machine")
    pdm = PDM.create(model, partition_layers(4, 2))
    state = SPDState(model, pdm, 128, GREEDY)
    eager = run_decoder(SPDState(model, pdm, 128, GREEDY), "spd", PROMPT, 9, GREEDY, eos_ids=())
    fallback = run_decoder(state, "spd", PROMPT, 9, GREEDY, eos_ids=(), graphed=True, readback=3)
    assert fallback.token_ids == eager.token_ids and fallback.trace == eager.trace
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("spd-engine: warning: CUDA graph capture of the SPD cycle "
                                                         "failed") and warnings[0].endswith("running eagerly")
    assert type(state.lanes) is graph.Lanes  # the eager lanes are back


def test_vanilla_greedy_equals_the_prefill_argmax_chain(model):
    """The static decode step reproduces a plain full-recompute argmax chain."""
    out = generate_vanilla(model, PROMPT, 6, GREEDY, eos_ids=())
    ids = list(PROMPT)
    with torch.inference_mode():
        for _ in range(6):
            hidden = model.forward_layers(model.embed(torch.tensor([ids])), 0, 4, model.new_cache(64))
            ids.append(int(model.logits(hidden[:, -1]).argmax()))
    assert out.token_ids == ids[len(PROMPT):]


def gpu_model(kind: str, tiny_dir) -> Model:
    """'reference': head dim 16, so attention runs the torch reference; 'kernels': bench/random_model.py's
    tiny shape (head dim 64, bf16), so the CUDA / Triton attention kernels and their plans run."""
    if kind == "reference":
        return Model.from_pretrained(tiny_dir, device="cuda")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import random_model

    return random_model.random_model("tiny", torch.device("cuda"), torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", ["reference", "kernels"])
@pytest.mark.parametrize("mode,stages", [("vanilla", None), ("spd", 1), ("spd", 3)])
def test_graphed_equals_eager_on_the_gpu(tiny_dir, mode, stages, kind):
    """Greedy, with an untrained PDM (rejections, flushes and rollbacks in almost every cycle)."""
    model = gpu_model(kind, tiny_dir)
    outputs = {}
    for mode_flag in ("off", "on"):
        if mode == "vanilla":
            outputs[mode_flag] = generate_vanilla(model, PROMPT, 40, GREEDY, eos_ids=(), graph=mode_flag)
        else:
            pdm = PDM.create(model, partition_layers(model.config.num_layers, stages))
            outputs[mode_flag] = generate_spd(model, pdm, PROMPT, 40, GREEDY, eos_ids=(), graph=mode_flag)
    assert outputs["on"].token_ids == outputs["off"].token_ids
    assert outputs["on"].trace == outputs["off"].trace


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["vanilla", "spd"])
def test_graphed_sampling_captures_and_repeats_per_seed(tiny_dir, mode, capsys):
    """The noise generator is registered with the graph: capture succeeds (no fallback warning), a seed
    repeats its tokens, and replays draw fresh numbers (a different seed gives different tokens)."""
    model = gpu_model("kernels", tiny_dir)
    pdm = PDM.create(model, partition_layers(model.config.num_layers, 2))

    def sample(seed):
        params = SamplingParams(temperature=1.0, seed=seed)
        if mode == "vanilla":
            return generate_vanilla(model, PROMPT, 32, params, eos_ids=(), graph="on").token_ids
        return generate_spd(model, pdm, PROMPT, 32, params, eos_ids=(), graph="on").token_ids

    first, again, other = sample(1), sample(1), sample(2)
    assert "warning" not in capsys.readouterr().err
    assert first == again and first != other
