"""Stage score with in-process rewards: values, metadata, resume from parts, NaN and other errors."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capo.errors import CapoError
from capo.pipeline.prompts import Prompt, prompts_table
from capo.pipeline.rundir import RunDir, samples_table, shard_name, write_table_atomic
from capo.pipeline.score import ScoreConfig, read_reward_meta, score, score_shard
from capo.rewards.base import RewardModel, register_reward


class Red(RewardModel):
    """Mean red channel in [0, 1] (a prompt-blind test reward)."""

    name = "test-red"
    needs_prompt = False
    bt_scale = 10.0
    batch_size = 2

    def score_batch(self, images, prompts):
        return np.array([np.asarray(im)[..., 0].mean() / 255.0 for im in images], dtype=np.float32)


class NanOnBlue(Red):
    name = "test-nan"

    def score_batch(self, images, prompts):
        return np.array([np.nan if np.asarray(im)[0, 0, 2] > 0 else 1.0 for im in images], dtype=np.float32)


register_reward("test-red", Red)
register_reward("test-nan", NanOnBlue)
COLORS = {"p0": [(255, 0, 0), (128, 0, 0)], "p1": [(0, 0, 0), (51, 0, 0)], "p2": [(0, 0, 0), (0, 0, 255)]}


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), rgb).save(buf, format="PNG")
    return buf.getvalue()


def make_run(tmp_path) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    write_table_atomic(prompts_table([Prompt(pid, f"text {pid}") for pid in COLORS]), run.prompts_path)
    run.save_config("generate", {"chunk_size": 1})
    for c, (pid, colors) in enumerate(COLORS.items()):
        n = len(colors)
        pngs = [_png(x) for x in colors]
        t = samples_table([pid] * n, list(range(n)), [0] * n, pngs, torch.zeros(n, 1, 1, 1))
        write_table_atomic(t, run.samples_dir / shard_name(0, c))
    return run


def test_scores_and_metadata(tmp_path):
    run = make_run(tmp_path)
    assert score(run, ScoreConfig(reward=["test-red"])) == {"test-red": 6}
    t = run.read_reward("test-red").to_pydict()
    assert t["prompt_id"] == ["p0", "p0", "p1", "p1", "p2", "p2"] and t["sample_idx"] == [0, 1] * 3
    np.testing.assert_allclose(t["raw"], [1.0, 128 / 255, 0.0, 0.2, 0.0, 0.0], rtol=1e-6)
    meta = read_reward_meta(run.reward_path("test-red"))
    assert meta == {"reward": "test-red", "bt_scale": 10.0, "transform": "identity", "higher_is_better": True,
                    "hub_revisions": {}}  # nothing loaded from the hub
    assert not (run.rewards_dir / "test-red.parts").exists()
    assert run.load_config()["score"]["reward"] == ["test-red"]
    assert score(run, ScoreConfig(reward=["test-red"])) == {"test-red": 0}  # finished: skipped


def test_resume_skips_finished_parts(tmp_path):
    run = make_run(tmp_path)
    part = score_shard(Red(), run.sample_shards()[1], {p: p for p in COLORS})
    sentinel = part.set_column(2, "raw", pa.array([7.0, 7.0], pa.float32()))
    write_table_atomic(sentinel, run.rewards_dir / "test-red.parts" / shard_name(0, 1))
    assert score(run, ScoreConfig(reward=["test-red"])) == {"test-red": 4}
    raw = run.read_reward("test-red").column("raw").to_pylist()
    assert raw[2:4] == [7.0, 7.0]  # chunk 1 was not rescored


def test_nan_names_reward_and_sample_and_keeps_other_files(tmp_path):
    run = make_run(tmp_path)
    score(run, ScoreConfig(reward=["test-red"]))
    before = run.reward_path("test-red").read_bytes()
    with pytest.raises(CapoError, match=r"reward 'test-nan' returned nan for prompt p2 sample 1") as e:
        score(run, ScoreConfig(reward=["test-red", "test-nan"]))
    assert "part-00000-00002.parquet" in str(e.value) and "\n" not in str(e.value)
    assert run.reward_path("test-red").read_bytes() == before
    assert not run.reward_path("test-nan").exists()
    parts = sorted(p.name for p in (run.rewards_dir / "test-nan.parts").iterdir())
    assert parts == [shard_name(0, 0), shard_name(0, 1)]  # finished chunks are kept for the rerun


def test_errors(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(CapoError, match="unknown reward 'nope'"):
        score(run, ScoreConfig(reward=["nope"]))
    with pytest.raises(CapoError, match="lists a reward twice"):
        ScoreConfig(reward=["a", "a"]).validate()
    (run.samples_dir / shard_name(0, 1)).unlink()
    with pytest.raises(CapoError, match=r"generate is incomplete \(1 of 3 chunks missing, first 1\)"):
        score(run, ScoreConfig(reward=["test-red"]))
    with pytest.raises(CapoError, match="run `capo generate` first"):
        score(RunDir.at(tmp_path / "empty"), ScoreConfig(reward=["test-red"]))
    assert pq.read_table(run.sample_shards()[0]).num_rows == 2
