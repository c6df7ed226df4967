"""Training diagnostics: per-step values, the train_summary.json block, the 'β too large' warning."""

from __future__ import annotations

import json
import math

import pytest
from test_train import config, make_run

from capo.pipeline.diagnostics import KEYS, Diagnostics, step_values
from capo.pipeline.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def metrics(loss: float, start: float) -> dict[str, float]:
    return {"loss": loss, "loss_at_start": start, "delta_rca": 0.5, "beta_delta_theta": 0.25,
            "beta_delta_theta_std": 0.1, "near_target": 0.5, "clipped": 1.0}


def test_step_values_hand_check():
    # E[βΔ] = 0.3, E[(βΔ)²] = 0.25: std = sqrt(0.25 − 0.09) = 0.4; grad norm 2 > 1: clipped.
    out = step_values({"beta_delta_theta": 0.3, "beta_delta_theta_sq": 0.25, "loss": 1.0}, 2.0, 1.0)
    assert out["beta_delta_theta_std"] == pytest.approx(0.4) and out["clipped"] == 1.0
    assert "beta_delta_theta_sq" not in out and out["loss"] == 1.0
    assert step_values({"beta_delta_theta": 0.3, "beta_delta_theta_sq": 0.25}, 0.5, 1.0)["clipped"] == 0.0
    assert step_values({"beta_delta_theta": 0.3, "beta_delta_theta_sq": 0.25}, 9.0, 0.0)["clipped"] == 0.0
    # rounding can make E[x²] − E[x]² slightly negative: std 0, not nan
    assert step_values({"beta_delta_theta": 0.1, "beta_delta_theta_sq": 0.00999999}, 0, 0)[
        "beta_delta_theta_std"] == 0.0


def test_warns_once_after_warm_up_when_the_loss_stays_above_its_start():
    d = Diagnostics("capo", 1000.0, max_steps=50, warmup_steps=0)  # warm-up 5 steps, window 5
    assert (d.warmup, d.window) == (5, 5)
    for _ in range(9):
        d.record(metrics(2.0, 1.0))
        assert d.check() is None  # still in warm-up + the first window
    d.record(metrics(2.0, 1.0))
    warning = d.check()
    assert warning and "capo loss has stayed above its starting value" in warning and "beta = 1000" in warning
    d.record(metrics(2.0, 1.0))
    assert d.check() is None  # once
    s = d.summary()
    assert s["beta_too_large"] is True and s["warning"] == warning and s["steps"] == 11
    assert set(s["mean"]) == set(s["last"]) == set(KEYS) and s["mean"]["loss"] == 2.0


@pytest.mark.parametrize(("objective", "loss"), [("capo", 1.1), ("capo", 0.5), ("dpo", 5.0)])
def test_no_warning_below_the_rise_or_for_dpo(objective, loss):
    d = Diagnostics(objective, 1000.0, max_steps=50, warmup_steps=20)
    assert d.warmup == 20
    for _ in range(40):
        d.record(metrics(loss, 1.0))
        assert d.check() is None
    assert d.summary()["beta_too_large"] is False


def test_summary_of_no_steps():
    assert Diagnostics("capo", 1.0, 10, 0).summary() == {"steps": 0}


@pytest.mark.parametrize(("beta", "warns"), [(1e5, True), (10.0, False)])
def test_tiny_run_with_a_huge_beta_warns_and_a_sane_one_does_not(tmp_path, base_model, capsys,
                                                                   beta, warns):
    run = make_run(tmp_path / "run", base_model)
    summary = train(config(run, beta=beta, max_steps=20, batch_size=4))
    err = capsys.readouterr().err
    assert ("loss has stayed above its starting value" in err) is warns
    assert err.count("beta = ") == int(warns)
    saved = json.loads((run.model_dir / "train_summary.json").read_text())["diagnostics"]
    assert saved == summary["diagnostics"] and saved["beta_too_large"] is warns and saved["steps"] == 20
    for part in ("mean", "last"):
        assert set(saved[part]) == set(KEYS) and all(math.isfinite(v) for v in saved[part].values())
        assert 0 <= saved[part]["near_target"] <= 1 and 0 <= saved[part]["clipped"] <= 1
    assert 0.5 <= saved["mean"]["delta_rca"] <= 0.7  # each made-up pair has ΔR_ca 0.7 or 0.5
    if warns:  # βΔ_θ far from its target, every step clipped
        assert saved["last"]["beta_delta_theta_std"] > 1 and saved["mean"]["clipped"] == 1.0
