"""Tiny random Hugging Face checkpoints of every supported family, written with transformers' own classes, and
tiny training data."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

import spd_engine

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 259  # 3 specials + 256 byte tokens

FAMILIES = {
    "llama": dict(),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
}


def write_byte_tokenizer(model_dir: Path) -> None:
    """A byte-level BPE with no merges: every UTF-8 byte is a token, plus ChatML specials (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))


def make_tiny_model(model_dir: Path, family: str = "llama", dtype: torch.dtype = torch.float32,
                    tied: bool = True, layers: int = 4, seed: int = 0, max_shard_size: str = "5GB") -> Path:
    import transformers

    extra = dict(FAMILIES[family])
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, eos_token_id=2, bos_token_id=1)
    if family.startswith("llama"):
        rope = extra.pop("rope_scaling", None)
        config = transformers.LlamaConfig(**common, rope_theta=10000.0, **extra)
        if rope and hasattr(config, "rope_parameters"):  # transformers >= 5
            config.rope_parameters = dict(rope, rope_theta=10000.0)
        elif rope:
            config.rope_scaling = rope
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=10000.0)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.Qwen3Config(**common, rope_theta=10000.0, **extra)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # HF's 0.02 init gives near-uniform logits; widen so argmax is decisive
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        if family == "qwen2":
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.to(dtype).save_pretrained(model_dir, safe_serialization=True, max_shard_size=max_shard_size)
    write_byte_tokenizer(Path(model_dir))
    return Path(model_dir)


def write_tiny_chats(path: Path, count: int = 24, seed: int = 0) -> Path:
    """``count`` short user/assistant chats over a 15-word vocabulary, in train-pdm's JSONL format."""
    rng = random.Random(seed)
    words = "the cat dog sat on a mat big red blue ran fast slow and then".split()
    Path(path).write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=8))},
                                 {"role": "assistant", "content": " ".join(rng.choices(words, k=24))}]}) + "\n"
        for _ in range(count)))
    return Path(path)


# For `python -m spd_engine` subprocesses started from another directory: they must import the code under test,
# not an installed copy, and use one thread like the in-process tests.
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
    [str(Path(spd_engine.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))


def oracle_drafts(monkeypatch, owner, method: str, reference: list[int], prompt_len: int, hit_rate: float,
                  seed: int = 0) -> None:
    """Make ``owner.method`` (a pipeline state's draft step, returning (token, q)) propose the right token with
    probability ``hit_rate`` and its own draft otherwise, so both the accept and the reject paths run, in any
    mix. The right token for the position after ``newest`` is ``reference[newest + 1 - prompt_len]``."""
    import random

    import torch

    rng = random.Random(seed)
    own_draft = getattr(owner, method)

    def draft(self, *args):
        token, q = own_draft(self, *args)
        index = int(self.newest) + 1 - prompt_len
        if index < len(reference) and rng.random() < hit_rate:
            return torch.tensor([reference[index]]), q
        return token, q

    monkeypatch.setattr(owner, method, draft)


def second_token_law(model, prompt: list[int], params, first_probs):
    """Exact target marginal of the second generated token: sum over t1 of p(t1) p(t2 | prompt, t1)."""
    import torch

    from spd_engine.decode import prefill
    from spd_engine.sampling import target_probs

    marginal = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for t1 in torch.nonzero(first_probs).flatten().tolist():
        logits = prefill(model, model.new_cache(64), prompt + [t1])
        marginal += first_probs[t1].double() * target_probs(logits, params)[0].double()
    return marginal


def first_two_token_counts(generate, samples: int):
    """Counts of the first and of the second generated token over ``samples`` seeded runs (``generate(seed)``
    returns a result with ``token_ids`` and stats with ``accepted_drafts`` / ``rejected_drafts``), and the
    drafts accepted and rejected in all of them."""
    import torch

    firsts, seconds = torch.zeros(VOCAB), torch.zeros(VOCAB)
    accepted = rejected = 0
    for seed in range(samples):
        result = generate(seed)
        firsts[result.token_ids[0]] += 1
        seconds[result.token_ids[1]] += 1
        accepted += result.stats.accepted_drafts
        rejected += result.stats.rejected_drafts
    return firsts, seconds, accepted, rejected


def assert_counts_follow(counts, probs, samples: int) -> None:
    """Chi-square goodness of fit (p > 1e-3) of ``samples`` draws counted per token against ``probs``, and not
    one draw outside its support."""
    from scipy.stats import chisquare

    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support].double() / probs[support].double().sum() * samples
    assert chisquare(counts[support].double().numpy(), expected.numpy()).pvalue > 1e-3
