"""train-pdm --cache: regime-weighted fills, per-position fills, trimmed queries, normalised anchors folded into
the saved weights, exact resume, and a PDM that the engine runs losslessly."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spd_engine import ops, train
from spd_engine.errors import UserError
from spd_engine.feature_cache import FeatureCache
from spd_engine.pdm import PDM, WEIGHTS_FILE
from spd_engine.sampling import SamplingParams
from spd_engine.decode import generate_vanilla
from spd_engine.spd import generate_spd
from spd_engine.stages import partition_layers
from spd_engine.train import (CacheDistiller, TrainOptions, fill_probabilities, folded_agg_weight,
                              staircase_mask, train_pdm)
from module_loader import load_module

pytestmark = pytest.mark.usefixtures("one_thread")


def options(out, cache_dir, **overrides) -> TrainOptions:
    values = dict(out=str(out), data=[], cache=[str(cache_dir)], stages=2, steps=6, batch_size=4, lr=3e-3,
                  draft_vocab=128, val_fraction=0.2, checkpoint_every=3, fill_mix="regime",
                  normalize_anchors=True, max_rows=96)
    values.update(overrides)
    return TrainOptions(**values)


def test_regime_fill_probabilities():
    probabilities = fill_probabilities(4, "regime", 0.6)
    torch.testing.assert_close(probabilities, torch.tensor([0.4, 0.24, 0.144, 0.216]))
    low = fill_probabilities(8, "regime", 0.2)  # p^7 is tiny: the full pipeline keeps 20%
    assert abs(float(low[-1]) - 0.2) < 1e-6 and abs(float(low.sum()) - 1) < 1e-6
    assert low[0] > low[1] > low[2]
    torch.testing.assert_close(fill_probabilities(3, "half", 0.6), torch.tensor([0.25, 0.25, 0.5]))
    assert fill_probabilities(1, "regime", 0.6).tolist() == [1.0]


def test_per_position_fills_give_each_query_its_own_staircase():
    depth_types = [0, 1, 1, 2, 3]
    T = 9
    fills = torch.tensor([1, 4, 2, 3, 1, 2, 4, 3, 1])
    mixed = staircase_mask(depth_types, T, fills)
    for f in range(1, 5):
        single = staircase_mask(depth_types, T, f)
        rows = (fills == f).nonzero().flatten()
        blocks = single.shape[0] // T
        for block in range(blocks):
            assert torch.equal(mixed[block * T + rows], single[block * T + rows])
    with pytest.raises(ValueError):
        staircase_mask(depth_types, T, torch.tensor([0] * T))


def _distiller(engine, anchors=(0, 2, 4), scale=None):
    target = engine.model
    pdm = PDM.create(target, partition_layers(4, 2, None), list(anchors), 1, torch.arange(100), seed=1)
    return CacheDistiller(target, pdm, scale)


def test_trimmed_queries_and_per_position_fills_match_the_full_pass(engine):
    distiller = _distiller(engine)
    anchors = torch.randn(2, 11, 3, 64)
    full = distiller.draft_logits(anchors, 2)
    torch.testing.assert_close(distiller.draft_logits(anchors, 2, first_query=4), full[:, 4:], rtol=1e-5, atol=1e-5)
    fills = torch.tensor([1, 2] * 5 + [1])
    mixed = distiller.draft_logits(anchors, fills)
    for f in (1, 2):
        at = (fills == f).nonzero().flatten()
        torch.testing.assert_close(mixed[:, at], distiller.draft_logits(anchors, f)[:, at], rtol=1e-5, atol=1e-5)


def test_normalised_anchors_fold_into_the_weights_the_engine_runs(engine):
    scale = torch.rand(3, 64) * 50 + 0.01
    normalised = _distiller(engine, scale=1 / scale)
    anchors = torch.randn(1, 7, 3, 64) * scale
    expected = normalised.draft_logits(anchors)
    plain = _distiller(engine)
    plain.pdm.agg_weight = folded_agg_weight(normalised.pdm.agg_weight, 1 / scale)
    torch.testing.assert_close(plain.draft_logits(anchors), expected, rtol=1e-4, atol=1e-4)
    # and the engine's aggregation op over raw anchors agrees with the normalised training path per type
    rows = torch.arange(7)
    for kind in range(3):
        got = ops.aggregate_features(anchors[0], plain.pdm.agg_weight, rows, torch.full_like(rows, kind),
                                     backend="torch")
        start = 64 * kind * (kind + 1) // 2
        weight = normalised.pdm.agg_weight[:, start: start + 64 * (kind + 1)]
        want = (anchors[0, :, : kind + 1] / scale[: kind + 1]).reshape(7, -1) @ weight.T
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_training_from_the_cache_learns_and_runs_losslessly(engine, cache_dir, tmp_path):
    report = train_pdm(engine, options(tmp_path, cache_dir, steps=40, checkpoint_every=20), progress=False)
    assert report["anchors"] == [0, 2, 4]  # auto: every stage boundary, the last layer's output included
    assert report["val"]["acceptance_full_pipeline"] > report["val_initial"]["acceptance_full_pipeline"]
    assert set(report["val"]["acceptance_by_fill"]) == {"1", "2"}
    assert [h["step"] for h in report["history"]] == [20, 40]
    assert report["train_tokens_per_s"] > 0 and report["answer_tokens_seen"] > 0
    pdm = PDM.load(tmp_path, engine.model)
    prompt = engine.tokenizer.encode("hello there", add_bos=False)
    vanilla = generate_vanilla(engine.model, prompt, 20, SamplingParams(), set())
    spd = generate_spd(engine.model, pdm, prompt, 20, SamplingParams(), set())
    assert spd.token_ids == vanilla.token_ids


def test_resume_after_interruption_is_bit_identical(engine, cache_dir, tmp_path, monkeypatch):
    whole = train_pdm(engine, options(tmp_path / "whole", cache_dir), progress=False)
    own_step, calls = train._train_step, {"n": 0}

    def step_then_die(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return own_step(*args)

    monkeypatch.setattr(train, "_train_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_pdm(engine, options(tmp_path / "part", cache_dir), progress=False)
    monkeypatch.setattr(train, "_train_step", own_step)
    resumed = train_pdm(engine, options(tmp_path / "part", cache_dir, resume=True), progress=False)
    assert resumed["steps"] == whole["steps"] == 6
    a, b = load_file(str(tmp_path / "whole" / WEIGHTS_FILE)), load_file(str(tmp_path / "part" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_cache_options_are_one_line_errors(engine, cache_dir, tmp_path):
    with pytest.raises(UserError, match="either --data"):
        train_pdm(engine, options(tmp_path, cache_dir, data=["x.jsonl"]), progress=False)
    with pytest.raises(UserError, match="not the anchors"):
        train_pdm(engine, options(tmp_path, cache_dir, anchors=[0, 5]), progress=False)
    with pytest.raises(UserError, match="--fill-mix"):
        train_pdm(engine, options(tmp_path, cache_dir, fill_mix="mostly"), progress=False)
    FeatureCache(cache_dir, engine.model.config, [0, 4])  # the fixture's cache itself is fine


def test_train_pdm_reads_several_caches_as_one_set(engine, tiny_dir, cache_dir, tmp_path):
    """`train-pdm --cache A B` trains on both directories' conversations (here the same one twice)."""
    import json

    from spd_engine.cli import main

    out = tmp_path / "both"
    assert main(["train-pdm", "--model", str(tiny_dir), "--stages", "2", "--cache", str(cache_dir), str(cache_dir),
                 "--steps", "2", "--batch-size", "4", "--draft-vocab", "128", "--out", str(out), "--json"]) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["cache"] == [str(cache_dir)] * 2
    conversations = len(FeatureCache(cache_dir, engine.model.config, [0, 4]))
    assert report["train_conversations"] + report["val_conversations"] == 2 * conversations


