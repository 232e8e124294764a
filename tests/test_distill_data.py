"""build-data: seeded prompts, greedy answers with continuous batching, the feature cache it captures, resumption
after interruption (including SIGKILL), and the feature cache's checks."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spd_engine.decode import generate_vanilla
from spd_engine.distill_data import MANIFEST_FILE, build_data, generate_with_features, parse_layers, shard_paths
from spd_engine.engine import Engine
from spd_engine.errors import UserError
from spd_engine.feature_cache import FeatureCache
from spd_engine.model import AnchorCapture
from spd_engine.prompt_gen import PROMPT_MIXES, SELF_INSTRUCT_TEMPERATURE, make_prompt
from spd_engine.sampling import SamplingParams
from tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = [0, 1, 2, 3, 4]
EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def build(engine, out, prompts=10, shard_size=4, **kw):
    return build_data(engine, out, prompts=prompts, shard_size=shard_size, seed=0, answer_tokens=12, batch=3,
                      feature_layers=LAYERS, progress=False, **kw)


def read_shard(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("mix", sorted(PROMPT_MIXES))
def test_prompts_are_seeded_per_index_and_cover_every_domain(mix):
    first = [make_prompt(0, i, mix=mix) for i in range(400)]
    assert first == [make_prompt(0, i, mix=mix) for i in range(400)]  # a shard rebuilds without the ones before it
    assert [p.text for p in first] != [make_prompt(1, i, mix=mix).text for i in range(400)]
    domains = {p.domain for p in first}
    assert domains == set(PROMPT_MIXES[mix]) - {"passage"}  # passages need a corpus
    # Templates and slots give varied prompts (a v2 request's text varies with its seed too).
    assert len({(p.text, p.write_seed) for p in first}) > 350
    # v1 writes its self-instruct requests greedily; v2 samples each with its own seed.
    asks = [p for p in first if p.domain == "self_instruct"]
    expected = 0.0 if mix == "v1" else SELF_INSTRUCT_TEMPERATURE
    assert {p.write_temperature for p in asks} == {expected}
    assert len({p.write_seed for p in asks}) == (1 if mix == "v1" else len(asks))
    assert all(p.write_temperature == 0.0 for p in first if p.domain != "self_instruct")


def test_mixes_differ_and_v2_is_mostly_self_instruct():
    v1, v2 = ([make_prompt(0, i, mix=mix) for i in range(1000)] for mix in ("v1", "v2"))
    assert sum(a.text == b.text for a, b in zip(v1, v2)) < 50
    share = sum(p.domain == "self_instruct" for p in v2) / len(v2)
    assert abs(share - PROMPT_MIXES["v2"]["self_instruct"]) < 0.05


COMMITTED_V1 = Path(__file__).resolve().parents[1] / "bench" / "data" / "distill_v4" / "shard-00000.jsonl.gz"


def test_v1_prompts_still_rebuild_the_committed_data_set():
    """bench/data/distill_v4 is rebuilt from make_prompt(seed, i, mix="v1"): every templated prompt of its first
    shard must come out as committed (self-instruct and passage texts depend on the model and corpora)."""
    records = read_shard(COMMITTED_V1)
    templated = [r for r in records if r["domain"] in ("chat", "math", "code")]
    assert len(templated) > 100
    for r in templated:
        seed, index = map(int, r["id"].split("-"))
        assert make_prompt(seed, index, mix="v1").text == r["prompt"], r["id"]


def test_passages_come_from_the_given_corpus(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} " + "word " * 60 for i in range(5)))
    texts = [make_prompt(0, i, (str(corpus),)) for i in range(300)]
    passages = [p.text for p in texts if p.domain == "passage"]
    assert passages and all("paragraph" in t for t in passages)


@pytest.mark.skipif(not EVAL_DIR.is_dir(), reason="needs ../shared/data/eval (present in CI) to compare against")
def test_no_prompt_is_an_eval_prompt():
    eval_turns = set()
    for path in EVAL_DIR.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            eval_turns.add(json.loads(line)["turns"][0].strip())
    for mix in PROMPT_MIXES:
        generated = {make_prompt(0, i, mix=mix).text.strip() for i in range(3000)}
        assert not generated & eval_turns


def test_continuous_batching_answers_and_features_equal_one_at_a_time(engine):
    model = engine.model
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 2, 14, 7)]
    eos = {2}
    finished = generate_with_features(model, prompts, 10, eos, batch=2, feature_layers=LAYERS)
    for ids, result in zip(prompts, finished):
        assert result.answer == generate_vanilla(model, ids, 10, SamplingParams(), eos).token_ids
        fed = ids + result.answer[:-1]
        assert result.features.shape == (len(fed), len(LAYERS), model.config.hidden_size)
        cache = model.new_cache(64)
        expected = torch.empty_like(result.features)
        embedded = model.embed(torch.tensor([fed]))
        expected[:, 0] = embedded[0]
        with torch.inference_mode():
            model.forward_layers(embedded, 0, 4, cache, anchors=AnchorCapture(tuple(LAYERS), expected))
        torch.testing.assert_close(result.features, expected, rtol=1e-4, atol=1e-5)


def test_sampled_answers_follow_their_own_seed_whatever_the_batching(engine):
    """A self-instruct request is sampled from its prompt's own generator: the same seed gives the same text in
    any row, batch size or order, another seed another text, and temperature 0 stays greedy."""
    model = engine.model
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 2, 14, 7)]
    seeds = [11, 12, 13, 14, 15]
    sample = lambda batch, order: generate_with_features(  # noqa: E731
        model, [prompts[i] for i in order], 10, set(), batch, None, temperature=1.0, seeds=[seeds[i] for i in order])
    together = [f.answer for f in sample(5, range(5))]
    assert [f.answer for f in sample(2, range(5))] == together
    reversed_ = [f.answer for f in sample(3, [4, 3, 2, 1, 0])]
    assert reversed_[::-1] == together
    greedy = [f.answer for f in generate_with_features(model, prompts, 10, set(), 2, None)]
    assert together != greedy
    reseeded = generate_with_features(model, prompts, 10, set(), 5, None, temperature=1.0, seeds=[s + 100 for s in seeds])
    assert [f.answer for f in reseeded] != together
    cold = generate_with_features(model, prompts, 10, set(), 5, None, temperature=0.0, seeds=seeds)
    assert [f.answer for f in cold] == greedy


def test_a_data_set_keeps_its_prompt_mix(engine, tmp_path):
    manifest = build(engine, tmp_path, prompts=4)
    assert manifest["prompt_mix"] == "v2"
    with pytest.raises(UserError, match="prompt_mix"):
        build(engine, tmp_path, prompts=8, mix="v1")
    # A manifest written before mixes had names is a v1 data set.
    old = tmp_path / "old"
    build(engine, old, prompts=4, mix="v1")
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    del manifest["prompt_mix"]
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert build(engine, old, prompts=8, mix="v1")["prompt_mix"] == "v1"
    with pytest.raises(UserError, match="prompt_mix"):
        build(engine, old, prompts=8)


def test_build_writes_conversations_features_and_manifest(engine, tmp_path):
    manifest = build(engine, tmp_path)
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    total = 0
    for shard in manifest["shards"]:
        records = read_shard(tmp_path / shard["file"])
        features = np.load(tmp_path / shard["features"], mmap_mode="r")
        rows = sum(len(r["prompt_ids"]) + len(r["answer_ids"]) - 1 for r in records)
        assert features.shape == (rows, len(LAYERS), 64) and shard["feature_rows"] == rows
        assert shard["answer_tokens"] == sum(len(r["answer_ids"]) for r in records)
        for r in records:  # one conversation per record, prompt rendered by the chat template
            assert r["prompt_ids"][-3:] == engine.tokenizer.encode("<|im_start|>assistant\n", add_bos=False)[-3:]
        total += len(records) + shard["skipped_too_long"]
    assert total == 10
    assert manifest["answer_tokens_total"] == sum(s["answer_tokens"] for s in manifest["shards"])


def test_an_interrupted_build_resumes_to_identical_files(engine, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    build(engine, whole)
    build(engine, resumed, prompts=4)  # "interrupted" after its first shard
    (resumed / ".shard-00001.features.npy.123.tmp").write_bytes(b"partial")  # a write cut short
    build(engine, resumed)
    assert not list(resumed.glob(".*.tmp"))
    for name in sorted(p.name for p in whole.iterdir()):
        if name != MANIFEST_FILE:
            assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name
    strip = lambda m: [{k: v for k, v in s.items() if k != "seconds"} for s in m["shards"]]  # noqa: E731
    assert strip(json.loads((whole / MANIFEST_FILE).read_text())) == \
        strip(json.loads((resumed / MANIFEST_FILE).read_text()))


def test_features_rebuilt_for_committed_text_must_match(engine, tmp_path):
    build_data(engine, tmp_path, prompts=4, shard_size=4, seed=0, answer_tokens=12, batch=3, feature_layers=None,
               progress=False)
    assert not list(tmp_path.glob("*.features.npy"))
    manifest = build(engine, tmp_path, prompts=4)  # the same command with features: rebuilt and checked
    assert manifest["shards"][0]["features"]
    text_path, _ = shard_paths(tmp_path, 0)
    records = read_shard(text_path)
    records[0]["answer_ids"][0] += 1
    with gzip.open(text_path, "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
    entry = json.loads((tmp_path / MANIFEST_FILE).read_text())
    entry["shards"][0]["features"] = None
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(entry))
    with pytest.raises(UserError, match="does not rebuild identically"):
        build(engine, tmp_path, prompts=4)


def test_resuming_with_other_settings_is_refused(engine, tmp_path):
    build(engine, tmp_path, prompts=4)
    with pytest.raises(UserError, match="answer_tokens"):
        build_data(engine, tmp_path, prompts=4, shard_size=4, seed=0, answer_tokens=13, batch=3,
                   feature_layers=LAYERS, progress=False)


def test_feature_layers_are_checked():
    assert parse_layers("4,0,2", 4) == [0, 2, 4]
    for bad in ("0,2", "0,x", "0,5"):
        with pytest.raises(UserError):
            parse_layers(bad, 4)


# ---------------------------------------------------------------------------------------------------- the cache
def test_cache_batches_hold_the_stored_rows(engine, tmp_path):
    build(engine, tmp_path, prompts=4)
    cache = FeatureCache(tmp_path, engine.model.config, [0, 2, 4])
    records = read_shard(tmp_path / "shard-00000.jsonl.gz")
    features = torch.from_numpy(np.load(tmp_path / "shard-00000.features.npy").view(np.int16)).view(torch.bfloat16)
    batch = cache.batch([0, 1], max_rows=1000)
    first = records[0]
    rows = len(first["prompt_ids"]) + len(first["answer_ids"]) - 1
    torch.testing.assert_close(batch.anchors[0, :rows], features[:rows][:, [0, 2, 4]].float())
    torch.testing.assert_close(batch.last_hidden[0, :rows], features[:rows, 4].float())
    tokens = first["prompt_ids"] + first["answer_ids"]
    assert batch.next_tokens[0, :rows].tolist() == tokens[1:]
    assert [s.domain for s in cache.sequences] == [r["domain"] for r in records]
    assert batch.scored[0, :rows].tolist() == [t + 1 >= len(first["prompt_ids"]) for t in range(rows)]
    assert not batch.scored[0, rows:].any()
    cropped = cache.batch([0], max_rows=5)
    assert cropped.next_tokens[0].tolist() == tokens[-5:]


def test_several_caches_read_as_one_in_order(engine, tmp_path):
    """Two data sets (here two prompt mixes) are one cache: every conversation of each, in the order given, each
    reading its own directory's rows (shard indices repeat across directories)."""
    first, second = tmp_path / "v1", tmp_path / "v2"
    build(engine, first, prompts=6, mix="v1")
    build(engine, second, prompts=5)
    alone = [FeatureCache(d, engine.model.config, [0, 2, 4]) for d in (first, second)]
    both = FeatureCache([first, second], engine.model.config, [0, 2, 4])
    assert len(both) == len(alone[0]) + len(alone[1])
    assert [s.tokens for s in both.sequences] == [s.tokens for c in alone for s in c.sequences]
    picked = [0, len(alone[0]), len(both) - 1]  # first of each directory, and the very last
    batch = both.batch(picked, max_rows=1000)
    for b, (cache, i) in enumerate([(alone[0], 0), (alone[1], 0), (alone[1], len(alone[1]) - 1)]):
        expected = cache.batch([i], max_rows=1000)
        rows = expected.anchors.shape[1]
        torch.testing.assert_close(batch.anchors[b, :rows], expected.anchors[0])
        assert batch.next_tokens[b, :rows].tolist() == expected.next_tokens[0].tolist()
    (tmp_path / "other").mkdir()
    build_data(engine, tmp_path / "other", prompts=4, shard_size=4, seed=0, answer_tokens=12, batch=3,
               feature_layers=[0, 1, 2, 4], progress=False)
    with pytest.raises(UserError, match="different layers"):
        FeatureCache([first, tmp_path / "other"], engine.model.config, [0, 2, 4])
    with pytest.raises(UserError, match="no feature cache"):
        FeatureCache([], engine.model.config, [0, 2, 4])


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or corrupt"),
    ("shape", "have shape"),
    ("manifest", "not a data manifest"),
    ("text", "unreadable"),
    ("missing", "no features file"),
])
def test_a_damaged_cache_is_one_clear_error(engine, tmp_path, damage, message):
    build(engine, tmp_path, prompts=4)
    text_path, feature_path = shard_paths(tmp_path, 0)
    if damage == "truncate":
        data = feature_path.read_bytes()
        feature_path.write_bytes(data[: len(data) // 2])
    elif damage == "shape":
        np.save(feature_path, np.zeros((3, 5, 64), dtype=np.uint16))
    elif damage == "manifest":
        (tmp_path / MANIFEST_FILE).write_text("{not json")
    elif damage == "text":
        text_path.write_bytes(b"\x1f\x8b garbage")
    else:
        feature_path.unlink()
    with pytest.raises(UserError, match=message):
        FeatureCache(tmp_path, engine.model.config, [0, 4])


def test_a_cache_for_another_model_or_anchors_is_refused(engine, tmp_path, tiny_dir):
    build(engine, tmp_path, prompts=4)
    with pytest.raises(UserError, match="not the anchors"):
        FeatureCache(tmp_path, engine.model.config, [0, 5])
    other = Engine.load(str(make_tiny_model(tmp_path / "other", "llama", layers=2))).model.config
    with pytest.raises(UserError, match="num_layers"):
        FeatureCache(tmp_path, other, [0, 2])
    with pytest.raises(UserError, match="has no manifest"):
        FeatureCache(tmp_path / "nowhere", engine.model.config, [0, 4])


def test_sigkilled_build_resumes_to_the_uninterrupted_result(tiny_dir, tmp_path):
    """The CLI process is killed as soon as its first shard lands; rerunning the same command finishes the set,
    byte-identical to an uninterrupted build, and no temporary file is ever listed in the manifest."""
    command = [sys.executable, "-m", "spd_engine", "build-data", "--model", str(tiny_dir), "--prompts", "9",
               "--shard-size", "3", "--batch", "2", "--answer-tokens", "10", "--feature-layers", "0,2,4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(command + ["--out", str(whole)], check=True, env=env, capture_output=True)
    process = subprocess.Popen(command + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / MANIFEST_FILE).is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    manifest = json.loads((killed / MANIFEST_FILE).read_text())
    for shard in manifest["shards"]:  # what the manifest lists is complete
        assert np.load(killed / shard["features"]).shape[0] == shard["feature_rows"]
    subprocess.run(command + ["--out", str(killed)], check=True, env=env, capture_output=True)
    for path in whole.iterdir():
        if path.name != MANIFEST_FILE:
            assert path.read_bytes() == (killed / path.name).read_bytes(), path.name
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]
    shutil.rmtree(whole)


def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_file(engine, tmp_path, monkeypatch):
    import errno

    import spd_engine.distill_data as distill

    def no_space(handle, array):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(distill.np, "save", no_space)
    with pytest.raises(UserError, match="disk full"):
        build(engine, tmp_path, prompts=4)
    assert not list(tmp_path.glob("*.features.npy")) and not list(tmp_path.glob(".*.tmp"))
    assert not (tmp_path / MANIFEST_FILE).exists()  # nothing lists the shard that failed
