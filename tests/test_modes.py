"""The decoding modes (spd_engine/modes): the registry, option ownership, the stats JSON contract, the one
driver's EOS / limit / streaming / readback behaviour for every mode, and `eval --modes`."""
import dataclasses
import json

import pytest

from spd_engine import modes
from spd_engine.cli import main
from spd_engine.errors import UserError
from spd_engine.modes.base import DecodeStats, DecodingMode, run_decoder
from spd_engine.modes.pipespec import ScheduleCounts, predict_pipespec
from spd_engine.modes.ppsd import predict_ppsd
from spd_engine.modes.vanilla import VanillaMode
from spd_engine.sampling import SamplingParams
from spd_engine.simulate import LINK_PRESETS, StepTimes, Traces, simulate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 6, 7, 8, 9, 10]
# Each mode with the options that make it run on the tiny model (an untrained draft: rejections and flushes).
RUNNABLE = {"vanilla": {}, "spd": {"stages": 2, "pdm": "untrained"}, "pipespec": {"draft_layers": "1"},
            "ppsd": {"exit_layer": 2}}


def test_every_registered_mode_resolves():
    assert modes.REFERENCE_MODE in modes.MODE_NAMES
    for name in modes.MODE_NAMES:
        mode = modes.mode_class(name)
        assert issubclass(mode, DecodingMode) and mode.name == name and mode.summary
        assert all(flag.startswith("--") for flag in mode.options.values())
    assert set(RUNNABLE) == set(modes.MODE_NAMES)  # a new mode: say here how it runs on the tiny model
    with pytest.raises(UserError, match="--mode must be one of"):
        modes.mode_class("fastest")


def test_another_modes_option_is_a_one_line_error(engine):
    with pytest.raises(UserError, match=r"^--stages applies to --mode spd only$"):
        engine.generate(prompt_ids=PROMPT, max_new_tokens=2, stages=2)
    with pytest.raises(UserError, match=r"^--exit-layer applies to --mode ppsd only$"):
        engine.generate(prompt_ids=PROMPT, max_new_tokens=2, mode="spd", exit_layer=2)
    with pytest.raises(UserError, match="not an option of any decoding mode"):
        engine.generate(prompt_ids=PROMPT, max_new_tokens=2, exit_depth=2)


