"""The image-caption folder stream: pairing, resizing, and a seeded order that ranks split without overlap."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdturbo.train.folder_data import ImageCaptionFolder, find_examples, resize_center_crop


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
