"""Build a self-distilled training set and its feature cache: ``spd-engine build-data``.

    spd-engine build-data --model default --out data/v4 --prompts 8192 --shard-size 256

For each shard of prompts (from :mod:`spd_engine.prompt_gen`, seeded per prompt) the target answers greedily,
many prompts at once with continuous batching (a finished row takes the next prompt at once), and every hidden
state the draft module may read is captured while it does so: the anchors at the layer counts of
``--feature-layers`` (0 = embedding output, L = the last layer's output, from which the teacher's logits are
recomputed through the frozen final norm and head). Nothing is run twice.

A shard is two things, each written under a temporary name and renamed into place:

* ``shard-NNNNN.jsonl.gz``: one conversation per line ``{id, domain, prompt, prompt_ids, answer_ids}``: small,
  kept in git, never packed across chats;
* ``shard-NNNNN.features.npy``: (rows, F, H) bfloat16 bits (uint16), memory-mapped at training time; a
  sequence of P prompt and A answer tokens owns P + A - 1 rows (its last token is never fed back), in order.

``manifest.json`` lists the finished shards and is rewritten atomically after each one: an interrupted build
resumes at the first missing shard and ends identical to an uninterrupted one (same seed, batch and threads).
``--no-features`` writes only the token shards (what git keeps); the features are then rebuilt by running the
same command again with features on. :mod:`spd_engine.feature_cache` reads and checks the result.

Under torchrun (``--distributed``) the shards still to build are dealt to the ranks, one per rank per round;
each rank writes its own shard files, and after every round rank 0 alone rewrites the manifest with all of
them. A shard depends only on the seed, its index and the settings, so the result is byte for byte that of
one process (with the same thread count per process), and resumes the same way.
"""
from __future__ import annotations

import errno
import gzip
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import UserError
from .jsonl import write_text_atomic
from .model import AnchorCapture, Model
from .pdm import target_identity
from .prompt_gen import PROMPT_MIXES, Prompt, make_prompt
from .runtime.data_parallel import SINGLE, Replicas
from .sampling import SamplingParams, next_token

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
# Hidden-state indices kept by default: every stage boundary of the even/uneven splits into 2, 3, 4, 5, 6 and
# 8 stages of a 30-layer model would be too many; these cover n in {2, 4, 8} (boundaries 4..30) plus the
# embedding and the final layer's output, so one cache trains PDMs for each of them.
DEFAULT_FEATURE_LAYERS = "0,4,8,12,15,16,20,23,24,27,30"
SELF_INSTRUCT_TOKENS = 64  # a question the target writes for itself is short


def shard_paths(out_dir: Path, index: int) -> tuple[Path, Path]:
    return out_dir / f"shard-{index:05d}.jsonl.gz", out_dir / f"shard-{index:05d}.features.npy"


@dataclass
class Finished:
    answer: list[int]
    features: torch.Tensor | None  # (prompt + answer - 1, F, H)


