"""Checkpoint loading: sharded directories, and every bad input as a clear UserError."""
import json
import sys

import pytest
import torch

from spd_engine.errors import UserError
from spd_engine.model import Model
from spd_engine.weights import resolve_model_path
from tiny_models import VOCAB, make_tiny_model


def test_sharded_checkpoint_equals_single_file(tmp_path):
    single = Model.from_pretrained(make_tiny_model(tmp_path / "single", "qwen2", tied=False))
    sharded_dir = make_tiny_model(tmp_path / "sharded", "qwen2", tied=False, max_shard_size="60KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    sharded = Model.from_pretrained(sharded_dir)
    ids = torch.randint(0, VOCAB, (1, 5))
    a = single.logits(single.forward_layers(single.embed(ids), 0, 4, single.new_cache(64)))
    b = sharded.logits(sharded.forward_layers(sharded.embed(ids), 0, 4, sharded.new_cache(64)))
    assert torch.equal(a, b)


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nowhere"))


def test_truncated_safetensors(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated safetensors"):
        Model.from_pretrained(model_dir)


def test_garbage_safetensors(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="corrupt or truncated safetensors"):
        Model.from_pretrained(model_dir)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unsupported model_type 'gpt2'; supported: llama, qwen2, qwen3"):
        Model.from_pretrained(model_dir)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = make_tiny_model(tmp_path / "m", "llama")
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight"):
        Model.from_pretrained(model_dir)


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match="not a .gguf file"):
        resolve_model_path(str(path))


def test_a_hf_directory_loads_without_the_gguf_package(tmp_path, monkeypatch):
    """gguf is optional: Engine.load of a HF directory never imports it, and a .gguf file without it is one
    clear error that says what to install."""
    from spd_engine import Engine

    monkeypatch.setitem(sys.modules, "gguf", None)  # any `import gguf` now raises ImportError
    engine = Engine.load(str(make_tiny_model(tmp_path / "m", "llama")), device="cpu")
    assert engine.generate(prompt_ids=[5, 6, 7], max_new_tokens=2).token_ids
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setenv("SPD_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"needs the 'gguf' package; fix: pip install 'spd-engine\[gguf\]'"):
        resolve_model_path(str(fake))
