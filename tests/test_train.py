"""PDM training: staircase masks, the loss going down, acceptance going up, exact resume, atomic checkpoints."""
import argparse
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from spd_engine import train
from spd_engine.decode import generate_vanilla
from spd_engine.engine import Engine
from spd_engine.errors import UserError
from spd_engine.pdm import PDM, WEIGHTS_FILE
from spd_engine.sampling import SamplingParams
from spd_engine.spd import SPDState, generate_spd, resolve_pdm
from spd_engine.stages import partition_layers
from spd_engine.train import (CHECKPOINT_DIR, REPORT_FILE, TRAINER_STATE_FILE, Distiller, TrainOptions,
                              choose_draft_vocab, latest_checkpoint, staircase_blocks, staircase_mask, target_pass,
                              train_pdm)
from tiny_models import make_tiny_model

GREEDY = SamplingParams()
WORDS = "the cat dog sat on a mat big red blue ran fast slow and then".split()


def word_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(count)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.load(str(make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", layers=4)))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in word_prompts(24, seed=0)))
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(word_prompts(200, seed=3)))
    return path


def small(out, data, **overrides) -> TrainOptions:
    options = dict(data=[str(data)], out=str(out), stages=2, seq_len=32, steps=12, batch_size=2, lr=1e-3,
                   draft_vocab=64, val_fraction=0.1, checkpoint_every=4)
    options.update(overrides)
    return TrainOptions(**options)


@pytest.fixture(scope="module")
def trained(engine, prompts_file, tmp_path_factory):
    """Self-distilled on the tiny model's own (repetitive) answers: a few hundred steps learn a lot."""
    out = tmp_path_factory.mktemp("trained")
    report = train_pdm(engine, small(out, prompts_file, self_distill=True, answer_tokens=48, seq_len=64, steps=150,
                                     batch_size=4, draft_vocab=128, checkpoint_every=100), progress=False)
    return out, report


# ---------------------------------------------------------------------- staircase layout
def visible(mask, seq_len):
    """{(block, position): {(block, position), ...}} from an (R, R) mask."""
    rows = {}
    for q, k in mask.nonzero().tolist():
        rows.setdefault(divmod(q, seq_len), set()).add(divmod(k, seq_len))
    return rows


def test_staircase_mask_full_fill_hand_checked():
    # n = 2, every depth its own type: blocks are depths 0, 1, 2.
    assert staircase_blocks([0, 1, 2]) == [(0, 0), (1, 1), (2, 2)]
    rows = visible(staircase_mask([0, 1, 2], 4), 4)
    assert rows[(0, 3)] == {(0, 3), (1, 2), (2, 1), (2, 0)}  # δ=0 at depth 0, δ=1 at depth 1, δ>=2 full
    assert rows[(0, 0)] == {(0, 0)}
    assert rows[(0, 1)] == {(0, 1), (1, 0)}
    assert rows[(1, 3)] == {(1, 3), (2, 2), (2, 1), (2, 0)}  # a depth-1 row: older rows at depth 1+δ -> full
    assert rows[(2, 2)] == {(2, 2), (2, 1), (2, 0)}  # the deepest rows: plain causal among themselves
    assert len(rows) == 12  # no row is empty


def test_staircase_mask_shared_types_hand_checked():
    # n = 3 where depths 1 and 2 share type 1 and type 2 is never used: depth 3 uses type 3.
    assert staircase_blocks([0, 1, 1, 3]) == [(0, 0), (1, 1), (3, 3)]
    rows = visible(staircase_mask([0, 1, 1, 3], 5), 5)
    assert rows[(0, 4)] == {(0, 4), (1, 3), (1, 2), (2, 1), (2, 0)}  # block index 2 holds type 3
    assert rows[(1, 4)] == {(1, 4), (1, 3), (2, 2), (2, 1), (2, 0)}  # representative depth 1: 1+δ
    assert rows[(2, 4)] == {(2, 4), (2, 3), (2, 2), (2, 1), (2, 0)}


def test_staircase_mask_per_depth_blocks():
    # Depths 1 and 2 share type 1; per-depth blocks keep them apart so a depth-1 row sees depth 2 behind it.
    assert staircase_blocks([0, 1, 1, 3], per_depth=True) == [(0, 0), (1, 1), (1, 2), (3, 3)]
    rows = visible(staircase_mask([0, 1, 1, 3], 5, per_depth=True), 5)
    assert rows[(0, 4)] == {(0, 4), (1, 3), (2, 2), (3, 1), (3, 0)}
    assert rows[(1, 4)] == {(1, 4), (2, 3), (3, 2), (3, 1), (3, 0)}
    assert rows[(2, 4)] == {(2, 4), (3, 3), (3, 2), (3, 1), (3, 0)}
    rows = visible(staircase_mask([0, 1, 1, 3], 5, fill=2, per_depth=True), 5)
    assert rows[(0, 4)] == {(0, 4), (1, 3), (3, 2), (3, 1), (3, 0)}


def test_staircase_mask_partial_fill():
    types = [0, 1, 2, 3]  # n = 3
    full = staircase_mask(types, 6)
    assert torch.equal(staircase_mask(types, 6, fill=3), full)
    rows = visible(staircase_mask(types, 6, fill=1), 6)
    assert rows[(0, 5)] == {(0, 5)} | {(3, s) for s in range(5)}  # everything older is at full depth
    assert rows[(1, 5)] == {(3, s) for s in range(6)}  # depth 1 >= fill: its own position is complete too
    rows = visible(staircase_mask(types, 6, fill=2), 6)
    assert rows[(0, 5)] == {(0, 5), (1, 4)} | {(3, s) for s in range(4)}
    assert all(rows.get((b, t)) for b in range(4) for t in range(6))
    for bad in (0, 4):
        with pytest.raises(ValueError):
            staircase_mask(types, 6, fill=bad)


@pytest.mark.parametrize("stages,tower_layers,anchors", [(2, 1, "auto"), (3, 2, "auto"), (3, 1, [0, 3]),
                                                         (3, 2, [0, 3])])
def test_training_staircase_reproduces_inference_drafts(engine, monkeypatch, stages, tower_layers, anchors):
    """The draft logits the training layout gives position t at fill f equal those SPD computes when t is the
    newest token of an f-full pipeline (oracle drafts keep every fill of a run's start and its steady state).
    Anchors 0,3 make depths share types (0,0,1,1): merged blocks for L_s=1, per-depth blocks for L_s=2."""
    model = engine.model
    pdm = PDM.create(model, partition_layers(model.config.num_layers, stages), anchors=anchors,
                     tower_layers=tower_layers, seed=3)
    prompt = [1, 40, 41, 42, 43, 44, 2]
    reference = generate_vanilla(model, prompt, 10, GREEDY, eos_ids=()).token_ids
    seen = []
    own_draft, own_logits = SPDState.draft, pdm.draft_logits

    def draft(state):
        token, q = own_draft(state)
        seen[-1][:2] = int(state.newest), int(state.fill)
        index = int(state.newest) + 1 - len(prompt)
        return (torch.tensor([reference[index]]) if index < len(reference) else token), q

    def draft_logits(rows):
        logits = own_logits(rows)
        seen.append([None, None, logits[0].clone()])
        return logits

    monkeypatch.setattr(SPDState, "draft", draft)
    monkeypatch.setattr(pdm, "draft_logits", draft_logits)
    result = generate_spd(model, pdm, prompt, len(reference), GREEDY, eos_ids=())
    assert result.token_ids == reference and result.stats.rejected_drafts == 0
    monkeypatch.undo()
    sequence = torch.tensor([prompt + reference])
    distiller = Distiller(model, pdm)
    with torch.no_grad():
        outputs = target_pass(model, sequence, pdm.config.anchors, pdm.draft_vocab)
        by_fill = {f: distiller.draft_logits(outputs.anchors, None if f == stages else f)[0]
                   for f in range(1, stages + 1)}
    seen = [entry for entry in seen if entry[0] < sequence.shape[1]]  # drafts past the end hold no known token
    assert {fill for _, fill, _ in seen} == set(range(1, stages + 1))
    for newest, fill, logits in seen:
        torch.testing.assert_close(by_fill[fill][newest], logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- training
def test_training_lowers_loss_and_raises_acceptance(engine, trained):
    out, report = trained
    assert report["val"]["loss"] < 0.6 * report["val_initial"]["loss"]
    assert report["val"]["top1"] > report["val_initial"]["top1"] + 0.1
    assert report["steps"] == 150 and report["draft_vocab"] == 128
    answers = report["val"]["answers"]  # self-distilled: the answer tokens' own figures too
    assert 0 < answers["positions"] < report["val"]["positions"] and answers["top1"] > 0.1
    assert json.loads((out / REPORT_FILE).read_text())["val"] == report["val"]
    # Real SPD on prompts it never saw: the trained PDM (loaded like --pdm DIR) beats an untrained one.
    rates = {}
    for spec in ("untrained", str(out)):
        pdm = resolve_pdm(engine, spec, stages=2)
        accepted = verified = 0
        for text in word_prompts(4, seed=99):
            stats = generate_spd(engine.model, pdm, engine.encode_prompt(text, chat=True), 48, GREEDY,
                                 engine.eos_ids).stats
            accepted += stats.accepted_drafts
            verified += stats.accepted_drafts + stats.rejected_drafts
        rates[spec] = accepted / verified
    assert rates[str(out)] > rates["untrained"] + 0.1, rates


def test_self_distilled_answers_are_cached(engine, trained, prompts_file, monkeypatch):
    out, _ = trained
    lines = (out / train.ANSWERS_FILE).read_text().splitlines()
    assert len(lines) == 24
    monkeypatch.setattr(train, "generate_batch", lambda *a, **k: pytest.fail("an answer was regenerated"))
    data = train.load_training_data(engine, small(out, prompts_file, self_distill=True, answer_tokens=48,
                                                  seq_len=64), progress=False)
    assert data.summary["examples"] == 24 and len(data.train) > 0


def test_answer_positions_are_marked_for_validation(engine, prompts_file, tmp_path, monkeypatch):
    answer = [250, 251, 252, 2]  # bytes no prompt contains, then end of turn
    monkeypatch.setattr(train, "generate_batch", lambda model, prompts, *rest: [answer] * len(prompts))
    data = train.load_training_data(engine, small(tmp_path, prompts_file, self_distill=True, val_fraction=0.3),
                                    progress=False)
    assert data.val_answers.shape == data.val.shape and data.val_answers.any()
    assert torch.equal(data.val_answers & (data.val != 2), torch.isin(data.val, torch.tensor(answer[:3])))


def test_resume_after_interruption_is_bit_exact(engine, text_file, tmp_path, monkeypatch):
    """Also shows that keeping the target's outputs is a pure speed-up: the reference run recomputes them."""
    straight = tmp_path / "straight"
    assert not train_pdm(engine, small(straight, text_file, target_cache_gb=0), progress=False)["target_cache"]

    stopped = tmp_path / "stopped"
    calls = {"n": 0}
    own_step = train._train_step

    def step_then_die(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # after the checkpoint at step 4, before the one at step 8
            raise KeyboardInterrupt
        return own_step(*args)

    monkeypatch.setattr(train, "_train_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_pdm(engine, small(stopped, text_file), progress=False)
    assert latest_checkpoint(stopped).name == "step-00000004"
    monkeypatch.setattr(train, "_train_step", own_step)
    report = train_pdm(engine, small(stopped, text_file, resume=True), progress=False)
    assert report["steps"] == 12

    assert report["target_cache"]
    a, b = load_file(str(straight / WEIGHTS_FILE)), load_file(str(stopped / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(latest_checkpoint(straight) / TRAINER_STATE_FILE, weights_only=True)
    sb = torch.load(latest_checkpoint(stopped) / TRAINER_STATE_FILE, weights_only=True)
    assert sa["step"] == sb["step"] == 12
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(sa["rng"]["sampler"], sb["rng"]["sampler"])
    assert sa["scheduler"] == sb["scheduler"] and sa["running"] == sb["running"]
    assert torch.equal(sa["data_order"]["order"], sb["data_order"]["order"])


def test_resume_refuses_other_settings(engine, text_file, tmp_path):
    train_pdm(engine, small(tmp_path, text_file, steps=4), progress=False)
    with pytest.raises(UserError, match="lr"):
        train_pdm(engine, small(tmp_path, text_file, steps=4, lr=5e-4, resume=True), progress=False)
    # Resuming a finished run changes nothing and reports again.
    report = train_pdm(engine, small(tmp_path, text_file, steps=4, resume=True), progress=False)
    assert report["steps"] == 4


def test_checkpoint_is_atomic_when_saving_fails(engine, text_file, tmp_path, monkeypatch):
    own_save = torch.save
    calls = {"n": 0}

    def save_half_then_fail(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 8) dies half-written
            with open(path, "wb") as handle:
                handle.write(b"partial")
            raise OSError("disk full")
        return own_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        train_pdm(engine, small(tmp_path, text_file), progress=False)
    root = tmp_path / CHECKPOINT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004"]
    assert sorted(p.name for p in (root / "step-00000004").iterdir()) == sorted(
        ["pdm_config.json", WEIGHTS_FILE, TRAINER_STATE_FILE])
    monkeypatch.setattr(torch, "save", own_save)
    assert train_pdm(engine, small(tmp_path, text_file, resume=True), progress=False)["steps"] == 12


# ---------------------------------------------------------------------- data and vocabulary
def test_chat_formats_render_with_the_template(engine, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello there"}]}) + "\n" +
                    json.dumps({"turns": ["how are you", "fine thanks"]}) + "\n")
    got = train.load_training_data(engine, small(tmp_path, data, seq_len=8, val_fraction=0), progress=False)
    stream = got.train.flatten().tolist()
    expected = engine.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n"
                                       "<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\nfine "
                                       "thanks<|im_end|>\n")
    assert got.val.shape[0] == 0 and got.train.shape[1] == 8
    assert stream == expected[: len(expected) // 8 * 8]  # packed in order; the remainder is dropped


def test_text_files_become_passages_and_prompts(tmp_path):
    text = "\n\n".join(" ".join([f"w{i}"] * 30) for i in range(10)) + "\n\n" + " ".join(["long"] * 300)
    pieces = train.passages(text)
    assert "".join(pieces) == text + "\n\n"  # verbatim: raw-text training sees the file as written
    assert [len(p.split()) for p in pieces] == [90, 90, 90, 330]
    path = tmp_path / "book.txt"
    path.write_text(text)
    prompts = train._examples(path, self_distill=True)
    assert [p[0]["role"] for p in prompts] == ["user"] * 4
    assert prompts[1][0]["content"] == train.PASSAGE_INSTRUCTIONS[1] + "\n\n" + " ".join(pieces[1].split())
    assert len(prompts[3][0]["content"].split()) == len(train.PASSAGE_INSTRUCTIONS[0].split()) + train.PROMPT_WORDS


def test_validation_holds_whole_examples(engine, text_file, tmp_path):
    data = train.load_training_data(engine, small(tmp_path, text_file, val_fraction=0.2), progress=False)
    pieces = [engine.tokenizer.encode(p) for p in train.passages(text_file.read_text())]
    assert data.summary["val_examples"] >= 1 and len(data.val) >= 0.15 * (len(data.train) + len(data.val))
    val_stream, train_stream = data.val.flatten().tolist(), data.train.flatten().tolist()

    def contains(stream, piece):
        return any(stream[i: i + len(piece)] == piece for i in range(len(stream) - len(piece) + 1))
    whole_in_val = [p for p in pieces if contains(val_stream, p)]
    assert whole_in_val and not any(contains(train_stream, p) for p in whole_in_val)


def test_draft_vocab_ranks_data_and_predictions():
    data = torch.tensor([[5, 5, 5, 7, 7, 9]])
    predicted = torch.tensor([[3, 3, 3, 3]])
    assert choose_draft_vocab(data, predicted, 12, 2).tolist() == [3, 5]
    assert choose_draft_vocab(data, predicted, 12, 4).tolist() == [3, 5, 7, 9]
    assert choose_draft_vocab(data, predicted, 12, 100).tolist() == list(range(12))  # capped at V


# ---------------------------------------------------------------------- CLI and mistakes
def parse(argv):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_trains_and_prints_json(engine, text_file, tmp_path, capsys):
    args = parse(["--model", str(engine.model_dir), "--stages", "2", "--data", str(text_file), "--seq-len", "32",
                  "--steps", "3", "--batch-size", "2", "--draft-vocab", "64", "--out", str(tmp_path), "--json"])
    assert train.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3 and report["val"]["positions"] > 0
    assert resolve_pdm(engine, str(tmp_path), stages=2).config.draft_vocab_size == 64


@pytest.mark.parametrize("case", ["missing file", "empty file", "bad suffix", "bad jsonl", "too short",
                                  "bad stages", "bad stage layers", "bad anchors", "bad lr"])
def test_bad_inputs_are_user_errors(engine, text_file, tmp_path, case):
    empty, bad_json, csv = tmp_path / "empty.txt", tmp_path / "bad.jsonl", tmp_path / "data.csv"
    empty.write_text("   \n")
    bad_json.write_text("{not json\n")
    csv.write_text("a,b\n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    options = {
        "missing file": small(tmp_path, tmp_path / "nope.txt"),
        "empty file": small(tmp_path, empty),
        "bad suffix": small(tmp_path, csv),
        "bad jsonl": small(tmp_path, bad_json),
        "too short": small(tmp_path, short),
        "bad stages": small(tmp_path, text_file, stages=9),
        "bad stage layers": small(tmp_path, text_file, stages=None, stage_layers=[1, 1]),
        "bad anchors": small(tmp_path, text_file, anchors="0,x"),
        "bad lr": small(tmp_path, text_file, lr=0.0),
    }[case]
    with pytest.raises(UserError):
        train_pdm(engine, options, progress=False)


def test_pdm_save_leaves_no_temporary_files(engine, tmp_path, monkeypatch):
    """A save that fails removes its temporary file; one killed earlier left files that the next save removes."""
    pdm = PDM.create(engine.model, partition_layers(engine.model.config.num_layers, 2))
    (tmp_path / f".{WEIGHTS_FILE}.4321.tmp").write_bytes(b"half a file")  # pid 4321 was killed

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("spd_engine.pdm.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        pdm.save(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    pdm.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pdm_config.json", WEIGHTS_FILE])