def test_an_option_shared_by_modes_names_them_all(engine, monkeypatch):
    class Early(VanillaMode):
        name, summary, options = "early", "a stand-in", {"stages": "--stages", "exit_layer": "--exit-layer"}

    monkeypatch.setattr(modes, "all_modes", lambda: [VanillaMode, modes.mode_class("spd"), Early])
    with pytest.raises(UserError, match=r"^--stages applies to --mode spd or early only$"):
        modes.check_options(VanillaMode, ["stages"])
    with pytest.raises(UserError, match=r"^--exit-layer applies to --mode early only$"):
        modes.check_options(modes.mode_class("spd"), ["exit_layer"])


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "hi", "--pdm", "untrained"], "--pdm applies to --mode spd only"),
    (["eval", "--mode", "vanilla", "--stages", "2", "--data", "sample"], "--stages applies to --mode spd only"),
    (["eval", "--modes", "vanilla", "--pdm", "untrained", "--data", "sample"], "--pdm applies to --mode spd only"),
    (["eval", "--modes", "vanilla,fastest", "--data", "sample"], "expected comma-separated modes"),
])
def test_cli_rejects_options_of_another_mode(tiny_dir, capsys, argv, message):
    code = main([*argv, "--model", str(tiny_dir), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_graph_on_needs_a_capturable_mode(engine, monkeypatch):
    class EagerOnly(VanillaMode):
        name, summary, capturable = "eager-only", "a stand-in whose cycle cannot be captured", False

    monkeypatch.setattr("spd_engine.engine.mode_class", lambda name: EagerOnly)
    with pytest.raises(UserError, match=r"^--graph on: --mode eager-only has no capturable cycle; use --graph auto "
                                        r"or off$"):
        engine.generate(prompt_ids=PROMPT, mode="eager-only", max_new_tokens=2, graph="on")
    out = engine.generate(prompt_ids=PROMPT, mode="eager-only", max_new_tokens=3, graph="auto")
    assert out.stats.graph is False and len(out.token_ids) == 3


def test_modes_are_made_once_per_options(engine):
    spd = engine.decoding_mode("spd", stages=2, pdm="untrained")
    assert engine.decoding_mode("spd", pdm="untrained", stages=2, stage_layers=None) is spd
    assert engine.decoding_mode("spd", stages=3, pdm="untrained") is not spd


def test_stats_json_contract(engine):
    common = {field.name for field in dataclasses.fields(DecodeStats)}
    vanilla = engine.generate(prompt_ids=PROMPT, max_new_tokens=6, ignore_eos=True).stats
    assert set(vanilla.to_json()) == common
    assert (vanilla.acceptance_rate, vanilla.tokens_per_target_pass, vanilla.theoretical_speedup) == (None, 1.0, 1.0)
    spd = engine.generate(prompt_ids=PROMPT, max_new_tokens=12, ignore_eos=True, mode="spd", **RUNNABLE["spd"])
    payload = json.loads(json.dumps(spd.stats.to_json()))
    assert common | {"stages", "stage_layers", "anchors", "tower_layers", "cycles", "cycles_run", "accepted_drafts",
                     "rejected_drafts", "tokens_per_cycle", "equivalent_accept_length", "wall_seconds",
                     "cycle_seconds"} == set(payload)
    s = spd.stats
    assert payload["mode"] == "spd" and s.stages == 2 and s.new_tokens == 12
    assert s.tokens_per_target_pass == s.theoretical_speedup == s.equivalent_accept_length == \
        pytest.approx(2 * 12 / s.cycles)
    assert s.accepted_drafts + s.rejected_drafts == len(spd.trace) == 11
    assert s.acceptance_rate == pytest.approx(s.accepted_drafts / 11)


def run(engine, mode: str, max_new_tokens: int, eos_ids=(), readback: int = 1, on_tokens=None):
    params = SamplingParams()
    decoder = engine.decoding_mode(mode, **RUNNABLE[mode]).decoder(len(PROMPT), max_new_tokens, params, readback)
    return run_decoder(decoder, mode, PROMPT, max_new_tokens, params, eos_ids, on_tokens, readback=readback)


@pytest.mark.parametrize("mode", sorted(RUNNABLE))
def test_the_driver_stops_streams_and_batches_alike_in_every_mode(engine, mode):
    full = run(engine, mode, 16)
    assert len(full.token_ids) == 16 and full.stats.new_tokens == 16
    assert full.token_ids == run(engine, modes.REFERENCE_MODE, 16).token_ids  # greedy: lossless

    streamed = []
    assert run(engine, mode, 16, on_tokens=streamed.extend).token_ids == streamed == full.token_ids

    eos = full.token_ids[5]
    stop = full.token_ids.index(eos)
    stopped = run(engine, mode, 16, eos_ids={eos})
    assert stopped.token_ids == full.token_ids[:stop + 1]  # the EOS token is kept
    assert len(stopped.trace) <= stop

    batched = run(engine, mode, 16, readback=5)  # cycles past the last token run, but are never output
    assert batched.token_ids == full.token_ids and batched.trace == full.trace
    assert batched.stats.steps_run % 5 == 0

    first_only = run(engine, mode, 1)
    assert len(first_only.token_ids) == 1 and first_only.stats.steps_run == 0 and first_only.trace == []


def test_eval_modes_side_by_side(tiny_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"question_id": i, "turns": [p]}) + "\n"
                            for i, p in enumerate(["Say hi.", "Name a colour.", "Count to three."])))
    out, times_file = tmp_path / "modes.json", tmp_path / "times.json"
    layers = json.loads((tiny_dir / "config.json").read_text())["num_hidden_layers"]
    times = StepTimes(layer_ms=[1.0 + i / 10 for i in range(layers)], head_ms=0.5, verify_ms=0.1, pdm_ms=0.3,
                      hidden_size=64)
    times.to_json(times_file)
    code = main(["eval", "--model", str(tiny_dir), "--modes", "vanilla,spd,ppsd,pipespec", "--stages", "2", "--pdm",
                 "untrained", "--exit-layer", "1", "--draft-layers", "1", "--data", str(data), "--limit", "2", "--max-new-tokens", "8",
                 "--times", str(times_file), "--link", "pcie", "--out", str(out)])
    table = capsys.readouterr().out.splitlines()
    assert code == 0
    assert table[1].split()[:4] == ["mode", "dataset", "prompts", "lossless"]
    assert table[1].split()[-1] == "predicted"
    assert [row.split()[:4] for row in table[2:6]] == [["vanilla", "chat", "2", "2/2"], ["spd", "chat", "2", "2/2"],
                                                      ["ppsd", "chat", "2", "2/2"], ["pipespec", "chat", "2", "2/2"]]
    report = json.loads(out.read_text())
    assert list(report["modes"]) == ["vanilla", "spd", "ppsd", "pipespec"] and report["modes"]["spd"]["stages"] == 2
    assert report["modes"]["ppsd"]["exit_layer"] == 1
    # The predictions are the simulator's, from each mode's own traces and these step times.
    link = LINK_PRESETS["pcie"]
    predicted = {name: report["modes"][name]["datasets"]["chat"]["predicted"] for name in report["modes"]}
    assert predicted["vanilla"] == {"devices": 1, "tokens_per_s": pytest.approx(1e3 / times.vanilla_token_ms()),
                                    "vanilla_tokens_per_s": pytest.approx(1e3 / times.vanilla_token_ms()),
                                    "speedup": 1.0}
    spd_traces = [p["trace"] for p in report["modes"]["spd"]["datasets"]["chat"]["per_prompt"]]
    expected = simulate(Traces(spd_traces, "eval", recorded_stages=2), times, link, [2]).predictions[0]
    assert predicted["spd"]["devices"] == 3 and predicted["spd"]["speedup"] == pytest.approx(expected.speedup)
    ppsd_traces = [p["trace"] for p in report["modes"]["ppsd"]["datasets"]["chat"]["per_prompt"]]
    expected = predict_ppsd(times.layer_ms, times.head_ms, link, ppsd_traces, 1, 64)
    assert predicted["ppsd"]["devices"] == 2 and predicted["ppsd"]["speedup"] == pytest.approx(expected.speedup)
    chain = report["modes"]["pipespec"]
    rows = chain["datasets"]["chat"]["per_prompt"]
    run = ScheduleCounts(chain["costs"], chain["periods"], chain["window"],
                         sum(p["new_tokens"] - 1 for p in rows) / sum(p["target_passes"] for p in rows))
    expected = predict_pipespec(run, times.vanilla_token_ms(), link, [times.layer_ms[0] + times.head_ms,
                                                                       times.vanilla_token_ms()])
    assert predicted["pipespec"]["devices"] == 2
    assert predicted["pipespec"]["speedup"] == pytest.approx(expected.speedup)
    assert report["prediction"]["link"]["name"] == "pcie"
    vanilla, spd = (report["modes"][name]["datasets"]["chat"] for name in ("vanilla", "spd"))
    for name, d in (("vanilla", vanilla), ("spd", spd)):
        assert d["prompts"] == 2 and d["lossless"] is True and d[f"{name}_tokens_per_s"] > 0
        assert {"acceptance_rate", "tokens_per_target_pass", "theoretical_speedup", "wall_clock_ratio",
                "per_prompt"} <= set(d)
    assert vanilla["tokens_per_target_pass"] == vanilla["theoretical_speedup"] == 1.0
    assert vanilla["accepted"] + vanilla["rejected"] == 0
    assert spd["tokens_per_target_pass"] == pytest.approx(spd["equivalent_accept_length"])
    assert spd["equivalent_accept_length"] == pytest.approx(2 * spd["new_tokens"] / spd["cycles"])
    assert [p["new_tokens"] for p in spd["per_prompt"]] == [p["new_tokens"] for p in vanilla["per_prompt"]]
    # `simulate --mode` gives the same prediction from the report alone; without a report it says what it needs.
    capsys.readouterr()
    assert main(["simulate", "--mode", "ppsd", "--trace", str(out), "--times", str(times_file), "--link", "pcie",
                 "--json"]) == 0
    simulated = json.loads(capsys.readouterr().out)
    assert simulated["speedup"] == pytest.approx(predicted["ppsd"]["speedup"]) and simulated["devices"] == 2
    assert main(["simulate", "--mode", "ppsd", "--acceptance", "0.5", "--times", str(times_file)]) == 2
    assert "predicts from an eval report" in capsys.readouterr().err
