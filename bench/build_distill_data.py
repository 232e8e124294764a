"""Self-distillation data for training a draft module (PDM): prompts from corpus passages, answered by the target.

    python bench/build_distill_data.py /work/shared/data/corpora/austen.txt /work/shared/data/corpora/kjv.txt \
        --out data.jsonl --prompts 256 --answer-tokens 128 --seed 0

* Prompts: random passages of the given plain-text corpora (``train.passages``), each under one of several varied
  instructions (continue, summarise, explain, characters, questions, rewrite, and a few that ask for a short
  program or a worked arithmetic problem drawn from the passage, so the answers also cover code and maths).
* Answers: the target's own greedy answers (``generate_batch`` through ``train.self_distill``), batched.
* Output: JSONL chats ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``; train-pdm renders
  them with the model's chat template (``--data data.jsonl``, no ``--self-distill``).
* Resumable: every answer is appended to ``<out>.answers.jsonl`` (``train.AnswerCache``) as soon as its batch is
  done, so a rerun with the same arguments only generates what is missing. The JSONL itself is written to a
  temporary file and renamed into place at the end (atomic).

The evaluation prompts (/work/shared/data/eval) are never read here.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from spd_engine import train
from spd_engine.engine import Engine
from spd_engine.train import AnswerCache, passages, self_distill

INSTRUCTIONS = (
    "Continue this passage.",
    "Continue this passage in the same style for a few more sentences.",
    "Summarise this passage.",
    "Summarise this passage in three bullet points.",
    "Explain in plain English what happens in this passage.",
    "Who are the characters in this passage, and what do we learn about them?",
    "What is the main idea of this passage?",
    "Rewrite this passage in modern English.",
    "Write three questions a teacher might ask about this passage, with answers.",
    "Describe the tone and mood of this passage.",
    "Translate the key points of this passage into a short list of facts.",
    "Write a short Python function inspired by this passage, with a docstring and a comment.",
    "Make up a simple arithmetic word problem about the people or things in this passage, then solve it step by step.",
    "Write a short poem based on this passage.",
    "Give a title for this passage and explain your choice.",
)


def build_prompts(corpora: list[str], count: int, seed: int, min_words: int, max_words: int) -> list[str]:
    """``count`` prompts: a random passage from a random corpus (round robin over corpora) under a random ask."""
    rng = random.Random(seed)
    pools = []
    for path in corpora:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        # passages() keeps whole paragraphs; cap each at max_words so prompts stay short
        pool = [" ".join(p.split()[:max_words]) for p in passages(text, min_words) if len(p.split()) >= min_words // 2]
        rng.shuffle(pool)
        pools.append(pool)
    prompts = []
    for i in range(count):
        pool = pools[i % len(pools)]
        passage = pool[(i // len(pools)) % len(pool)]
        prompts.append(f"{rng.choice(INSTRUCTIONS)}\n\n{passage}")
    return prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpora", nargs="+", help="plain-text corpora (.txt)")
    p.add_argument("--out", required=True, help="output JSONL of chats")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-words", type=int, default=40)
    p.add_argument("--max-words", type=int, default=110)
    p.add_argument("--batch", type=int, default=train.SELF_DISTILL_BATCH, help="prompts answered together")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    args = p.parse_args(argv)
    for path in args.corpora:
        if "/eval/" in str(Path(path).resolve()) or not str(path).endswith(".txt"):
            p.error(f"'{path}': give plain-text training corpora (.txt), never the eval prompt sets")

    started = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    tokenizer = engine.tokenizer
    texts = build_prompts(args.corpora, args.prompts, args.seed, args.min_words, args.max_words)
    prompt_ids = [engine.encode_prompt(text, chat=True) for text in texts]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = AnswerCache(out.with_name(out.name + ".answers.jsonl"), engine.model_spec)
    train.SELF_DISTILL_BATCH = args.batch  # self_distill reads the module constant at call time
    pairs, skipped = self_distill(engine, prompt_ids, args.answer_tokens, cache, progress=True)
    eos = engine.eos_ids
    limit = engine.model.config.max_position_embeddings
    fitting = [(text, ids) for text, ids in zip(texts, prompt_ids) if len(ids) + args.answer_tokens <= limit]

    records, answer_tokens = [], 0
    for (text, _), (_, answer) in zip(fitting, pairs):
        answer_tokens += len(answer)
        if answer and answer[-1] in eos:  # the chat template closes the assistant turn itself
            answer = answer[:-1]
        records.append({"messages": [{"role": "user", "content": text},
                                     {"role": "assistant", "content": tokenizer.decode(answer)}]})
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(json.dumps({"out": str(out), "chats": len(records), "skipped_for_length": skipped,
                      "prompt_tokens": sum(len(ids) for _, ids in fitting), "answer_tokens": answer_tokens,
                      "seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads()}),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