@torch.inference_mode()
def generate_with_features(model: Model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int],
                           batch: int, feature_layers: list[int] | None, progress=None,
                           temperature: float = 0.0, seeds: list[int] | None = None) -> list[Finished]:
    """Greedy answers to ``prompts`` with continuous batching over ``batch`` cache rows, capturing the hidden
    states at ``feature_layers`` (layer counts) of every fed token. A row whose answer ends (EOS or the limit)
    is reset and prefilled with the next waiting prompt before the next step, so no row idles while work is
    left; an idle row (nothing left to take) decodes a dummy token at position 0 and is ignored.

    ``temperature`` > 0 samples instead (self-instruct requests), each prompt from its own generator seeded by
    ``seeds[i]``: a prompt's draws do not depend on which row or step it lands in."""
    sampling = SamplingParams(temperature)
    generators = None if sampling.greedy else \
        [torch.Generator(device=model.device).manual_seed(seed) for seed in seeds]

    def choose(logits: torch.Tensor, index: int) -> int:  # one row's next token
        if generators is None:
            return int(logits.argmax(-1))
        return int(next_token(logits, sampling, generators[index]))
    L, H = model.config.num_layers, model.config.hidden_size
    capacity = -(-(max(map(len, prompts), default=1) + max_new_tokens) // 64) * 64
    cache = model.new_cache(capacity, batch=batch)
    waiting = list(range(len(prompts)))[::-1]  # popped from the end: prompt order
    slot_of: list[int | None] = [None] * batch
    answers: dict[int, list[int]] = {}
    buffers: dict[int, torch.Tensor] = {}
    results: list[Finished | None] = [None] * len(prompts)
    tokens = torch.zeros(batch, dtype=torch.long, device=model.device)

    # One decode step's features for every row, captured in place, then copied to each active row's buffer.
    step_features = None if feature_layers is None else \
        torch.empty(batch, 1, len(feature_layers), H, dtype=model.dtype, device=model.device)
    step_capture = None if feature_layers is None else AnchorCapture(tuple(feature_layers), step_features)

    def admit(b: int) -> None:
        index = waiting.pop()
        ids = prompts[index]
        slot_of[b] = index
        answers[index] = []
        row = cache.row(b)
        row.lengths.zero_()
        prompt = torch.tensor([ids], dtype=torch.long, device=model.device)
        embedded = model.embed(prompt)
        capture = None
        if feature_layers is not None:
            buffers[index] = torch.empty(len(ids) + max_new_tokens, len(feature_layers), H, dtype=model.dtype)
            capture = AnchorCapture(tuple(feature_layers), buffers[index][: len(ids)])
            if 0 in feature_layers:
                capture.out[:, feature_layers.index(0)] = embedded[0]
        hidden = model.forward_layers(embedded, 0, L, row, anchors=capture)
        first = choose(model.logits(hidden[:, -1])[0], index)
        answers[index].append(first)
        tokens[b] = first

    def finish_if_done(b: int) -> None:
        index = slot_of[b]
        answer = answers[index]
        if len(answer) < max_new_tokens and answer[-1] not in eos_ids:
            return
        rows = len(prompts[index]) + len(answer) - 1
        results[index] = Finished(answer, buffers.pop(index)[:rows].clone() if feature_layers is not None else None)
        del answers[index]
        slot_of[b] = None
        if progress is not None:
            progress.update(len(answer))

    for b in range(batch):
        if waiting:
            admit(b)
            finish_if_done(b)
    while any(s is not None for s in slot_of) or waiting:
        for b in range(batch):  # refill free rows (a one-token answer may free a row at once)
            while slot_of[b] is None and waiting:
                admit(b)
                finish_if_done(b)
        active = [b for b in range(batch) if slot_of[b] is not None]
        if not active:
            break
        for b in range(batch):
            if slot_of[b] is None:
                cache.lengths[:, b] = 0  # idle: keep writing position 0, never read
        # Position of the token being fed, per active slot: prompt + answer so far - 1.
        positions = [(b, len(prompts[slot_of[b]]) + len(answers[slot_of[b]]) - 1) for b in active]
        embedded = model.embed(tokens[:, None])
        if step_features is not None and 0 in feature_layers:
            step_features[:, :, feature_layers.index(0)] = embedded
        hidden = model.forward_layers(embedded, 0, L, cache, anchors=step_capture)
        if step_features is not None:
            for b, p in positions:
                buffers[slot_of[b]][p] = step_features[b, 0]
        logits = model.logits(hidden[:, -1])
        if generators is None:
            tokens.copy_(logits.argmax(-1))
        else:
            for b in active:
                tokens[b] = choose(logits[b], slot_of[b])
        for b, token in zip(active, tokens[active].tolist()):
            answers[slot_of[b]].append(token)
            finish_if_done(b)
    return results  # type: ignore[return-value]


def parse_layers(text: str, num_layers: int) -> list[int]:
    try:
        layers = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise UserError(f"--feature-layers must be comma-separated layer counts, got '{text}'") from None
    if not layers or layers[0] < 0 or layers[-1] > num_layers:
        raise UserError(f"--feature-layers must lie in [0, {num_layers}], got '{text}'")
    if num_layers not in layers:
        raise UserError(f"--feature-layers must include {num_layers} (the last layer's output: the teacher)")
    return layers


def _write_atomic(path: Path, writer) -> None:
    """``writer(tmp_path)`` then rename; a full disk is a one-line error and leaves no partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing '{path}'; free space and rerun (finished shards are kept)") \
                from None
        raise


def _chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True), add_bos=False)


def build_shard(engine, prompts: list[Prompt], answer_tokens: int, batch: int, feature_layers: list[int] | None,
                progress=None) -> tuple[list[dict], torch.Tensor | None]:
    """Answer one shard's prompts (self-instruct prompts first write their question); returns the records and
    the stacked features."""
    tokenizer, model = engine.tokenizer, engine.model
    eos = set(engine.eos_ids)
    texts = [p.text for p in prompts]
    for temperature in sorted({p.write_temperature for p in prompts if p.domain == "self_instruct"}):
        asks = [i for i, p in enumerate(prompts) if p.domain == "self_instruct" and p.write_temperature == temperature]
        questions = generate_with_features(model, [_chat_ids(tokenizer, texts[i]) for i in asks],
                                           SELF_INSTRUCT_TOKENS, eos, batch, None, temperature=temperature,
                                           seeds=[prompts[i].write_seed for i in asks])
        for i, question in zip(asks, questions):
            written = tokenizer.decode([t for t in question.answer if t not in eos]).strip()
            texts[i] = written or texts[i]
    prompt_ids = [_chat_ids(tokenizer, text) for text in texts]
    # A prompt that cannot fit its answer in the model's context is left out (counted in the manifest).
    fits = [i for i, ids in enumerate(prompt_ids) if len(ids) + answer_tokens <= model.config.max_position_embeddings]
    finished = generate_with_features(model, [prompt_ids[i] for i in fits], answer_tokens, eos, batch,
                                      feature_layers, progress)
    records = [{"id": prompts[i].id, "domain": prompts[i].domain, "prompt": texts[i], "prompt_ids": prompt_ids[i],
                "answer_ids": f.answer} for i, f in zip(fits, finished)]
    features = None
    if feature_layers is not None:
        features = torch.cat([f.features for f in finished]) if finished else \
            torch.empty(0, len(feature_layers), model.config.hidden_size)
    return records, features


def load_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"'{path}' is not a data manifest (corrupt?); remove it to rebuild from the shards") from None
    return manifest


def build_data(engine, out_dir: str | Path, prompts: int, shard_size: int, seed: int, answer_tokens: int,
               batch: int, feature_layers: list[int] | None, corpora: tuple[str, ...] = (),
               progress: bool = True, replicas: Replicas = SINGLE, mix: str = "v2") -> dict:
    """Build (or resume) the data set in ``out_dir``; returns the manifest. ``replicas``: this rank of a
    distributed build, which answers its share of the shards (rank 0 writes the manifest)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if replicas.writer:
        for leftover in out_dir.glob(".*.tmp"):  # a write cut short by a kill: never listed, never read
            leftover.unlink()
    cfg = engine.model.config
    settings = {"format": FORMAT_VERSION, "model": target_identity(cfg), "model_spec": engine.model_spec,
                "dtype": str(engine.model.dtype).replace("torch.", ""), "seed": seed, "shard_size": shard_size,
                "answer_tokens": answer_tokens, "batch": batch, "threads": torch.get_num_threads(),
                "feature_layers": feature_layers,
                "corpora": [Path(c).name for c in corpora], "prompt_mix": mix}
    manifest = load_manifest(out_dir)
    if manifest is None:
        manifest = {**settings, "shards": []}
    else:
        manifest.setdefault("prompt_mix", "v1")  # written before mixes had names
        for key in ("format", "model", "seed", "shard_size", "answer_tokens", "corpora", "prompt_mix"):
            if manifest.get(key) != settings[key]:
                raise UserError(f"'{out_dir}' holds a data set built with {key}={manifest.get(key)!r}; this run asks "
                                f"for {settings[key]!r} (use another --out, or the same settings to resume)")
        if feature_layers is not None and manifest.get("feature_layers") not in (None, feature_layers):
            raise UserError(f"'{out_dir}' caches feature layers {manifest['feature_layers']}, not {feature_layers}")
        manifest["feature_layers"] = feature_layers or manifest.get("feature_layers")
    done = {s["index"]: s for s in manifest["shards"]}
    shards = -(-prompts // shard_size)

    def complete(index: int) -> bool:
        entry = done.get(index)
        need_features = feature_layers is not None and not (entry and entry.get("features"))
        return bool(entry) and shard_paths(out_dir, index)[0].is_file() and not need_features

    todo = [index for index in range(shards) if not complete(index)]
    mine = replicas.deal(todo)
    # Every rank has read the manifest, and rank 0 has removed leftovers, before any rank writes.
    replicas.gather(None, "starting together")
    total = sum(min(shard_size, prompts - i * shard_size) for i in mine)
    bar = tqdm(total=total * answer_tokens, desc="build-data (answer-token budget)", unit="tok",
               disable=not (progress and replicas.writer), file=sys.stderr, smoothing=0.05)
    for round_ in range(-(-len(todo) // replicas.world_size)):
        entry = _build_one(engine, out_dir, mine[round_], done.get(mine[round_]), prompts, shard_size, seed,
                           answer_tokens, batch, feature_layers, corpora, mix, bar) if round_ < len(mine) else None
        for finished in replicas.gather(entry, "collecting finished shards"):
            if finished is not None:
                done[finished["index"]] = finished
        manifest["shards"] = [done[i] for i in sorted(done)]
        manifest["answer_tokens_total"] = sum(s["answer_tokens"] for s in manifest["shards"])
        if replicas.writer:
            write_text_atomic(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1))
    bar.close()
    return manifest


def _build_one(engine, out_dir: Path, index: int, entry: dict | None, prompts: int, shard_size: int, seed: int,
               answer_tokens: int, batch: int, feature_layers: list[int] | None, corpora: tuple[str, ...], mix: str,
               bar) -> dict:
    """Answer shard ``index``, write its files atomically and return its manifest entry (``entry``: the one
    already listed, whose committed text the rebuilt features must reproduce)."""
    text_path, feature_path = shard_paths(out_dir, index)
    started = time.perf_counter()
    chunk = [make_prompt(seed, i, corpora, mix) for i in range(index * shard_size,
                                                               min(prompts, (index + 1) * shard_size))]
    records, features = build_shard(engine, chunk, answer_tokens, batch, feature_layers, bar)
    bar.update(len(chunk) * answer_tokens - sum(len(r["answer_ids"]) for r in records))
    if entry and text_path.is_file():  # rebuilding features for committed text: it must come out the same
        with gzip.open(text_path, "rt") as handle:
            committed = [json.loads(line) for line in handle]
        if committed != records:
            raise UserError(f"shard {index} does not rebuild identically ({text_path}): a different machine, "
                            "thread count or torch build changed the greedy answers")

    def write_text(tmp: Path) -> None:
        # No name and mtime 0 in the gzip header: the same bytes on every rebuild.
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in records).encode())

    _write_atomic(text_path, write_text)
    if features is not None:
        bits = features.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

        def write_features(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, bits)

        _write_atomic(feature_path, write_features)
    return {"index": index, "file": text_path.name, "sequences": len(records),
            "skipped_too_long": len(chunk) - len(records),
            "prompt_tokens": sum(len(r["prompt_ids"]) for r in records),
            "answer_tokens": sum(len(r["answer_ids"]) for r in records),
            "features": feature_path.name if features is not None else None,
            "feature_rows": int(features.shape[0]) if features is not None else None,
            "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    from .cli import _add_model_args

    _add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (shards, features, manifest.json)")
    p.add_argument("--prompts", type=int, default=8192, help="number of prompts (conversations)")
    p.add_argument("--shard-size", type=int, default=256, help="prompts per shard (the unit of resumption)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-mix", choices=sorted(PROMPT_MIXES), default="v2",
                   help="prompt mixture: v2 (mostly requests the target writes itself, sampled) or v1 (the "
                        "templated mix of bench/data/distill_v4)")
    p.add_argument("--answer-tokens", type=int, default=256, help="answer length limit")
    p.add_argument("--batch", type=int, default=48, help="cache rows answered together (continuous batching)")
    p.add_argument("--feature-layers", default=DEFAULT_FEATURE_LAYERS,
                   help="hidden-state indices to cache (0 = embedding, L = last layer's output, required)")
    p.add_argument("--no-features", action="store_true", help="write only the token shards (no feature cache)")
    p.add_argument("--corpus", action="append", default=[], metavar="TXT",
                   help="plain-text file whose paragraphs become passage prompts (optional, repeatable)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as one JSON object")
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun: the ranks share the shards, rank 0 writes the manifest")
    importlib.import_module("spd_engine.runtime.distributed").add_arguments(p)


def run(args) -> int:
    for name in ("prompts", "shard_size", "answer_tokens", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for corpus in args.corpus:
        if not Path(corpus).is_file():
            raise UserError(f"corpus '{corpus}' does not exist")
    if args.distributed:
        from .runtime.data_parallel import run_data_parallel

        return run_data_parallel(args, "torchrun --standalone --nproc-per-node 8 -m spd_engine build-data "
                                       "--distributed --out DIR ...", lambda replicas: _build_and_print(args, replicas))
    return _build_and_print(args, SINGLE)


def _build_and_print(args, replicas: Replicas) -> int:
    from .engine import Engine

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    layers = None if args.no_features else parse_layers(args.feature_layers, engine.model.config.num_layers)
    manifest = build_data(engine, args.out, args.prompts, args.shard_size, args.seed, args.answer_tokens, args.batch,
                          layers, tuple(args.corpus), progress=replicas.writer, replicas=replicas,
                          mix=args.prompt_mix)
    if not replicas.writer:
        return 0
    summary = {"out": args.out, "shards": len(manifest["shards"]),
               "sequences": sum(s["sequences"] for s in manifest["shards"]),
               "answer_tokens": manifest["answer_tokens_total"],
               "prompt_tokens": sum(s["prompt_tokens"] for s in manifest["shards"])}
    print(json.dumps(summary) if args.json else
          f"{summary['sequences']} conversations, {summary['answer_tokens']} answer tokens in {summary['shards']} "
          f"shards under {args.out}")
    return 0
