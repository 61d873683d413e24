"""benchmarks/gpu_add_step.py on TINY sizes on the CPU: the script the GPU run uses works end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_add_step.py"


def test_tiny_add_step_runs_both_variants(tmp_path):
    command = [sys.executable, str(SCRIPT), "--config", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "1"]
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_add_step.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["bf16", "fp32-master"]
    for row in report["rows"]:
        assert row["losses_finite"] and row["step_s"] > 0, row
    assert "fp32-master" in result.stdout  # the table
