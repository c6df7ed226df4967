"""Stage evaluate: a tuned model equal to the base ties everywhere (win-rate exactly 50 %); a
different one does not; results.json layout, results.md, grid.png, scores.csv."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

from capo.errors import CapoError
from capo.pipeline.evaluate import EvaluateConfig, evaluate, results_markdown
from capo.pipeline.generate import model_spec
from capo.pipeline.rundir import RunDir

REWARDS = ["shapes-alignment", "shapes-aesthetic"]
KEYS = {"win_rate", "ci_low", "ci_high", "mean_base", "mean_tuned"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

@pytest.fixture(scope="module")
def models(tmp_path_factory, base_model):
    """(base model dir, tuned dir = same weights, tuned dir = other random weights)."""
    from capo.models.shapes import build_shapes_model

    root = tmp_path_factory.mktemp("models")
    base = build_shapes_model("vp", size="tiny", seed=0)  # the weights of base_model (conftest.py)
    other_model = build_shapes_model("vp", size="tiny", seed=1)
    for name, model in (("same", base), ("other", other_model)):
        (root / name).mkdir()
        weights = {k: v.contiguous() for k, v in model.denoiser.state_dict().items()}
        save_file(weights, root / name / "denoiser.safetensors")
    return base_model, str(root / "same"), str(root / "other")


def make_run(tmp_path, base: str) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    run.write_base_model(model_spec(base, None))
    return run


def config(tuned: str, **kw) -> EvaluateConfig:
    return EvaluateConfig(**{"num_prompts": 6, "seeds": 2, "steps": 2, "reward": REWARDS, "n_boot": 200,
                             "tuned": tuned, "grid_prompts": 3, **kw})


def test_same_weights_tie_everywhere(tmp_path, models):
    base, same, _ = models
    run = make_run(tmp_path, base)
    results = evaluate(run, config(same, out=str(run.eval_dir)))  # --tuned: RUN/eval only if asked
    assert set(results) == {"rewards", "gold", "divergence"}
    assert results["divergence"] == 0.0  # same weights, same noise: the same images
    for name in REWARDS:
        r = results["rewards"][name]
        assert set(r) == KEYS
        assert (r["win_rate"], r["ci_low"], r["ci_high"]) == (50.0, 50.0, 50.0)  # every pair ties: 1/2
        assert r["mean_base"] == r["mean_tuned"]
    assert results["gold"]["base"] == results["gold"]["tuned"]
    assert "overall" in results["gold"]["base"]
    assert json.loads((run.eval_dir / "results.json").read_text()) == results
    assert (run.eval_dir / "results.md").read_text() == results_markdown(results)
    grid = Image.open(run.eval_dir / "grid.png")
    assert grid.size[0] > grid.size[1] > 100
    lines = (run.eval_dir / "scores.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 * 2 and "shapes-alignment/base" in lines[0]
    assert lines[0].startswith('"prompt_id","category","seed_idx"') and '"gold/base","gold/tuned"' in lines[0]
    assert lines[0].endswith('"image_msd"')


def test_experiment_evaluates_like_capo_evaluate(tmp_path, models):
    """``capo experiment``'s cached-base evaluation writes the same files as ``capo evaluate``."""
    from capo.experiments.evaluation import load_eval_set

    base, _, other = models
    run = make_run(tmp_path, base)
    evaluate(run, config(other, out=str(run.eval_dir)))
    es = load_eval_set(run, config(other), tmp_path / "cache")
    es.evaluate(tmp_path / "cell", Path(other), "evaluate cell")
    for name in ("results.json", "results.md", "scores.csv"):
        assert (tmp_path / "cell" / "eval" / name).read_bytes() == (run.eval_dir / name).read_bytes()


def test_other_weights_differ_and_interval_contains_rate(tmp_path, models):
    base, _, other = models
    results = evaluate(make_run(tmp_path, base), config(other))
    for name in REWARDS:
        r = results["rewards"][name]
        assert 0.0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 100.0
    # random tiny models draw no objects (alignment sits at its floor), but aesthetics differ
    aesthetic = results["rewards"]["shapes-aesthetic"]
    assert aesthetic["mean_base"] != aesthetic["mean_tuned"] and aesthetic["win_rate"] != 50.0
    assert 0.0 < results["divergence"] < 1.0


