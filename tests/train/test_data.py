"""The procedural shapes stream: determinism, caption forms, ground truth that matches the pixels and the caption."""

import numpy as np
import pytest
import torch

from sdturbo.train.data import (
    COLORS,
    HELDOUT_PROMPTS,
    RELATIONS,
    SHAPES,
    SIZES,
    VARIED,
    PromptSpec,
    Scene,
    ShapeObject,
    ShapesStream,
    caption_scene,
    parse_caption,
    render_scene,
    scene_satisfies,
)

STREAM = ShapesStream(seed=7, size_px=64)
EXAMPLES = [STREAM.example(i) for i in range(400)]


def test_examples_are_a_function_of_seed_and_index():
    again = STREAM.example(3)
    assert again.caption == EXAMPLES[3].caption and again.scene == EXAMPLES[3].scene
    assert torch.equal(again.image, EXAMPLES[3].image)
    other_seed = ShapesStream(seed=8).example(3)
    assert not torch.equal(other_seed.image, EXAMPLES[3].image)


def test_image_format():
    image = EXAMPLES[0].image
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert ShapesStream(seed=0, size_px=96).example(0).image.shape == (3, 96, 96)


def test_vocabulary_is_covered():
    objects = [o for e in EXAMPLES for o in e.scene.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.size for o in objects} == set(SIZES)
    assert {e.scene.relation for e in EXAMPLES} == set(RELATIONS) | {None}
    assert {len(e.scene.objects) for e in EXAMPLES} == {1, 2, 3}
    backgrounds = {e.scene.background for e in EXAMPLES}
    assert VARIED in backgrounds and len(backgrounds) > 5


def test_every_caption_is_true_of_its_scene():
    for e in EXAMPLES:
        assert scene_satisfies(e.scene, parse_caption(e.caption)), e.caption


def test_layout_ground_truth():
    for e in EXAMPLES:
        boxes = [o.box for o in e.scene.objects]
        for left, top, right, bottom in boxes:
            assert 0 <= left and 0 <= top and right <= 1 and bottom <= 1
        for i, a in enumerate(boxes):  # objects never overlap
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert all(o.color != e.scene.background for o in e.scene.objects)
        if e.scene.relation is not None:
            a, b = e.scene.objects
            holds = {
                "left of": a.box[2] <= b.box[0],
                "right of": a.box[0] >= b.box[2],
                "above": a.box[3] <= b.box[1],
                "below": a.box[1] >= b.box[3],
            }
            assert holds[e.scene.relation], e.caption


@pytest.mark.parametrize("shape", SHAPES)
def test_pixels_show_the_object_colour(shape):
    obj = ShapeObject(shape, "purple", "large", (0.5, 0.55))
    pixels = render_scene(Scene((obj,), "white", None), 64, np.random.default_rng(0))
    centre = pixels[36, 32].astype(int)
    assert np.abs(centre - np.array(COLORS["purple"])).max() <= 12
    assert (pixels[2, 2] == (245, 245, 245)).all()  # plain background in the corner


def _captions(scene: Scene, tries: int = 300) -> set[str]:
    return {caption_scene(scene, np.random.default_rng(i)) for i in range(tries)}


@pytest.mark.parametrize(
    "caption, scene",
    [
        ("a red circle", Scene((ShapeObject("circle", "red", "small", (0.5, 0.5)),), VARIED, None)),
        ("a large blue square", Scene((ShapeObject("square", "blue", "large", (0.5, 0.5)),), VARIED, None)),
        (
            "a green triangle on a black background",
            Scene((ShapeObject("triangle", "green", "small", (0.5, 0.5)),), "black", None),
        ),
    ]
    + [
        (
            f"a red circle {relation} a blue square",
            Scene(
                (ShapeObject("circle", "red", "small", (0.3, 0.5)), ShapeObject("square", "blue", "small", (0.7, 0.5))),
                VARIED,
                relation,
            ),
        )
        for relation in RELATIONS
    ],
)
def test_required_caption_forms_are_produced(caption, scene):
    assert caption in _captions(scene)
    assert scene_satisfies(scene, parse_caption(caption))


def test_relation_can_be_stated_from_either_object():
    scene = Scene(
        (ShapeObject("circle", "red", "small", (0.3, 0.5)), ShapeObject("square", "blue", "small", (0.7, 0.5))),
        VARIED,
        "left of",
    )
    assert "a blue square right of a red circle" in _captions(scene)
    assert not scene_satisfies(scene, parse_caption("a blue square left of a red circle"))


def test_canonical_caption_states_everything():
    scene = EXAMPLES[0].scene
    spec = parse_caption(caption_scene(scene))
    assert all(size is not None for _, _, size in spec.objects)
    assert spec.background == (None if scene.background == VARIED else scene.background)


def test_parse_caption():
    assert parse_caption("an image of a small orange circle above a large white square on a gray background") == (
        PromptSpec((("circle", "orange", "small"), ("square", "white", "large")), "above", "gray")
    )
    with pytest.raises(ValueError):
        parse_caption("a red hexagon")


def test_heldout_prompts():
    assert len(set(HELDOUT_PROMPTS)) == len(HELDOUT_PROMPTS) >= 16
    specs = [parse_caption(p) for p in HELDOUT_PROMPTS]
    assert {len(s.objects) for s in specs} == {1, 2, 3}
    assert {s.relation for s in specs} == set(RELATIONS) | {None}
    assert any(s.background for s in specs) and any(size for s in specs for _, _, size in s.objects)
    training_captions = {e.caption for e in EXAMPLES}
    assert not training_captions & set(HELDOUT_PROMPTS)


def test_ranks_read_disjoint_examples():
    batches = [STREAM.batch(step=2, batch_size=3, rank=r, world_size=2) for r in range(2)]
    assert batches[0].image.shape == (3, 3, 64, 64) and len(batches[0].captions) == 3
    # step 2 of rank 1 in a 2-rank run is examples (2 * 2 + 1) * 3 + 0..2 of the stream
    assert batches[1].captions == [STREAM.example(i).caption for i in (15, 16, 17)]
    assert batches[0].captions == [STREAM.example(i).caption for i in (12, 13, 14)]
    stream = STREAM.batches(batch_size=3, start_step=2, rank=1, world_size=2)
    assert next(stream).captions == batches[1].captions
