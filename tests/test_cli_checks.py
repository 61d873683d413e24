"""`sdturbo generate`'s checks that need no model: they fail before the (7 GB) default model loads, in the user's
terms, and leave no file behind; plus what happens to the PNGs it writes."""

from __future__ import annotations

import errno
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdturbo import cli, output, pipeline
from sdturbo.cli import main


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails the test: the checks must come first."""

    def from_pretrained(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.TurboPipeline, "from_pretrained", from_pretrained)


def error_line(capsys, *argv) -> str:
    """The one line of a failed run, after the "loading" lines where it got that far."""
    assert main(["generate", "a fox", *argv]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("loading", "loaded"))]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be from 1 to 50 (1-4 for turbo models), got 0"),
    (["--size", "100x100"], "--size 100x100: width and height must be multiples of 8 from 8 to 2048, such as 96x96"),
    (["--size", "4096x512"], "--size 4096x512: width and height must be multiples of 8 from 8 to 2048, such as "
                             "2048x512"),
    (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["--n", "1000000"], "--n must be from 1 to 64, got 1000000"),
    (["--seed", str(2**64 - 1), "--n", "2"], f"--seed {2**64 - 1} is too large: with --n 2, image i gets seed + i, "
                                             f"and seeds must stay below 2**64; pass a --seed of at most {2**64 - 2}"),
    (["--seed", str(2**64)], f"--seed {2**64} is too large: seeds must stay below 2**64; pass a --seed of at most "
                             f"{2**64 - 1}"),
    (["--seed", str(2**32 - 4), "--steps", "4", "--schedule", "substep"],
     "--seed 4294967292 is too large: --schedule substep needs seed + --steps below 2**32; pass a --seed of at "
     "most 4294967291"),
    (["--strength", "0.5"], "--strength applies to image-to-image: pass --image too, or drop --strength"),
    (["--guidance-scale", "-1"], "--guidance-scale must be 0 or more, got -1.0"),
    (["--guidance-scale", "nan"], "--guidance-scale must be 0 or more, got nan"),
])
def test_bad_settings_fail_before_loading(no_load, tmp_path, capsys, args, message):
    out = tmp_path / "out.png"
    assert error_line(capsys, "-o", str(out), *args) == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_seed_limit_allows_the_last_seed(no_load, tmp_path):
    with pytest.raises(AssertionError, match="loaded"):
        main(["generate", "a fox", "-o", str(tmp_path / "o.png"), "--seed", str(2**64 - 2), "--n", "2"])


@pytest.mark.parametrize("size, args, message", [
    ((3000, 2100), [], "--image is 3000x2100; the largest side is 2048: pass --size WxH to resize it"),
    ((4, 64), [], "--image is 4x64; the smallest side is 8: pass --size WxH to resize it"),
    ((64, 64), ["--strength", "3"], "--strength must be in (0, 1], got 3.0"),
    ((64, 64), ["--strength", "0.01"], "--strength 0.01 needs --steps 100 or more to run one step; the most is 50: use "
                                       "--strength 0.02 or more"),
])
def test_bad_input_images_fail_before_loading(no_load, tmp_path, capsys, size, args, message):
    src = tmp_path / "in.png"
    Image.new("RGB", size).save(src)
    assert error_line(capsys, "-o", str(tmp_path / "out.png"), "--image", str(src), *args) == f"error: {message}"
    assert not (tmp_path / "out.png").exists()


def test_huge_input_image_is_refused_from_its_header(no_load, tmp_path, capsys):
    """10000x10000 pixels are never decoded (nor warned about as a decompression bomb): the file here holds only
    the header that says so."""
    header = _png_header(10000, 10000)
    src = tmp_path / "huge.png"
    src.write_bytes(header)
    message = error_line(capsys, "-o", str(tmp_path / "out.png"), "--image", str(src))
    assert message == "error: --image is 10000x10000; the largest side is 2048: pass --size WxH to resize it"


@pytest.mark.parametrize("size, args", [((2055, 8), []), ((4000, 4000), ["--size", "512x512"])])
def test_input_image_sizes_that_load(no_load, tmp_path, size, args):
    """The image's size rounded down to multiples of 8 is what counts, and --size resizes any image."""
    src = tmp_path / "in.png"
    Image.new("RGB", size).save(src)
    with pytest.raises(AssertionError, match="loaded"):
        main(["generate", "a fox", "-o", str(tmp_path / "o.png"), "--image", str(src), *args])


def test_16_bit_input_image_is_scaled_to_8_bits(tmp_path):
    """convert("RGB") alone clips 16-bit values (0..65535) to 255: a mid-grey PNG would become white."""
    src = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(src)
    image = cli.load_input_image(str(src), None)
    assert image.mode == "RGB" and np.asarray(image).tolist() == np.full((8, 8, 3), 128).tolist()


def test_img2img_step_raise_is_worded_in_cli_terms(tmp_path, capsys):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (64, 64), "red").save(src)
    assert main(["generate", "a fox", "--model", "mini", "--device", "cpu", "--seed", "1", "--image", str(src),
                 "-o", str(out)]) == 0
    warning_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warning_lines == ["warning: --steps 1 x --strength 0.5 runs no step; using --steps 2"]
    assert "Steps: 2," in output.read_parameters(out)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", b"")


def test_output_folder_that_takes_no_file(no_load, capsys):
    """os.access says yes to root in /proc; a real file says no, to everyone."""
    message = error_line(capsys, "-o", "/proc/a.png")
    assert message.startswith("error: output folder /proc is not writable (") and "choose another -o path" in message
    assert ".tmp" not in message


def test_output_folder_that_is_a_file(no_load, tmp_path, capsys):
    (tmp_path / "notimg.png").write_bytes(b"")
    message = error_line(capsys, "-o", str(tmp_path / "notimg.png" / "a.png"))
    assert message == f"error: output folder {tmp_path / 'notimg.png'} is a file, not a folder; choose another -o path"


def test_model_name_in_the_wrong_case_gets_a_hint(tmp_path, capsys):
    message = error_line(capsys, "--model", "Mini", "-o", str(tmp_path / "o.png"))
    assert message.endswith("Mini is neither a folder, a .safetensors file nor a Hugging Face model id; did you mean mini?")


def test_folder_that_is_no_model(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = error_line(capsys, "--model", str(empty), "-o", str(tmp_path / "o.png"))
    assert message == (f"error: {empty} is not a diffusers model folder (no model_index.json, unet/ or vae/ in it); "
                       "pass the folder that holds them, or a single .safetensors file")


def test_help_states_the_limits(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "number of images, 1 to 64" in help_text
    assert "with --image, the image's size rounded down to multiples of 8" in help_text


def test_the_vae_factor_the_cli_checks_is_the_models():
    assert cli.VAE_FACTOR == pipeline.SDXL_TURBO.vae.downscale_factor


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_png_gets_the_mode_of_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = output.save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", "p")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert list(tmp_path.iterdir()) == [path]


def test_failed_write_is_one_line_naming_the_users_path(tmp_path, capsys, monkeypatch):
    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))

    monkeypatch.setattr(output.os, "replace", disk_full)
    out = tmp_path / "a.png"
    message = error_line(capsys, "--model", "mini", "--device", "cpu", "--seed", "1", "-o", str(out))
    assert message == f"error: cannot write {out}: No space left on device"
    assert list(tmp_path.iterdir()) == []
