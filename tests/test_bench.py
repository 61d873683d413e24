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


@pytest.fixture
def bench_args(monkeypatch):
    """run_bench's arguments, the run itself stopped: what the CLI would have run."""
    from sdturbo import bench

    calls = []

    def stopped(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("stopped")

    monkeypatch.setattr(bench, "run_bench", stopped)
    return calls


@pytest.mark.parametrize("args, message", [
    (["--json", "nodir/x.json"], "output folder nodir does not exist; create it or choose another --json path"),
    (["--json", "."], "output path . is a folder; give --json a file name such as bench.json"),
    (["--size", "0"], "--size must be a multiple of 8 from 64 to 2048, got 0"),
    (["--size", "100"], "--size must be a multiple of 8 from 64 to 2048, got 100"),
    (["--size", "128"], "--config small runs at 64x64 only: drop --size 128, or time the official sizes with "
                        "--config official"),
    (["--batch", "100000"], "--batch must be from 1 to 64, got 100000"),
    (["--steps", "1", "0"], "--steps must each be from 1 to 50, got 0"),
])
def test_bench_rejects_bad_arguments_before_running(bench_args, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--config", "small", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert bench_args == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, size_px", [(["--config", "small"], 64), ([], 512), (["--size", "1024"], 1024)])
def test_bench_size_defaults_to_the_configs(bench_args, args, size_px):
    assert main(["bench", *args]) == 2  # the stopped run
    assert bench_args[0]["size_px"] == size_px