def test_init_continues_a_saved_pdm_exactly_where_it_stood(engine, cache_dir, tmp_path):
    """--init starts from a saved PDM: before its first step it drafts as the saved one did (the folded anchor
    normalisation is unfolded exactly), and training goes on from there."""
    first = train_pdm(engine, options(tmp_path / "first", cache_dir, steps=20, checkpoint_every=20), progress=False)
    fresh = train_pdm(engine, options(tmp_path / "fresh", cache_dir, steps=2), progress=False)
    more = train_pdm(engine, options(tmp_path / "more", cache_dir, steps=2, init=str(tmp_path / "first")),
                     progress=False)
    assert more["init"] == str(tmp_path / "first") and first["init"] is None
    saved, started = first["val"]["acceptance_by_fill"], more["val_initial"]["acceptance_by_fill"]
    assert set(saved) == set(started)
    for fill in saved:
        assert abs(saved[fill] - started[fill]) <= 0.01, fill
    assert more["val_initial"]["acceptance_full_pipeline"] > fresh["val_initial"]["acceptance_full_pipeline"] + 0.05
    with pytest.raises(UserError, match="--draft-vocab 128, this run asks for 64"):
        train_pdm(engine, options(tmp_path / "x", cache_dir, draft_vocab=64, init=str(tmp_path / "first")),
                  progress=False)
    with pytest.raises(UserError, match="--init continues a PDM on a feature cache"):
        train_pdm(engine, options(tmp_path / "y", cache_dir, cache=None, data=["x.txt"], init=str(tmp_path / "first")),
                  progress=False)


