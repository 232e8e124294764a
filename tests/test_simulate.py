"""The pipeline simulator: exact cycle counts on the engine's own traces, the paper's closed form for free
links and i.i.d. acceptance, the cycle-time model, and the ``simulate`` command."""
import json

import pytest

from spd_engine import Engine
from spd_engine.cli import main
from spd_engine.errors import UserError
from spd_engine.evaluate import evaluate
from spd_engine.pdm import PDM
from spd_engine.sampling import SamplingParams
from spd_engine.simulate import (LINK_PRESETS, Link, StepTimes, closed_form_speedup, count_cycles, cycle_ms,
                                 iid_traces, load_eval_traces, simulate)
from spd_engine.spd import generate_spd
from spd_engine.stages import partition_layers
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.load(str(make_tiny_model(tmp_path_factory.mktemp("sim"), "llama", layers=4)), device="cpu")


def uniform_times(num_layers, layer_ms=1.0, pdm_ms=0.0, head_ms=0.0, verify_ms=0.0):
    return StepTimes(layer_ms=[layer_ms] * num_layers, head_ms=head_ms, verify_ms=verify_ms, pdm_ms=pdm_ms,
                     hidden_size=64, dtype_bytes=2)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_replay_gives_the_engines_cycle_count(engine, stages):
    """At T=1 the untrained PDM is accepted and rejected in a mix, so both refill paths are replayed."""
    pdm = PDM.create(engine.model, partition_layers(4, stages))
    prompt = engine.encode_prompt("the pipeline")
    result = generate_spd(engine.model, pdm, prompt, 40, SamplingParams(temperature=1.0, seed=stages), [])
    trace = "".join("A" if accepted else "R" for accepted in result.trace)
    assert "A" in trace and "R" in trace
    assert count_cycles(trace, stages) == result.stats.cycles


def test_eval_report_replays_to_the_recorded_cycles(engine, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "turns": [text]})
                                   for i, text in enumerate(["name a river", "count to five", "say hello"])))
    report = evaluate(engine, [str(questions)], pdm="untrained", stages=3, max_new_tokens=24, temperature=1.0,
                      seed=3, progress=False)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(report))
    traces = load_eval_traces(path)
    recorded = report["datasets"]["q"]["cycles"]
    assert traces.recorded_stages == 3 and traces.recorded_cycles == recorded
    prediction = simulate(traces, uniform_times(4), LINK_PRESETS["pcie"], [3]).predictions[0]
    assert prediction.cycles == recorded
    assert prediction.theoretical_speedup == pytest.approx(report["datasets"]["q"]["equivalent_accept_length"])

    report["datasets"]["q"]["per_prompt"][1]["cycles"] += 1
    path.write_text(json.dumps(report))
    with pytest.raises(UserError, match="prompt 1: the trace replays to"):
        load_eval_traces(path)


@pytest.mark.parametrize("acceptance", [0.5, 0.8, 0.95])
def test_free_links_match_the_closed_form_on_long_iid_traces(acceptance):
    """Equal stages (840 layers split evenly for every n), free links, PDM and controller: predicted wall
    clock and theoretical speedup both approach n / (1 + (n - 1)(1 - p))."""
    traces = iid_traces(acceptance, verifications=100_000, seed=1)
    sim = simulate(traces, uniform_times(840, layer_ms=0.01), LINK_PRESETS["free"], list(range(2, 9)))
    for p in sim.predictions:
        expected = closed_form_speedup(p.stages, acceptance)
        assert p.theoretical_speedup == pytest.approx(expected, rel=0.02)
        assert p.speedup == pytest.approx(expected, rel=0.02)


def test_cycle_time_follows_the_distributed_schedule():
    """2 stages of 1 ms, PDM 0.5 ms, verify 0.1 ms, 10 us per message (size free). Dedicated: the slower of
    the draft and a stage's path (control + input + layers + result back), then verify. Hosted: rank 0
    drafts and then runs stage 1 itself."""
    times = uniform_times(2, layer_ms=1.0, pdm_ms=0.5, verify_ms=0.1)
    link = Link("test", latency_us=10.0, bandwidth_gbs=None)
    bounds = partition_layers(2, 2)
    assert cycle_ms(times, link, bounds, "dedicated") == (pytest.approx(1.0 + 3 * 0.01 + 0.1), 1.0)
    assert cycle_ms(times, link, bounds, "hosted") == (pytest.approx(0.5 + 1.0 + 0.1), 1.0)
    times.stage_ms = {2: [2.0, 0.5]}  # measured per stage: replaces the sums of layer times
    assert cycle_ms(times, link, bounds, "dedicated") == (pytest.approx(2.0 + 3 * 0.01 + 0.1), 2.0)


def test_link_latency_lowers_the_predicted_speedup():
    traces = iid_traces(0.8, verifications=2000)
    times = uniform_times(30, layer_ms=0.02, pdm_ms=0.05, head_ms=0.05, verify_ms=0.05)
    speedups = [simulate(traces, times, LINK_PRESETS[name], [4]).predictions[0].speedup
                for name in ("free", "nvlink", "pcie", "ethernet")]
    assert speedups == sorted(speedups, reverse=True) and speedups[0] > speedups[-1]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_command_json_and_plot(tmp_path, capsys):
    times = uniform_times(6, layer_ms=0.5, pdm_ms=0.4, head_ms=0.3, verify_ms=0.3)
    times.stage_ms = {3: [1.0, 1.0, 1.2]}
    times = times.to_json(tmp_path / "t.json")
    code, out, _ = run_cli(capsys, "simulate", "--acceptance", 0.8, "--times", times, "--stages", "2-4",
                           "--link", "ethernet", "--plot", tmp_path / "s.png", "--json")
    assert code == 0
    payload = json.loads(out)
    assert [p["stages"] for p in payload["predictions"]] == [2, 3, 4]
    assert [p["slowest_stage_ms"] for p in payload["predictions"]] == [1.5, 1.2, 1.0]
    assert payload["link"]["name"] == "ethernet"
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_simulate_measures_step_times_on_the_spot(engine, tmp_path, capsys):
    saved = tmp_path / "measured.json"
    code, out, _ = run_cli(capsys, "simulate", "--acceptance", 0.7, "--model", engine.model_dir, "--device", "cpu",
                           "--stages", "2,4", "--repeats", 2, "--context", 16, "--save-times", saved)
    assert code == 0 and "speedup" in out
    times = StepTimes.from_json(saved)
    assert len(times.layer_ms) == 4 and set(times.pdm_ms) == {2, 4}
    assert all(t > 0 for t in times.layer_ms + [times.head_ms, times.verify_ms, *times.pdm_ms.values()])


@pytest.mark.parametrize("args,message", [
    (["--acceptance", "1.5"], "--acceptance must be in [0, 1]"),
    (["--acceptance", "0.8", "--stages", "0"], "--stages must name stage counts"),
    (["--acceptance", "0.8", "--link", "warp"], "--link must be one of"),
    (["--acceptance", "0.8", "--times", "/nonexistent.json"], "does not exist"),
    (["--trace", "/nonexistent.json"], "does not exist"),
])
def test_bad_simulate_input_is_one_line(capsys, args, message):
    code, _, err = run_cli(capsys, "simulate", *args)
    assert code == 2
    assert err.count("\n") == 1 and message in err
