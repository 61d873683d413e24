"""The real driver under torchrun: two gloo processes on the CPU, through the command-line entry point."""

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

LOSSES = ("d_loss", "d_real", "d_fake", "r1", "g_loss", "g_adv", "g_distill")


def train_add_command() -> list[str]:
    """What torchrun runs: `python -m sdturbo train add` once cli.py wires the subcommand, else the driver's own
    entry point, which parses the same flags."""
    from sdturbo.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["train", "add", "--teacher", "t", "--out", "o"])
    except SystemExit:
        return ["-m", "sdturbo.train.driver"]
    return ["-m", "sdturbo", "train", "add"]


def torchrun_train(teacher, out, *flags: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *train_add_command(),
        "--teacher", str(teacher), "--out", str(out), "--steps", "2", "--batch-size", "1", "--discriminator", "tiny",
        "--precision", "fp32", "--device", "cpu", "--sample-every", "0", "--export-dtype", "fp32", "--add.seed", "3",
        *flags,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_parallel_run(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "dp"
    torchrun_train(tiny_teacher, out)
    return out


def test_two_ranks_end_with_identical_weights(data_parallel_run, tiny_teacher):
    out = data_parallel_run
    digests = json.loads((out / "replicas.json").read_text())["sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # student, EMA and heads, bit for bit
    assert [r["step"] for r in read_log(out)] == [0, 1]
    teacher = load_file(str(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    student = load_file(str(out / "checkpoints" / "step_0000002" / "student.safetensors"))
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # it trained
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.slow
def test_fsdp_trains_the_same_model(data_parallel_run, tiny_teacher, tmp_path):
    """FSDP2 on gloo: the sharded student computes and learns what the replicated one does. Step 1's losses
    depend on step 0's update, so matching losses mean matching updates."""
    out = tmp_path / "fsdp"
    torchrun_train(tiny_teacher, out, "--parallelism", "fsdp")
    for sharded, replicated in zip(read_log(out), read_log(data_parallel_run), strict=True):
        assert {k: sharded[k] for k in LOSSES} == pytest.approx({k: replicated[k] for k in LOSSES}, rel=1e-5)
    digests = json.loads((out / "replicas.json").read_text())["sha256"]
    assert digests[0] == digests[1]  # the replicated discriminator heads
    ema = load_file(str(out / "checkpoints" / "step_0000002" / "student_ema.safetensors"))
    exported = load_file(str(out / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # gathered whole from the shards
