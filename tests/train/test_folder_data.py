"""The image-caption folder stream: pairing, resizing, and a seeded order that ranks split without overlap; bad
files (undecodable images, non-UTF-8 captions), EXIF orientation, 16-bit images and symlinked folders."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdturbo.train.folder_data import ImageCaptionFolder, _pass_order, find_examples, read_caption, resize_center_crop


@pytest.fixture
def folder(tmp_path):
    """Five captioned images (one in a subfolder, one JPEG) and one without a caption."""
    (tmp_path / "sub").mkdir()
    names = ["a.png", "b.png", "c.jpg", "d.png", "sub/e.png", "uncaptioned.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (40 + 10 * i, 30), (40 * i, 0, 0)).save(tmp_path / name)
        if not name.startswith("uncaptioned"):
            (tmp_path / name).with_suffix(".txt").write_text(f" caption {i}\n")
    return tmp_path


def test_pairs_images_with_captions(folder):
    with pytest.warns(UserWarning, match="1 of 6 images"):
        examples = find_examples(folder)
    assert [image.name for image, _ in examples] == ["a.png", "b.png", "c.jpg", "d.png", "e.png"]
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match="no image"):
        find_examples(folder / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        find_examples(folder / "missing")


def test_resize_center_crop_keeps_the_middle():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 150, 100))  # a white central square of the landscape image
    out = resize_center_crop(image, 32)
    assert out.size == (32, 32)
    assert np.asarray(out).min() > 200


def test_batches_are_seeded_disjoint_across_ranks_and_cover_each_pass(folder):
    with pytest.warns(UserWarning):
        stream = ImageCaptionFolder(folder, size_px=16, seed=1)
    batch = stream.batch(0, 2)
    assert batch.image.shape == (2, 3, 16, 16) and batch.image.dtype == torch.float32
    assert -1 <= batch.image.min() and batch.image.max() <= 1
    assert all(c.startswith("caption") and c == c.strip() for c in batch.captions)
    torch.testing.assert_close(stream.batch(0, 2).image, batch.image)  # a pure function of its arguments
    # one pass of 5 examples read by 1 example x 5 ranks at step 0: every example exactly once
    first_pass = [stream.batch(0, 1, rank, 5).captions[0] for rank in range(5)]
    assert sorted(first_pass) == sorted(f"caption {i}" for i in range(5))
    second_pass = [stream.batch(1, 1, rank, 5).captions[0] for rank in range(5)]
    assert sorted(second_pass) == sorted(first_pass) and second_pass != first_pass  # reshuffled


def captioned(path, image: Image.Image | bytes, caption: bytes = b"a caption"):
    """One example: the image (or raw bytes in its place) and its .txt caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path)
    path.with_suffix(".txt").write_bytes(caption)


def test_undecodable_images_are_replaced_by_the_next_example_of_the_pass(tmp_path):
    for i in range(4):
        captioned(tmp_path / f"{i}.png", Image.new("RGB", (20, 20), (60 * i, 0, 0)), f"caption {i}".encode())
    good = (tmp_path / "0.png").read_bytes()
    captioned(tmp_path / "garbage.png", b"not an image", b"garbage")
    captioned(tmp_path / "truncated.png", good[: len(good) // 2], b"truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = ImageCaptionFolder(tmp_path, size_px=8, seed=0)
        assert len(stream) == 6  # the listing, and so the shuffle, keeps the bad files
        order = [stream.examples[i][0].stem for i in _pass_order(0, 0, 6)]
        captions = [stream.example(p)[1] for p in range(12)]  # two passes
    for bad in ("garbage", "truncated"):
        position = order.index(bad)
        stand_in = next(name for name in order[position:] + order if name not in ("garbage", "truncated"))
        assert captions[position] == f"caption {stand_in}"
    assert "garbage" not in captions and "truncated" not in captions
    messages = [str(w.message) for w in caught]
    assert sum("garbage.png" in m for m in messages) == 1 and sum("truncated.png" in m for m in messages) == 1
    again = ImageCaptionFolder(tmp_path, size_px=8, seed=0)  # a resumed run: the same batches
    torch.testing.assert_close(again.batch(1, 3).image, stream.batch(1, 3).image)
    assert again.batch(1, 3).captions == stream.batch(1, 3).captions


def test_a_folder_of_undecodable_images_is_one_error(tmp_path):
    captioned(tmp_path / "a.png", b"not an image")
    with pytest.warns(UserWarning, match="cannot decode training image"):
        with pytest.raises(ValueError, match="none of the 1 captioned images .* can be decoded"):
            ImageCaptionFolder(tmp_path, size_px=8, seed=0).example(0)


def test_non_utf8_captions_are_read_as_cp1252_with_a_warning(tmp_path):
    captioned(tmp_path / "a.png", Image.new("RGB", (8, 8)), b"caf\xe9 \x93au lait\x94\n")
    captioned(tmp_path / "b.png", Image.new("RGB", (8, 8)), b"\x81 odd byte")  # undefined in cp1252
    captioned(tmp_path / "c.png", Image.new("RGB", (8, 8)), "naïve".encode())
    assert read_caption(tmp_path / "c.txt") == "naïve"
    with pytest.warns(UserWarning, match=r"caption .*a\.txt is not UTF-8; read it as cp1252"):
        assert read_caption(tmp_path / "a.txt") == "café “au lait”"
    with pytest.warns(UserWarning, match="read it as latin-1"):
        assert read_caption(tmp_path / "b.txt") == "\x81 odd byte"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 16))  # red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": red on top, blue at the bottom
    image.save(tmp_path / "a.png", exif=exif)
    (tmp_path / "a.txt").write_text("a photo")
    pixels = ImageCaptionFolder(tmp_path, size_px=16, seed=0).example(0)[0]
    assert pixels[0, 0, 8] > 0.9 and pixels[2, 0, 8] < -0.9  # top row red
    assert pixels[2, -1, 8] > 0.9 and pixels[0, -1, 8] < -0.9  # bottom row blue


def test_16_bit_images_keep_their_levels(tmp_path):
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "a.png")  # mid-grey in 16 bits
    (tmp_path / "a.txt").write_text("grey")
    pixels = ImageCaptionFolder(tmp_path, size_px=16, seed=0).example(0)[0]
    assert pixels.abs().max() < 0.01  # 128 of 255, not the near-white that convert("RGB") gives


def test_symlinked_subfolders_are_followed_once(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    captioned(root / "a.png", Image.new("RGB", (8, 8)))
    captioned(elsewhere / "b.png", Image.new("RGB", (8, 8)))
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "z_again").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice: listed once
    (elsewhere / "loop").symlink_to(root, target_is_directory=True)  # a cycle: must end
    examples = find_examples(root)
    assert [image.relative_to(root).as_posix() for image, _ in examples] == ["a.png", "linked/b.png"]
