"""The shapes world: grammar, splits, scenes and renderer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo.errors import CapoError
from capo.shapes import world as W

ALL = W.make_prompts("all")


def test_vocabulary_sizes():
    assert len(W.SHAPES) >= 3 and len(W.COLORS) >= 5
    assert W.IMAGE_SIZE == 32
    assert W.CATEGORIES == (
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    )


def test_splits_are_large_disjoint_and_cover_every_category():
    train, held = W.make_prompts("train"), W.make_prompts("heldout")
    assert len(train) >= 2000 and len(held) >= 200
    assert not {s.text for s in train} & {s.text for s in held}
    assert {s.category for s in train} == {s.category for s in held} == set(W.CATEGORIES)
    assert len({s.prompt_id for s in ALL}) == len({s.text for s in ALL}) == len(ALL)


def test_splits_are_deterministic():
    W._all_prompts.cache_clear()
    assert W.make_prompts("heldout") == W.make_prompts("heldout") == W.make_prompts("test")
    assert [s.prompt_id for s in W.make_prompts("trainval")][:3] == [
        s.prompt_id for s in ALL[:3]
    ]


def test_train_val_test_are_disjoint_and_partition_the_world():
    train, val, test = (W.make_prompts(s) for s in ("train", "val", "test"))
    texts = [{s.text for s in x} for x in (train, val, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(map(len, texts)) == len(ALL) == len({s.text for s in ALL})
    assert {s.text for s in W.make_prompts("trainval")} == texts[0] | texts[1]
    for split in (train, val, test):
        assert {s.category for s in split} == set(W.CATEGORIES)
    # hand count: 4 single_object prompts -> k = max(1, round(0.4)) = 1 each for test and val
    assert [s.category for s in val].count("single_object") == 1
    assert (len(train), len(val), len(test)) == (2272, 284, 284)


def test_unknown_split_is_an_error():
    with pytest.raises(CapoError, match="unknown shapes split 'bogus'"):
        W.make_prompts("bogus")


def test_examples_of_each_category():
    assert W.parse_prompt("a circle").category == "single_object"
    assert W.parse_prompt("a circle and a square").category == "two_object"
    spec = W.parse_prompt("three red circles")
    assert spec.category == "counting" and spec.objects == (W.ObjectSpec("circle", "red", 3),)
    assert W.parse_prompt("one square").objects == (W.ObjectSpec("square", None, 1),)
    assert W.parse_prompt("a blue diamond").category == "colors"
    spec = W.parse_prompt("a red circle left of a blue square")
    assert spec.category == "position" and spec.relation == "left of"
    assert spec.objects == (W.ObjectSpec("circle", "red"), W.ObjectSpec("square", "blue"))
    assert W.parse_prompt("a red circle and a blue circle").category == "color_attr"
    assert spec.prompt_id.startswith("position-") and len(spec.prompt_id) == len("position-") + 8


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ALL))
def test_parse_prompt_inverts_text(spec):
    assert W.parse_prompt(spec.text) == spec
    assert set(spec.text.split()) <= set(W.VOCAB)


@pytest.mark.parametrize(
    "text",
    [
        "", "a", "a purple circle", "two circle", "one circles", "a red circle left of a red circle",
        "a red circle and a red square", "a red circle and a square", "a circle and a circle",
        "a circle left of a square", "a red circle above", "three red circles and a square",
        "a red circle  and a blue square", "five circles",
    ],
)
def test_parse_prompt_rejects_text_outside_the_grammar(text):
    with pytest.raises(CapoError, match="not in the shapes grammar"):
        W.parse_prompt(text)


def test_relation_strength_hand_values():
    # offset (-12, 0), |offset| 12, shrink 0.1 * (8 + 8) = 1.6: (12 - 1.6) / 12 = 0.8667
    a, b = (10, 16, 8, 8), (22, 16, 8, 8)
    assert W.relation_strength(a, b, "left of") == pytest.approx(10.4 / 12)
    assert W.relation_strength(a, b, "right of") == pytest.approx(-10.4 / 12)
    assert W.relation_strength(a, b, "above") == 0.0
    # offset (3, -4), norm 5, shrink 1.6: revised (1.4, -2.4) / 5 -> above 0.48 (fails 0.5)
    c, d = (13, 12, 8, 8), (10, 16, 8, 8)
    assert W.relation_strength(c, d, "above") == pytest.approx(0.48)
    assert not W.relation_holds(c, d, "above") and W.relation_holds(a, b, "left of")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ALL), st.integers(0, 2**32 - 1))
def test_sample_scene_is_a_correct_layout(spec, seed):
    scene = W.sample_scene(spec, np.random.default_rng(seed))
    want = [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]
    assert len(scene.objects) == len(want)
    for (shape, color), obj in zip(want, scene.objects, strict=True):
        assert obj.shape == shape and obj.color == (color or obj.color)
    for i, a in enumerate(scene.objects):
        assert a.size / 2 + 1 <= a.cx <= W.IMAGE_SIZE - a.size / 2 - 1
        for b in scene.objects[i + 1 :]:
            gap = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.size + b.size) / 2
            assert gap >= W.GAP - 1e-9
    if spec.relation:
        a, b = scene.objects[:2]
        box = lambda o: (o.cx, o.cy, o.size, o.size)  # noqa: E731
        assert W.relation_strength(box(a), box(b), spec.relation) >= W.SAMPLE_MARGIN


def test_render_draws_shapes_on_a_plain_background():
    obj = W.SceneObject("square", "red", 16.0, 16.0, 8.0, W.COLORS["red"])
    img = W.render(W.Scene((obj,)))
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert (img[12:20, 12:20] == W.COLORS["red"]).all()  # the box [12, 20)^2 fully covered
    img[12:20, 12:20] = W.BACKGROUND
    assert (img == W.BACKGROUND).all()
    # a circle of diameter 8 covers pi * 16 px of area (anti-aliased coverage sums to it)
    circle = W.coverage(W.SceneObject("circle", "red", 16.0, 16.0, 8.0, (0, 0, 0)))
    assert circle.sum() == pytest.approx(np.pi * 16, rel=0.02)
    tri = W.coverage(W.SceneObject("triangle", "red", 16.0, 16.0, 8.0, (0, 0, 0)))
    assert tri.sum() == pytest.approx(32, rel=0.02) and tri[:16].sum() < tri[16:].sum()


def test_pretraining_batch_is_deterministic_and_parses():
    texts, images = W.pretraining_batch(np.random.default_rng(7), 24)
    texts2, images2 = W.pretraining_batch(np.random.default_rng(7), 24)
    assert texts == texts2 and np.array_equal(images, images2)
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    assert {W.parse_prompt(t).category for t in texts} >= {"position", "counting"}


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(ALL), st.integers(0, 2**32 - 1))
def test_corrupt_spec_changes_the_prompt_within_its_category(spec, seed):
    bad = W.corrupt_spec(spec, np.random.default_rng(seed))
    assert bad.category == spec.category and bad.text != spec.text
    assert W.parse_prompt(bad.text) == bad
