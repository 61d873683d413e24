"""`sdturbo generate`: writes PNGs with parameters; every bad input is one `error:` line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdturbo.cli import main
from sdturbo.output import read_parameters


def generate(tmp_path, model, *args) -> int:
    return main(["generate", "a red circle", "--model", str(model), "--device", "cpu", "--dtype", "fp32", *args])


def test_generate_writes_png_with_parameters(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert generate(tmp_path, tiny_model_dir, "-o", str(out), "--seed", "5", "--size", "64x64") == 0
    assert Image.open(out).size == (64, 64)
    params = read_parameters(out)
    assert params.startswith("a red circle\n")
    for field in ("Steps: 1", "Sampler: Euler a", "Seed: 5", "Size: 64x64", f"Model: {tiny_model_dir.name}"):
        assert field in params
    captured = capsys.readouterr()
    assert "generated 1 image(s) in" in captured.err


def test_generate_n_images_get_consecutive_seeds_and_reproduce(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert generate(tmp_path, tiny_model_dir, "-o", str(out), "--seed", "10", "--n", "2", "--steps", "2") == 0
    first, second = tmp_path / "many-0.png", tmp_path / "many-1.png"
    assert "Seed: 10" in read_parameters(first) and "Seed: 11" in read_parameters(second)
    again = tmp_path / "again.png"
    assert generate(tmp_path, tiny_model_dir, "-o", str(again), "--seed", "11", "--steps", "2") == 0
    # Same numbers up to float rounding (batched kernels round differently): at most 1/255 apart.
    diff = np.abs(np.asarray(Image.open(again), dtype=int) - np.asarray(Image.open(second), dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_generate_without_seed_prints_the_seed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r.png"
    assert generate(tmp_path, tiny_model_dir, "-o", str(out)) == 0
    seed_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seed: ")]
    assert seed_line and f"Seed: {seed_line[0].split()[1]}," in read_parameters(out)


def test_img2img_from_file(tiny_model_dir, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "edit.png"
    assert generate(tmp_path, tiny_model_dir, "-o", str(out), "--image", str(src), "--strength", "0.5",
                    "--steps", "2", "--seed", "1") == 0
    assert "Denoising strength: 0.5" in read_parameters(out)


def bad(tmp_path, capsys, model, *args, match: str):
    code = generate(tmp_path, model, "-o", str(tmp_path / "bad.png"), *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and match in err[-1], err
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--size", "500x512"], "--size 500x512: width and height must be multiples of 8"),
        (["--size", "512x0"], "--size 512x0: width and height must be multiples of 8"),
        (["--steps", "0"], "--steps must be from 1 to 50"),
        (["--steps", "99"], "--steps must be from 1 to 50"),
        (["--n", "0"], "--n must be from 1 to 64"),
    ],
)
def test_bad_generation_settings(tiny_model_dir, tmp_path, capsys, args, match):
    bad(tmp_path, capsys, tiny_model_dir, *args, match=match)


def test_bad_strength_and_unreadable_images(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(src)
    bad(tmp_path, capsys, tiny_model_dir, "--image", str(src), "--strength", "1.5", match="strength must be in (0, 1]")
    bad(tmp_path, capsys, tiny_model_dir, "--image", str(src), "--strength", "0", match="strength must be in (0, 1]")
    bad(tmp_path, capsys, tiny_model_dir, "--image", str(tmp_path / "nope.png"), match="does not exist")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    bad(tmp_path, capsys, tiny_model_dir, "--image", str(junk), match="cannot be read as an image")


def test_bad_weights_and_models(tiny_model_dir, tmp_path, capsys):
    bad(tmp_path, capsys, tmp_path / "missing-folder", match="missing-folder")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bad(tmp_path, capsys, corrupt, "--tokenizer", str(tiny_model_dir), match="corrupt")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04pickle")
    bad(tmp_path, capsys, pickle, match="safetensors")


def test_truncated_weights_file(tiny_model_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad(tmp_path, capsys, model, match="unet")


def test_unknown_model_id_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = main(["generate", "x", "--model", "nobody/no-such-model", "-o", str(tmp_path / "o.png"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "nobody/no-such-model" in err[-1]


@pytest.mark.parametrize("output,match", [("missing-dir/out.png", "does not exist"), ("out.jpg", "must end in .png")])
def test_unwritable_output(tiny_model_dir, tmp_path, capsys, output, match):
    code = generate(tmp_path, tiny_model_dir, "-o", str(tmp_path / output))
    assert code == 2 and match in capsys.readouterr().err


def test_output_in_read_only_folder_leaves_nothing(tiny_model_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    code = generate(tmp_path, tiny_model_dir, "-o", str(folder / "x.png"))
    assert code == 2 and "not writable" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails midway removes its temporary file and never creates the target."""
    from sdturbo import output

    image = Image.new("RGB", (8, 8))

    def failing_rename(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(output.os, "replace", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        output.save_png(image, tmp_path / "x.png", "p")
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point_prints_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdturbo", "generate", "x", "--model", str(tmp_path / "nothing"), "-o",
         str(tmp_path / "o.png"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_generate_with_an_fp32_vae(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "bf16",
                 "--vae-dtype", "fp32", "-o", str(out), "--seed", "1"]) == 0
    assert Image.open(out).size == (64, 64)
    assert "(cpu, bfloat16, VAE float32)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, fast", [([], True), (["--no-fast"], False)])
def test_generate_takes_the_fast_path_unless_told_not_to(tiny_model_dir, tmp_path, monkeypatch, flag, fast):
    from sdturbo import speed

    calls = []
    real_optimize = speed.optimize
    monkeypatch.setattr(speed, "optimize", lambda pipe, **kw: calls.append(kw) or real_optimize(pipe, **kw))
    out = tmp_path / "img.png"
    assert generate(tmp_path, tiny_model_dir, "-o", str(out), "--seed", "2", *flag) == 0
    assert Image.open(out).size == (64, 64)
    assert calls == ([{"compile": False, "compile_mode": None}] if fast else [])
