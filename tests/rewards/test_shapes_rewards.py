"""The three shapes rewards: interface, determinism, ranges, the conflict, shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.stats import spearmanr

from capo.errors import CapoError
from capo.recipes.train_preference import PreferenceTrainConfig, make_variant, train
from capo.rewards import shapes as R
from capo.rewards.base import load_reward
from capo.shapes import checker as C
from capo.shapes import world as W

HELD = W.make_prompts("heldout")


def _pil(arrays) -> list[Image.Image]:
    return [Image.fromarray(a) for a in arrays]


@pytest.fixture(scope="module")
def library():
    """A mixed library of correct, wrong and degraded images of held-out prompts, with gold."""
    rng = np.random.default_rng(2024)
    specs = [HELD[int(i)] for i in rng.integers(len(HELD), size=400)]
    images = np.stack([make_variant(s, rng) for s in specs])
    return specs, images, C.check_all(images, specs)


@pytest.fixture(scope="module")
def rewards():
    return {name: load_reward(name) for name in
            ("shapes-alignment", "shapes-aesthetic", "shapes-preference")}


def test_interface(rewards):
    a, s, p = rewards["shapes-alignment"], rewards["shapes-aesthetic"], rewards["shapes-preference"]
    assert (a.name, a.needs_prompt, a.transform, a.bt_scale) == ("shapes-alignment", True, "logit", 1.0)
    assert (s.name, s.needs_prompt, s.transform, s.bt_scale) == ("shapes-aesthetic", False, "identity", 10.0)
    assert (p.name, p.needs_prompt, p.transform, p.bt_scale) == ("shapes-preference", True, "identity", 1.0)


def test_deterministic_and_in_range(rewards, library):
    specs, images, _ = library
    prompts, pil = [s.text for s in specs], _pil(images)
    for name, reward in rewards.items():
        first = reward.score(pil, prompts)
        assert first.dtype == np.float32 and first.shape == (len(pil),)
        assert np.array_equal(first, reward.score(pil, prompts)), name
        # batching does not change scores
        assert np.allclose(first[:7], reward.score(pil[:7], prompts[:7]), atol=1e-5), name
    align = rewards["shapes-alignment"].score(pil, prompts)
    aes = rewards["shapes-aesthetic"].score(pil, prompts)
    assert align.min() >= 0.02 - 1e-6 and align.max() <= 0.98 + 1e-6
    assert aes.min() >= 0 and aes.max() <= 1


def test_alignment_of_an_empty_image_is_the_floor():
    blank = np.full((1, 32, 32, 3), W.BACKGROUND, np.uint8)
    for text in ("a red circle", "two squares", "a red circle left of a blue square"):
        assert R.alignment_scores(blank, [W.parse_prompt(text)])[0] == pytest.approx(0.02, abs=1e-4)


def test_alignment_prefers_correct_over_wrong_and_is_smooth():
    rng = np.random.default_rng(3)
    specs = [HELD[int(i)] for i in rng.integers(len(HELD), size=150)]
    good = np.stack([W.render(W.sample_scene(s, rng)) for s in specs])
    bad = np.stack([W.render(W.sample_scene(W.corrupt_spec(s, rng), rng)) for s in specs])
    a_good, a_bad = R.alignment_scores(good, specs), R.alignment_scores(bad, specs)
    assert (a_good > a_bad).mean() >= 0.97
    noisy = np.clip(good + rng.normal(0, 2, good.shape), 0, 255).astype(np.uint8)
    assert np.abs(R.alignment_scores(noisy, specs) - a_good).max() < 0.05


def test_alignment_is_not_the_checker():
    """Imperfect like a VQA model: a wrong shape is only partly penalised."""
    rng = np.random.default_rng(0)
    square = W.render(W.sample_scene(W.parse_prompt("a square"), rng))[None]
    score = R.alignment_scores(square, [W.parse_prompt("a circle")])[0]
    assert not C.check(square[0], W.parse_prompt("a circle")) and 0.2 < score < 0.7


def test_aesthetic_hand_values_for_one_centred_square():
    obj = W.SceneObject("square", "red", 16.0, 16.0, 8.0, W.COLORS["red"])
    terms = {k: float(v[0]) for k, v in R.aesthetic_terms(W.render(W.Scene((obj,)))[None]).items()}
    assert terms == pytest.approx({
        "crisp": 1.0, "clean": 1.0, "pure": 1.0, "saturated": (235 - 40) / 255,
        "composition": (1 + 1 + 64 / 1024 / 0.12) / 3,
    })


def test_aesthetic_is_prompt_blind_and_dislikes_blur_noise_and_clutter(rewards):
    rng = np.random.default_rng(1)
    aes = rewards["shapes-aesthetic"]
    img = W.render(W.sample_scene(W.parse_prompt("a red circle"), rng))
    a = aes.score(_pil([img, img]), ["a red circle", "four blue squares"])
    assert a[0] == a[1]
    blurred = ndimage.gaussian_filter(img.astype(float), (1, 1, 0)).astype(np.uint8)
    noisy = np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)
    b = aes.score(_pil([blurred, noisy]), ["", ""])
    assert (b < a[0]).all()
    centred = W.render(W.Scene((W.SceneObject("circle", "red", 16, 16, 11, W.COLORS["red"]),)))
    four = W.render(W.sample_scene(W.parse_prompt("four red circles"), rng))
    c = aes.score(_pil([centred, four]), ["", ""])
    assert c[0] > c[1]  # composition pulls against counting prompts


def test_the_conflict_is_visible(rewards, library):
    specs, images, gold = library
    prompts, pil = [s.text for s in specs], _pil(images)
    align = rewards["shapes-alignment"].score(pil, prompts)
    aes = rewards["shapes-aesthetic"].score(pil, prompts)
    pref = rewards["shapes-preference"].score(pil, prompts)
    rho = lambda x, y: spearmanr(x, y)[0]  # noqa: E731
    assert 0.2 < gold.mean() < 0.8
    assert rho(align, gold) >= 0.7
    assert rho(aes, gold) <= rho(align, gold) - 0.4
    assert rho(aes, align) <= rho(align, gold) - 0.4
    assert rho(pref, gold) >= 0.4 and rho(pref, aes) >= 0.3  # it mixes both views


def test_bad_prompts_and_missing_weights_are_errors(rewards, tmp_path):
    img = _pil([np.full((32, 32, 3), W.BACKGROUND, np.uint8)])
    with pytest.raises(CapoError, match="not in the shapes grammar"):
        rewards["shapes-alignment"].score(img, ["a photo of a dog"])
    with pytest.raises(CapoError, match="config.json"):
        load_reward("shapes-preference", weights_path=str(tmp_path))


def test_shipped_preference_weights_load_and_rank(rewards):
    folder = R.WEIGHTS_DIR
    config = json.loads((folder / "config.json").read_text())
    assert "python -m capo.recipes.train_preference" in (folder / "README.txt").read_text()
    assert config["figures"]["heldout_pair_accuracy"] >= 0.75
    assert (folder / "model.safetensors").stat().st_size < 1_000_000
    rng = np.random.default_rng(5)
    specs = [HELD[int(i)] for i in rng.integers(len(HELD), size=100)]
    good = _pil([W.render(W.sample_scene(s, rng)) for s in specs])
    bad = _pil([W.render(W.sample_scene(W.corrupt_spec(s, rng), rng)) for s in specs])
    prompts = [s.text for s in specs]
    pref = rewards["shapes-preference"]
    assert (pref.score(good, prompts) > pref.score(bad, prompts)).mean() >= 0.8


def test_training_script_round_trip(tmp_path):
    cfg = PreferenceTrainConfig(out=str(tmp_path), train_groups=6, heldout_groups=3, steps=3,
                                batch_pairs=8)
    figures = train(cfg, command="python -m capo.recipes.train_preference --steps 3")
    assert figures["heldout_pairs"] == 3 * 15
    reward = load_reward("shapes-preference", weights_path=str(tmp_path))
    scores = reward.score(_pil(np.zeros((2, 32, 32, 3), np.uint8)), ["a circle", "a square"])
    assert np.isfinite(scores).all()
    assert "--steps 3" in (tmp_path / "README.txt").read_text()
