"""Loader options through the CLI: model options (recorded in base_model.json, reused by train and
evaluate) and per-reward options; devices for rewards that take none."""

from __future__ import annotations

import pytest
from diffusers import EulerDiscreteScheduler

from capo.cli import main
from capo.config import from_dict
from capo.errors import CapoError
from capo.pipeline.generate import GenerateConfig, load_base
from capo.pipeline.rundir import RunDir
from capo.pipeline.score import ScoreConfig, load_scorer
from capo.rewards.shapes import WEIGHTS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_options_are_recorded_and_reused(tmp_path, tiny_pipelines):
    run = tmp_path / "run"
    model = tiny_pipelines.build_sd(tmp_path)
    argv = ["generate", "--run", run, "--model", model, "--prompts", "shapes:train", "--num-prompts", 2,
            "--samples-per-prompt", 2, "--steps", 2, "--device", "cpu",
            "--model-options", "{scheduler: euler, resolution: 16}"]
    assert main([str(a) for a in argv]) == 0
    spec = RunDir.at(run).read_base_model()
    assert spec["options"] == {"scheduler": "euler", "resolution": 16}
    adapter = load_base(spec, "cpu", load_text_encoders=False, load_vae=False)  # as train / evaluate do
    assert isinstance(adapter.pipe.scheduler, EulerDiscreteScheduler)
    assert adapter.latent_shape()[1:] == (8, 8)  # 16 px / VAE factor 2
    samples = RunDir.at(run).read_samples()
    assert samples.column("latent_shape").to_pylist()[0] == [4, 8, 8]
    # a rerun with other options would mix samples of two models
    other = [*argv[:-1], "{scheduler: ddim, resolution: 16}"]
    assert main([str(a) for a in other]) != 0


def test_bad_model_options_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(CapoError, match="model_options.device"):
        from_dict(GenerateConfig, {"model_options": {"device": "cuda"}})
    with pytest.raises(CapoError, match="model_options"):
        from_dict(GenerateConfig, {"model_options": "[1, 2]"})
    argv = ["generate", "--run", tmp_path / "run", "--model", "shapes-vp", "--num-prompts", 2,
            "--samples-per-prompt", 2, "--device", "cpu", "--model-options", "{load_t5: false}"]
    assert main([str(a) for a in argv]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "load_t5" in err[0]


def test_reward_options_reach_the_loader():
    options = {"shapes-preference": {"weights_path": str(WEIGHTS_DIR)}}
    cfg = from_dict(ScoreConfig, {"reward": ["shapes-preference"], "device": "cpu",
                                  "reward_options": options})
    assert load_scorer("shapes-preference", cfg).score is not None
    bad = ScoreConfig(reward=["shapes-preference"], reward_options={"shapes-preference": {"checkpoint": "x"}})
    with pytest.raises(CapoError, match="reward 'shapes-preference': unknown option 'checkpoint'"):
        load_scorer("shapes-preference", bad)
    with pytest.raises(CapoError, match="reward_options.mps"):
        from_dict(ScoreConfig, {"reward_options": {"mps": "path"}})


def test_device_is_passed_only_to_rewards_that_take_one():
    """shapes-aesthetic and shapes-alignment are numpy-only: --device cpu must not break them."""
    for name in ("shapes-aesthetic", "shapes-alignment", "shapes-preference"):
        reward = load_scorer(name, ScoreConfig(reward=[name], device="cpu"))
        assert reward.name == name


def test_evaluate_uses_the_score_stage_reward_options(tmp_path):
    from capo.pipeline.evaluate import EvaluateConfig, with_score_options

    run = RunDir.at(tmp_path / "run")
    options = {"shapes-preference": {"weights_path": str(WEIGHTS_DIR)}}
    assert with_score_options(run, EvaluateConfig()).reward_options == {}
    run.save_config("score", {"reward": ["shapes-preference"], "reward_options": options})
    assert with_score_options(run, EvaluateConfig()).reward_options == options
    own = {"shapes-preference": {"device": "cpu"}}
    assert with_score_options(run, EvaluateConfig(reward_options=own)).reward_options == own
