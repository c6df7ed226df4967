"""Stages calibrate and select on a hand-built run directory (no models): Eq. 7 by hand, rules."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from capo.config import from_dict
from capo.errors import CapoError
from capo.pipeline.calibrate import CalibrateConfig, calibrate_run, calibrated_arrays
from capo.pipeline.prompts import Prompt, prompts_table
from capo.pipeline.rundir import RunDir, samples_table, shard_name, write_table_atomic
from capo.pipeline.score import META_KEY
from capo.pipeline.select import SelectConfig, select_pairs

LOG3 = math.log(3.0)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    return buf.getvalue()


def make_run(tmp_path, counts: dict[str, int]) -> RunDir:
    """A run with prompts ``counts`` (id -> number of samples), one shard per prompt."""
    run = RunDir.at(tmp_path / "run")
    write_table_atomic(prompts_table([Prompt(pid, f"prompt {pid}") for pid in counts]), run.prompts_path)
    for c, (pid, n) in enumerate(counts.items()):
        t = samples_table([pid] * n, list(range(n)), list(range(n)), [_png()] * n, torch.zeros(n, 1, 1, 1))
        write_table_atomic(t, run.samples_dir / shard_name(0, c))
    return run


def write_reward(run: RunDir, name: str, raw: dict[str, list[float]], bt_scale: float = 1.0,
                 transform: str = "identity", higher_is_better: bool = True) -> None:
    rows = [(pid, i, v) for pid, vals in raw.items() for i, v in enumerate(vals)]
    meta = {META_KEY: json.dumps({"reward": name, "bt_scale": bt_scale, "transform": transform,
                                  "higher_is_better": higher_is_better}).encode()}
    table = pa.table({"prompt_id": [r[0] for r in rows],
                      "sample_idx": pa.array([r[1] for r in rows], pa.int32()),
                      "raw": pa.array([r[2] for r in rows], pa.float32())}).replace_schema_metadata(meta)
    write_table_atomic(table, run.reward_path(name))


def test_calibrated_rewards_match_eq7_by_hand(tmp_path):
    run = make_run(tmp_path, {"a": 3, "b": 2})
    # R = 0, 0, log 3: R_ca = ((1/2 + 1/4) / 2, same, (3/4 + 3/4) / 2) = (0.375, 0.375, 0.75)
    write_reward(run, "A", {"a": [0.0, 0.0, LOG3], "b": [1.0, 1.0]})
    # logit transform of probabilities 1/2, 1/2, 3/4 gives the same logits; lower-is-better flips
    write_reward(run, "B", {"a": [0.5, 0.5, 0.75], "b": [0.2, 0.9]}, transform="logit")
    write_reward(run, "C", {"a": [0.0, 0.0, LOG3 / 2], "b": [0.0, 0.0]}, bt_scale=2.0, higher_is_better=False)
    calibrate_run(run, CalibrateConfig())
    ids, names, R_ca, mask = calibrated_arrays(run)
    assert ids == ["a", "b"] and names == ["A", "B", "C"]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    np.testing.assert_allclose(R_ca[0, :, 0], [0.375, 0.375, 0.75])
    np.testing.assert_allclose(R_ca[0, :, 1], [0.375, 0.375, 0.75], rtol=1e-6)
    np.testing.assert_allclose(R_ca[0, :, 2], [0.625, 0.625, 0.25], rtol=1e-6)
    np.testing.assert_allclose(R_ca[1, :2, 0], [0.5, 0.5])
    assert R_ca[1, :2, 1][1] > 0.5 > R_ca[1, :2, 1][0]
    cal = run.read_calibrated().to_pydict()
    np.testing.assert_allclose(cal["ensemble"][:3], [(0.375 * 2 + 0.625) / 3] * 2 + [(0.75 * 2 + 0.25) / 3])
    assert cal["prompt_id"] == ["a", "a", "a", "b", "b"] and cal["sample_idx"] == [0, 1, 2, 0, 1]


def test_calibrate_subset_of_rewards_and_errors(tmp_path):
    run = make_run(tmp_path, {"a": 3, "b": 1})
    write_reward(run, "A", {"a": [0.0, 1.0, 2.0], "b": [0.0]})
    with pytest.raises(CapoError, match="prompt b has 1 sample"):
        calibrate_run(run, CalibrateConfig())
    assert not run.calibrated_path.exists()
    run2 = make_run(tmp_path / "x", {"a": 3})
    write_reward(run2, "A", {"a": [0.0, 1.0]})
    with pytest.raises(CapoError, match="no score for prompt a sample 2"):
        calibrate_run(run2, CalibrateConfig())
    with pytest.raises(CapoError, match="run `capo score` first"):
        calibrate_run(run2, CalibrateConfig(reward=["Z"]))
    with pytest.raises(CapoError, match="reserved"):
        CalibrateConfig(reward=["ensemble"]).validate()


@pytest.fixture
def calibrated(tmp_path) -> RunDir:
    run = make_run(tmp_path, {"a": 3, "b": 3, "t": 2})
    # prompt a: sample 2 dominates 1 dominates 0 on both rewards; b: 0 best on A, 1 best on B
    write_reward(run, "A", {"a": [0.0, 1.0, 2.0], "b": [3.0, 0.0, 1.0], "t": [1.0, 1.0]})
    write_reward(run, "B", {"a": [0.0, 1.0, 2.0], "b": [0.0, 3.0, 1.0], "t": [1.0, 1.0]})
    calibrate_run(run, CalibrateConfig())
    return run


def _pairs(run: RunDir) -> dict[str, tuple]:
    t = run.read_pairs().to_pydict()
    return {pid: (pos, neg, pr, nr, rule) for pid, pos, neg, pr, nr, rule in zip(*t.values(), strict=True)}


def test_select_frs(calibrated):
    counts = select_pairs(calibrated, SelectConfig(rule="frs"))
    pairs = _pairs(calibrated)
    assert set(pairs) == {"a", "b"}  # t: all samples tie -> no pair
    assert pairs["a"][:2] == ([2], [0])
    # b: R_ca on (A, B) is s0 high/low, s1 low/high, s2 mid/mid: no sample dominates another, so
    # every sample is on both fronts, X+ = X- = {} and FRS falls back to best/worst of the ensemble
    pos, neg = pairs["b"][:2]
    assert len(pos) == 1 and len(neg) == 1 and pos != neg
    ens = calibrated.read_calibrated().column("ensemble").to_pylist()
    np.testing.assert_allclose(pairs["a"][2], [ens[2]], rtol=1e-6)
    np.testing.assert_allclose(pairs["a"][3], [ens[0]], rtol=1e-6)
    assert pairs["a"][4] == "frs"
    assert counts == {"prompts": 3, "kept": 2, "mean_pos": 1.0, "mean_neg": 1.0}


def test_select_best_worst_and_sum(calibrated):
    select_pairs(calibrated, SelectConfig(rule="best_worst", reward="B"))
    pairs = _pairs(calibrated)
    assert pairs["b"][:2] == ([1], [0])
    _, names, R_ca, _ = calibrated_arrays(calibrated)
    np.testing.assert_allclose(pairs["b"][2], [R_ca[1, 1, 1]], rtol=1e-6)  # the chosen reward's R_ca
    select_pairs(calibrated, SelectConfig(rule="sum", weights=[1.0, 0.0]))
    assert _pairs(calibrated)["b"][:2] == ([0], [1])
    # the target is the weighted ensemble: weights (1, 0) train on reward A's R_ca alone
    np.testing.assert_allclose(_pairs(calibrated)["b"][2:4], [[R_ca[1, 0, 0]], [R_ca[1, 1, 0]]], rtol=1e-6)
    assert _pairs(calibrated)["b"][4] == "sum"


def test_select_errors(calibrated):
    with pytest.raises(CapoError, match="'reward': 'Z' is not calibrated"):
        select_pairs(calibrated, SelectConfig(rule="best_worst", reward="Z"))
    with pytest.raises(CapoError, match="'weights' has 1 values for 2 rewards"):
        select_pairs(calibrated, SelectConfig(rule="sum", weights=[1.0]))
    with pytest.raises(CapoError, match="config key 'rule'"):
        from_dict(SelectConfig, {"rule": "best"})  # the declared choices (doc) are checked on load
    assert not calibrated.pairs_path.exists()
