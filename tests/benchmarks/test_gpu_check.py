"""benchmarks/gpu_check.py on TINY sizes on the CPU (no compile): every stage the GPU run depends on completes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_gpu_check_dry_run_completes_every_eager_stage(tmp_path):
    pytest.importorskip("diffusers")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--config", "small",
               "--skip-compile", "--runs", "1", "--warmup", "0", "--batches", "2"]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not [k for k in report["notes"] if k.endswith("_error")], report["notes"]
    stages = {row["stage"] for row in report["rows"]}
    assert stages == {"plain_eager", "fast_eager", "vae_dtype", "batch_fast_eager", "fast_eager_128px"}
    assert {row["impl"] for row in report["rows"] if row["stage"] == "plain_eager"} == {"sdturbo", "diffusers"}
    assert report["notes"]["fast_eager_max_abs_vs_plain"] < 2e-2
    assert "vae_precision" in report["notes"]