def test_feature_loss_is_the_normed_distance_to_the_last_layer(engine):
    distiller = _distiller(engine, anchors=(0, 2, 4))
    target = torch.randn(2, 5, engine.model.config.hidden_size) * 30
    where = torch.tensor([[True, True, False, True, True], [False, True, True, True, True]])
    count = torch.tensor(8)
    assert float(distiller.feature_loss(target.clone(), target, where, count)) == 0.0
    moved = target.clone()
    moved[0, 2] += 5.0  # a position that is not scored changes nothing
    assert float(distiller.feature_loss(moved, target, where, count)) == 0.0
    moved[0, 3] = -moved[0, 3]
    norm = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + engine.model.config.rms_norm_eps)  # noqa: E731
    weight = distiller.pdm.tower.norm_weight.float()
    expected = torch.nn.functional.smooth_l1_loss(norm(moved[0, 3]) * weight, norm(target[0, 3]) * weight) / 8
    torch.testing.assert_close(distiller.feature_loss(moved, target, where, count), expected)


def test_training_with_the_feature_loss_learns_and_stays_lossless(engine, cache_dir, tmp_path):
    report = train_pdm(engine, options(tmp_path, cache_dir, steps=30, checkpoint_every=30, feature_loss=1.0),
                       progress=False)
    assert report["feature_loss"] == 1.0
    assert report["val"]["acceptance_full_pipeline"] > report["val_initial"]["acceptance_full_pipeline"]
    pdm = PDM.load(tmp_path, engine.model)
    prompt = engine.tokenizer.encode("hello there", add_bos=False)
    vanilla = generate_vanilla(engine.model, prompt, 20, SamplingParams(), set())
    assert generate_spd(engine.model, pdm, prompt, 20, SamplingParams(), set()).token_ids == vanilla.token_ids
    with pytest.raises(UserError, match="deepest anchor must be 4"):
        train_pdm(engine, options(tmp_path / "x", cache_dir, anchors=[0, 2], feature_loss=1.0), progress=False)
    with pytest.raises(UserError, match="--feature-loss trains on a feature cache"):
        train_pdm(engine, options(tmp_path / "y", cache_dir, cache=None, data=["x.txt"], feature_loss=1.0),
                  progress=False)
    with pytest.raises(UserError, match="--feature-loss must be >= 0"):
        train_pdm(engine, options(tmp_path / "z", cache_dir, feature_loss=-1.0), progress=False)


def test_the_training_throughput_bench_times_both_paths(tiny_dir, cache_dir, tmp_path):
    """bench/bench_train_throughput.py drives train._train_step directly, so it runs here on the tiny model
    (a signature change once broke it unnoticed)."""
    bench = load_module(Path(__file__).resolve().parents[1] / "bench" / "bench_train_throughput.py",
                        "bench_train_throughput")
    out = tmp_path / "throughput.json"
    assert bench.main(["--cache", str(cache_dir), "--model", str(tiny_dir), "--stages", "2", "--rows", "8",
                       "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["batch"], report["rows_per_sequence"], report["rows_per_step"]) == (8, 8, 64)
    assert 0 < report["scored_tokens_per_step"] <= 64
    results = report["results"]
    assert set(results) == {"before_target_per_step", "after_cache_fp32", "after_cache_bf16"}
    assert results["before_target_per_step"]["speedup_scored_tokens"] == 1.0
    counted = {"before_target_per_step": report["rows_per_step"],  # the old loss scores every position
               "after_cache_fp32": report["scored_tokens_per_step"], "after_cache_bf16": report["scored_tokens_per_step"]}
    for name, record in results.items():
        assert record["seconds_per_step"] > 0
        assert record["scored_tokens_per_s"] == pytest.approx(counted[name] / record["seconds_per_step"])
