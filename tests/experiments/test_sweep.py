"""``capo sweep`` on a tiny shapes model: the grid trained on train and evaluated on validation, the
choice by the criterion declared before the run (never gold, never test), the sweep table,
chosen.yaml and the reward-divergence frontier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from capo.cli import main
from capo.errors import CapoError
from capo.experiments.runner import config_path
from capo.experiments.sweep import CRITERIA, choose

SETS = ["rewards=[shapes-alignment, shapes-aesthetic]", "train.log_with=none", "evaluate.grid_prompts=2",
        "evaluate.prompts=shapes:val", "torch_threads=1", "sweep_betas={capo: [10, 1000], dpo: [100]}"]


def _win(value, low=None):
    return {"value": value, "low": value - 5 if low is None else low, "high": value + 5}


def _row(model, objective, beta, wins, divergence):
    return {"model": model, "objective": objective, "beta": beta, "lr": None,
            "wins": {f"r{i}": _win(w) for i, w in enumerate(wins)}, "gold": None, "gold_base": None,
            "divergence": divergence, "criterion": CRITERIA["mean_win"]([_win(w) for w in wins])}


def test_criteria_by_hand():
    wins = [_win(60, 52), _win(40, 30)]
    assert CRITERIA["mean_win"](wins) == 50.0
    assert CRITERIA["min_win"](wins) == 40.0
    assert CRITERIA["mean_low"](wins) == 41.0


def test_choice_is_the_best_criterion_then_the_smaller_divergence():
    rows = [_row("vp", "capo", 10, [60, 50], 0.01),      # 55
            _row("vp", "capo", 100, [70, 50], 0.02),     # 60: chosen
            _row("vp", "dpo", 10, [55, 55], 0.05),       # 55, tie with the next: larger divergence
            _row("vp", "dpo", 100, [60, 50], 0.01),      # 55: chosen (smaller divergence)
            _row("flow", "capo", 10, [50, 50], 0.01)]
    rows.append({**_row("flow", "capo", 100, [99, 99], None), "criterion": None})  # not evaluated yet
    chosen = choose(rows)
    assert {k: v["beta"] for k, v in chosen.items()} == {("vp", "capo"): 100, ("vp", "dpo"): 100,
                                                         ("flow", "capo"): 10}


def _args(tiny, out, *extra):
    args = ["sweep", config_path("smoke"), "--out", str(out), "--set", f"models={{vp: {tiny}}}"]
    for s in [*SETS, *extra]:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    assert main(_args(tiny, out)) == 0
    return out


def test_sweep_writes_table_choice_and_frontier(swept):
    data = json.loads((swept / "sweep" / "sweep.json").read_text())
    assert data["declared"]["criterion"] == "mean_win" and data["declared"]["prompts"] == "shapes:val"
    rows = data["rows"]
    assert [(r["objective"], r["beta"]) for r in rows] == [("capo", 10), ("capo", 1000), ("dpo", 100)]
    for r in rows:
        wins = [w["value"] for w in r["wins"].values()]
        assert r["criterion"] == pytest.approx(np.mean(wins)) and r["divergence"] >= 0
        assert r["gold"] is not None  # reported, for reading only
    capo = [r for r in rows if r["objective"] == "capo"]
    best = max(capo, key=lambda r: (r["criterion"], -r["divergence"]))
    assert [r["chosen"] for r in capo] == [r is best for r in capo]
    hyper = yaml.safe_load((swept / "sweep" / "chosen.yaml").read_text())["hyper"]
    assert hyper["vp"]["capo"]["beta"] == best["beta"] and hyper["vp"]["dpo"]["beta"] == 100
    assert (swept / "sweep" / "frontier-vp.png").stat().st_size > 1000
    assert "| vp | capo | 10 |" in (swept / "sweep" / "sweep.md").read_text()
    # every cell was evaluated on the validation prompts
    import pyarrow.csv as pacsv

    from capo.pipeline.prompts import load_prompts

    scores = pacsv.read_csv(swept / "cells" / "vp" / "capo-frs-sig1.5-b10-s0" / "eval" / "scores.csv")
    val = set(scores.column("prompt_id").to_pylist())

    assert val <= {p.prompt_id for p in load_prompts("shapes:val")}


def test_divergence_is_zero_for_the_base_and_grows_with_the_change(swept, tmp_path):
    from capo.experiments.sweep import image_msd

    assert min(r["divergence"] for r in json.loads((swept / "sweep" / "sweep.json").read_text())["rows"]) >= 0
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from capo.pipeline.generate import png_bytes

    black, grey = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (51, 51, 51))
    (tmp_path / "e").mkdir()
    pq.write_table(pa.table({"base": [png_bytes(black)] * 2, "tuned": [png_bytes(black), png_bytes(grey)]}),
                   tmp_path / "e" / "images.parquet")
    assert image_msd(tmp_path / "e") == pytest.approx(0.5 * 0.2**2)  # (51/255)^2 on one of two images
    (tmp_path / "e" / "results.json").write_text(json.dumps({"divergence": 0.25}))  # recorded: read
    assert image_msd(tmp_path / "e") == 0.25


def test_the_criterion_cannot_change_and_test_is_refused(swept, tiny, capsys):
    with pytest.raises(CapoError, match="criterion cannot change"):
        from capo.experiments.sweep import sweep_command  # noqa: F401

        raise_from_main(_args(tiny, swept, "criterion=min_win"))
    assert main(_args(tiny, swept, "evaluate.prompts=shapes:test")) == 2
    assert "a sweep chooses on validation" in capsys.readouterr().err
    assert main([*_args(tiny, swept), "--tables-only"]) == 0  # same declaration: fine


def raise_from_main(argv):
    import argparse

    from capo.experiments.sweep import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    args.func(args)