def test_image_msd_by_hand():
    """One pixel of a 2x2 image moved from 0 to 1 in one channel: 1 / (2 * 2 * 3); a 255 -> 0
    change everywhere: 1."""
    from capo.pipeline.evaluation import image_msd

    black = Image.new("RGB", (2, 2))
    one = black.copy()
    one.putpixel((1, 0), (255, 0, 0))
    white = Image.new("RGB", (2, 2), (255, 255, 255))
    assert image_msd([black, black, white], [one, black, black]) == pytest.approx([1 / 12, 0.0, 1.0])


def test_markdown_is_table2_layout():
    res = {"rewards": {"A": {"win_rate": 61.25, "ci_low": 55.0, "ci_high": 67.5, "mean_base": 0.5,
                             "mean_tuned": 0.625}},
           "gold": {"base": {"overall": 0.5, "counting": 0.25}, "tuned": {"overall": 0.75, "counting": 0.5}}}
    md = results_markdown(res).splitlines()
    assert "| Model | A Win (%) | A Score |" in md
    assert "| base | - | 0.5 |" in md
    assert "| tuned | 61.2 [55.0, 67.5] | 0.625 |" in md
    assert "| Model | counting | overall |" in md and "| tuned | 0.500 | 0.750 |" in md


def test_missing_tuned_model_is_an_error(tmp_path, models):
    run = make_run(tmp_path, models[0])
    with pytest.raises(CapoError, match="no tuned model; run `capo train` first"):
        evaluate(run, EvaluateConfig())
    with pytest.raises(CapoError, match="run `capo generate` first"):
        evaluate(RunDir.at(tmp_path / "empty"), EvaluateConfig())
    assert not run.eval_dir.exists()


def test_balanced_evaluation_gives_every_category_the_same_images(tmp_path, models):
    """images_per_category: every category n images (single_object: its one validation prompt
    with n seeds); win-rate = the mean over images; gold per category with n; the experiment's
    cached evaluation writes the same files; the tables read the ragged scores back."""
    import numpy as np
    import pyarrow.csv as pacsv

    from capo.experiments.evaluation import load_eval_set
    from capo.experiments.tables import read_scores, stratified_means
    from capo.stats import win_rate

    base, _, other = models
    run = make_run(tmp_path, base)
    cfg = config(other, prompts="shapes:val", num_prompts=None, images_per_category=3)
    results = evaluate(run, dataclasses.replace(cfg, out=str(run.eval_dir)))
    t = pacsv.read_csv(run.eval_dir / "scores.csv").to_pydict()
    assert len(t["prompt_id"]) == 6 * 3
    assert {c: t["category"].count(c) for c in set(t["category"])} == {c: 3 for c in set(t["category"])}
    single = [s for c, s in zip(t["category"], t["seed_idx"], strict=True) if c == "single_object"]
    assert single == [0, 1, 2]  # one prompt, three seeds
    a = np.array(t["shapes-aesthetic/tuned"]), np.array(t["shapes-aesthetic/base"])
    assert results["rewards"]["shapes-aesthetic"]["win_rate"] == pytest.approx(win_rate(*a))
    assert results["gold"]["n"] == {c: 3 for c in results["gold"]["n"]} and len(results["gold"]["n"]) == 6
    assert "| n (images) | 3 | 3 | 3 | 3 | 3 | 3 | 18 |" in (run.eval_dir / "results.md").read_text()
    es = load_eval_set(run, cfg, tmp_path / "cache")
    es.evaluate(tmp_path / "cell", Path(other), "evaluate cell")
    for name in ("results.json", "results.md", "scores.csv"):
        assert (tmp_path / "cell" / "eval" / name).read_bytes() == (run.eval_dir / name).read_bytes()
    scores = read_scores(tmp_path / "cell" / "eval")
    assert np.isnan(scores.tuned["gold"]).sum() == scores.tuned["gold"].size - 18
    gold, _ = stratified_means(scores.tuned["gold"], scores.categories, 10, 0)
    assert gold == pytest.approx(results["gold"]["tuned"]["overall"])
    from capo.config import from_dict

    with pytest.raises(CapoError, match="exclude each other"):
        from_dict(EvaluateConfig, {"num_prompts": 6, "images_per_category": 3})
