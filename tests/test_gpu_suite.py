"""The one-shot GPU suite (bench/gpu_suite.sh) in its CPU dry-run mode: every step runs with tiny shapes on the
torch backend and the Triton interpreter, so the script that a short GPU lease depends on cannot rot."""
from __future__ import annotations

import json
import tarfile
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["preflight", "build", "model", "op_tests", "op_bench", "launches", "decode_tiny", "triton_cache"]

pytestmark = pytest.mark.slow


def test_dry_run_passes_every_step_and_writes_at_most_eight_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    completed = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", str(out)], env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["step"] for s in summary["steps"]] == STEPS
    failed = {s["step"]: s["log_tail"][-2000:] for s in summary["steps"] if s["rc"] != 0}
    assert not failed, failed
    assert summary["ok"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    # Triton's cache (TRITON_CACHE_DIR under OUT) comes back packed as one file, the folder removed.
    assert (out / "triton_cache.tar.gz").is_file() and not (out / "triton_cache").exists()
    with tarfile.open(out / "triton_cache.tar.gz") as archive:
        assert all(name.startswith("triton_cache") for name in archive.getnames())
    decode = json.loads((out / "decode_tiny.json").read_text())
    variants = [row["variant"] for row in decode["results"]]
    assert variants == ["eager", "graph", "hf", "compile", "spd", "spd", "spd"]
    forced = [row for row in decode["results"] if row["variant"] == "spd"]
    assert [row["forced_acceptance"] for row in forced][:2] == ["p=1", "p=0"]
    assert all(row["label"].startswith("FORCED ACCEPTANCE") and row["projection_method"] for row in forced)
    assert forced[0]["acceptance_rate"] == 1.0 and forced[1]["acceptance_rate"] == 0.0
    launches = json.loads((out / "launches.json").read_text())
    assert set(launches["per_layer"]) | set(launches["skipped"]) == {"torch", "triton", "cuda"}
