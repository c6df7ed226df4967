"""Stage evaluate: a tuned model equal to the base ties everywhere (win-rate exactly 50 %); a
different one does not; results.json layout, results.md, grid.png, scores.csv."""

from __future__ import annotations

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
def models(tmp_path_factory):
    """(base model dir, tuned dir = same weights, tuned dir = other random weights)."""
    from capo.models.shapes import build_shapes_model

    root = tmp_path_factory.mktemp("models")
    base = build_shapes_model("vp", size="tiny", seed=0)
    base.save_pretrained(str(root / "base"))
    other_model = build_shapes_model("vp", size="tiny", seed=1)
    for name, model in (("same", base), ("other", other_model)):
        (root / name).mkdir()
        weights = {k: v.contiguous() for k, v in model.denoiser.state_dict().items()}
        save_file(weights, root / name / "denoiser.safetensors")
    return str(root / "base"), str(root / "same"), str(root / "other")


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
    results = evaluate(run, config(same))
    assert set(results) == {"rewards", "gold"}
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


def test_experiment_evaluates_like_capo_evaluate(tmp_path, models):
    """``capo experiment``'s cached-base evaluation writes the same files as ``capo evaluate``."""
    from capo.experiments.evaluation import load_eval_set

    base, _, other = models
    run = make_run(tmp_path, base)
    evaluate(run, config(other))
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
