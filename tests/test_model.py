"""The reference model against Hugging Face transformers, and layer-range composition."""
import pytest
import torch

from spd_engine.decode import prefill
from spd_engine.model import Model
from tiny_models import FAMILIES, VOCAB, make_tiny_model

transformers = pytest.importorskip("transformers")


def _tiny(tmp_path_factory, family, tied=True, dtype=torch.float32):
    return make_tiny_model(tmp_path_factory.mktemp(f"{family}-{tied}-{str(dtype)[6:]}"), family, dtype=dtype, tied=tied)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(tmp_path_factory, family, tied):
    model_dir = _tiny(tmp_path_factory, family, tied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 37))
    with torch.no_grad():
        expected = hf(ids).logits
    model = Model.from_pretrained(model_dir, dtype=torch.float32)
    cache = model.new_cache(64)
    got = model.logits(model.forward_layers(model.embed(ids), 0, model.config.num_layers, cache))
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-4, f"{family} tied={tied}: relative error {rel:.2e}"
    assert (model.lm_head_weight is model.embed_weight) == tied


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_and_track_fp32(tmp_path_factory, dtype):
    model_dir = _tiny(tmp_path_factory, "llama", dtype=dtype)
    ids = torch.randint(0, VOCAB, (1, 11))
    logits = {}
    for compute in (dtype, torch.float32):
        model = Model.from_pretrained(model_dir, dtype=compute)
        assert model.dtype == compute
        logits[compute] = prefill(model, model.new_cache(64), ids[0].tolist()).float()
    rel = (logits[dtype] - logits[torch.float32]).abs().max() / logits[torch.float32].abs().max()
    assert rel < 5e-2


def test_layer_ranges_compose_to_full_forward(tmp_path_factory):
    model = Model.from_pretrained(_tiny(tmp_path_factory, "qwen3"))
    ids = torch.randint(0, VOCAB, (1, 9))
    full_cache, split_cache = model.new_cache(64), model.new_cache(64)
    L = model.config.num_layers
    full = model.forward_layers(model.embed(ids), 0, L, full_cache)
    for a in range(1, L):
        split_cache.reset()
        split = model.forward_layers(model.forward_layers(model.embed(ids), 0, a, split_cache), a, L, split_cache)
        torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)
    assert split_cache.lengths.flatten().tolist() == [9] * L


def test_incremental_decode_matches_one_shot(tmp_path_factory):
    """Token-at-a-time with the cache equals one forward over the whole sequence (positions are the lengths)."""
    model = Model.from_pretrained(_tiny(tmp_path_factory, "llama3"))
    ids = torch.randint(0, VOCAB, (1, 12))
    L = model.config.num_layers
    one_shot = model.logits(model.forward_layers(model.embed(ids), 0, L, model.new_cache(64)))
    cache = model.new_cache(64)
    steps = [model.logits(model.forward_layers(model.embed(ids[:, t:t + 1]), 0, L, cache)) for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), one_shot, rtol=1e-4, atol=1e-5)
