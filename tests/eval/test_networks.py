"""The evaluation network: decoding its heads into scenes, and the shipped weights reading real held-out images."""

import pytest
import torch
from safetensors.torch import save_file

from sdturbo.eval.metrics import alignment, alignment_breakdown
from sdturbo.eval.networks import (
    BACKGROUNDS,
    EMPTY,
    GRID,
    PAIRS,
    WEIGHTS_PATH,
    EvalNet,
    SceneLogits,
    decode_scenes,
    load_eval_net,
)
from sdturbo.eval.run import eval_prompts, measure, real_images
from sdturbo.eval.train_eval_net import scene_targets
from sdturbo.train.data import Scene, ShapeObject, parse_caption


def test_features_and_heads_have_the_documented_shapes():
    features, logits = EvalNet().eval()(torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, 256)
    assert logits.cells.shape == (2, 25, 16, 16) and logits.size.shape == (2, 24, 16, 16)
    assert logits.background.shape == (2, 10)


def test_decode_reads_pairs_sizes_centres_and_the_relation_from_cells():
    cells = torch.zeros(1, EMPTY + 1, GRID, GRID)
    cells[0, EMPTY] = 5.0
    size = torch.full((1, EMPTY, GRID, GRID), -5.0)
    red_square, blue_circle = PAIRS.index(("square", "red")), PAIRS.index(("circle", "blue"))
    cells[0, red_square, 12:14, 7:9] = 10.0  # 2 x 2 cells centred at (0.5, 0.8125)
    cells[0, blue_circle, 1:5, 8:12] = 10.0  # 4 x 4 cells centred at (0.625, 0.1875)
    size[0, blue_circle, 1:5, 8:12] = 5.0
    cells[0, PAIRS.index(("triangle", "green")), 0, 0] = 10.0  # one cell: a speck, not an object
    background = torch.zeros(1, len(BACKGROUNDS))
    background[0, BACKGROUNDS.index("varied")] = 1.0
    (scene,) = decode_scenes(SceneLogits(cells, size, background))
    assert [(o.shape, o.color, o.size) for o in scene.objects] == [("circle", "blue", "large"), ("square", "red", "small")]
    assert scene.objects[0].center == pytest.approx((0.625, 0.1875)) and scene.objects[1].center == pytest.approx((0.5, 0.8125))
    assert scene.relation == "above" and scene.background == "varied"


def test_targets_label_the_middle_of_each_object():
    scene = Scene((ShapeObject("circle", "red", "small", (0.5, 0.5)),), "gray", None)
    target = scene_targets([scene])
    labelled = (target.cells[0] == PAIRS.index(("circle", "red"))).nonzero()
    assert len(labelled) == 4 and set(labelled.flatten().tolist()) == {7, 8}
    assert target.large[0].sum() == 0 and BACKGROUNDS[int(target.background[0])] == "gray"


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match="64"):
        EvalNet().features(torch.zeros(1, 3, 32, 32))


@pytest.mark.slow
def test_shipped_classifier_reads_real_heldout_images():
    """Real renderings of the held-out prompts must pass alignment almost always: the metric's ceiling."""
    assert WEIGHTS_PATH.exists(), "train and ship the weights: python -m sdturbo.eval.train_eval_net"
    prompts = eval_prompts(200)
    _, scenes = measure(load_eval_net(), real_images(prompts, seed=123))
    specs = [parse_caption(p) for p in prompts]
    assert alignment(scenes, specs) >= 0.9, alignment_breakdown(scenes, specs)


def test_other_weights_are_refused_in_one_line(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "text.safetensors").write_text("not safetensors")
    for name in ("other.safetensors", "text.safetensors"):
        with pytest.raises(ValueError, match="does not hold evaluation network weights"):
            load_eval_net(tmp_path / name)
