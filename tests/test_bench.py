"""`sdturbo bench` on the tiny sizes: it times both implementations on shared weights and writes the table and JSON.
No timing is asserted (timings never gate tests)."""

from __future__ import annotations

import json

import pytest

from sdturbo.cli import main


@pytest.mark.parametrize("extra, vae_dtype", [([], "bfloat16"), (["--vae-dtype", "fp32", "--fast"], "float32")])
def test_bench_small_writes_a_table_and_json(tmp_path, capsys, extra, vae_dtype):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    argv = ["bench", "--config", "small", "--device", "cpu", "--dtype", "bf16", "--runs", "2", "--warmup", "0",
            "--steps", "1", "2", "--json", str(out), *extra]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert (report["dtype"], report["vae_dtype"], report["runs"]) == ("bfloat16", vae_dtype, 2)
    parts = [r["part"] for r in report["rows"]]
    assert parts == ["text", "unet", "vae_decode", "to_pil", "end_to_end_1_step", "end_to_end_2_step"]
    for row in report["rows"]:
        assert row["sdturbo_ms"] > 0 and row["diffusers_ms"] > 0
        assert row["ratio"] == pytest.approx(row["sdturbo_ms"] / row["diffusers_ms"])
    table = capsys.readouterr().out
    assert f"cpu bfloat16 (VAE {vae_dtype})" in table and "end_to_end_2_step" in table


def test_bench_rejects_bad_counts(capsys):
    assert main(["bench", "--config", "small", "--runs", "0"]) == 2
    assert "--runs" in capsys.readouterr().err
