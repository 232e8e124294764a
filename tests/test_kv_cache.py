"""Static KV cache: capacity guard, O(1) rollback semantics, and rollback through the model."""
import pytest
import torch

from spd_engine.errors import CapacityError
from spd_engine.kv_cache import KVCache
from spd_engine.model import Model
from tiny_models import VOCAB, make_tiny_model


def test_capacity_is_a_clear_error():
    cache = KVCache(2, 16, 2, 8, torch.float32, "cpu")
    cache.check_room(16)
    with pytest.raises(CapacityError, match="exceeds the KV cache capacity of 16"):
        cache.check_room(17)


def test_rollback_only_lowers_lengths_and_moves_no_data():
    cache = KVCache(3, 16, 2, 8, torch.float32, "cpu")
    cache.k.normal_()
    before = cache.k.clone()
    cache.set_lengths(10)
    cache.set_lengths(4, start=2)
    cache.rollback(6)
    assert cache.lengths.flatten().tolist() == [6, 6, 4]
    cache.rollback(torch.tensor([5], dtype=torch.int32))
    assert cache.lengths.flatten().tolist() == [5, 5, 4]
    assert torch.equal(cache.k, before)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return Model.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.mark.parametrize("decoded,rolled_back", [(5, 2), (4, 4), (7, 1)])
def test_rollback_equals_never_having_decoded(model, decoded, rolled_back):
    """Decode k tokens, roll back j, decode again: logits equal those of never decoding the rolled-back ones."""
    L = model.config.num_layers
    prompt = torch.randint(0, VOCAB, (1, 6))
    extra = torch.randint(0, VOCAB, (1, decoded))
    replacement = torch.randint(0, VOCAB, (1, 3))
    cache = model.new_cache(64)
    model.forward_layers(model.embed(prompt), 0, L, cache)
    for t in range(decoded):
        model.forward_layers(model.embed(extra[:, t:t + 1]), 0, L, cache)
    keep = 6 + decoded - rolled_back
    cache.rollback(keep)
    got = model.logits(model.forward_layers(model.embed(replacement), 0, L, cache))

    fresh = model.new_cache(64)
    prefix = torch.cat([prompt, extra[:, :decoded - rolled_back]], 1)
    model.forward_layers(model.embed(prefix), 0, L, fresh)
    expected = model.logits(model.forward_layers(model.embed(replacement), 0, L, fresh))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
