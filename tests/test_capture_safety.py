"""Capture safety, proved on the CPU: the code a CUDA graph replays compiles whole, with no graph break.

A graph break is where torch.compile must hand control back to Python: a host sync (``.item()``, a 0-d index,
a data-dependent shape), a generator, an unsupported call. Each one would either be frozen into a CUDA graph
or make capture fail, so zero breaks is the CPU stand-in for "capturable". The checks run the GPU code path:
attention over the whole capacity under a mask, never sliced to a live length (the CPU-only shortcut).
Both ``torch._dynamo.explain`` and a ``fullgraph=True`` compile are asked; the latter also refuses breaks that
explain does not count (a generator call, for one).
"""
from __future__ import annotations

import pytest
import torch

from spd_engine.decode import cache_capacity, prefill
from spd_engine.modes.vanilla import VanillaStep
from spd_engine.model import Model
from spd_engine.ops import reference
from spd_engine.pdm import PDM
from spd_engine.sampling import SamplingParams, next_token
from spd_engine.spd import SPDState
from spd_engine.stages import partition_layers
from tiny_models import make_tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

PROMPT = [5, 6, 7, 8, 9]
GREEDY, SAMPLING = SamplingParams(), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=0)


@pytest.fixture(autouse=True)
def gpu_attention_path(monkeypatch):
    """The capacity-masked attention that runs on a GPU, on the CPU too."""
    monkeypatch.setattr(reference, "attention_live_length", reference.attention_capacity_masked)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return Model.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("capture"), "qwen3", layers=3),
                                 backend="torch")


def assert_no_graph_break(fn) -> None:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)()
    reasons = [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and not reasons, reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    torch.compile(fn, backend="aot_eager", fullgraph=True)()  # raises on any break


def started_spd(model, params, stages) -> SPDState:
    pdm = PDM.create(model, partition_layers(model.config.num_layers, stages))
    state = SPDState(model, pdm, cache_capacity(len(PROMPT), 16, extra=stages + 2), params)
    with torch.inference_mode():
        first = next_token(state.prefill(PROMPT), params, state.generator)
        state.start(first, len(PROMPT))
        for _ in range(stages):  # a full pipeline: every stage active, verification running
            state.cycle()
    return state


@pytest.mark.parametrize("params", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
@pytest.mark.parametrize("stages", [1, 3])
def test_spd_cycle_compiles_without_graph_breaks(model, params, stages):
    state = started_spd(model, params, stages)
    if state.noise is not None:
        state.noise.refill()  # the cycle's one generator call, which the CUDA graph registers instead
    with torch.inference_mode():
        assert_no_graph_break(state.step)


@pytest.mark.parametrize("params", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_vanilla_step_compiles_without_graph_breaks(model, params):
    cache = model.new_cache(64)
    step = VanillaStep(model, cache, params)
    with torch.inference_mode():
        step.start(next_token(prefill(model, cache, PROMPT), params, step.generator), len(PROMPT))
        if step.noise is not None:
            step.noise.refill()
        assert_no_graph_break(step.step)


def test_the_check_catches_a_host_sync(model):
    """The 0-d tensor index this suite exists to catch (draft_vocab[argmax]) is reported as a break."""
    vocab = torch.arange(10)
    logits = torch.randn(10)
    with pytest.raises(Exception):
        assert_no_graph_break(lambda: vocab[logits.argmax()] + 1)
