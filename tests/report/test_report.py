"""``capo report``: the experiment page and a run page hold the tables, every figure they link exists
beside them (relative paths, nothing external), grids per category, scatter plots, curves, config;
Pareto fronts of the scatter by hand; fallbacks and errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from capo.cli import main
from capo.errors import CapoError
from capo.report import plots
from capo.report.html import build_report, cell_html

SRC = re.compile(r'(?:src|href)="([^"]*)"')


def linked(page: Path) -> list[str]:
    return SRC.findall(page.read_text())


def assert_self_contained(page: Path) -> list[str]:
    files = linked(page)
    for name in files:
        assert "/" not in name and ":" not in name, name  # a file beside the page, never a URL
        assert (page.parent / name).is_file(), name
    assert "http" not in page.read_text().replace("http-equiv", "")
    return files


def test_experiment_page(small_experiment, tmp_path):
    page = build_report(small_experiment.root, tmp_path / "out")
    assert page == tmp_path / "out" / "index.html"
    files = assert_self_contained(page)
    text = page.read_text()
    for title in ("Table 2: multi-reward", "Reward over-optimisation", "Resolved config", "Timings"):
        assert title in text
    assert text.count("<table>") >= 3 and '<span class="ci">[' in text
    assert "overopt.png" in files and "vp-training.png" in files
    categories = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert {f"vp-grid-{c}.png" for c in categories} <= set(files)  # 6 held-out prompts, one per category
    assert 1 <= sum(f.startswith("vp-scatter-") for f in files) <= 6


def test_run_page_of_a_cell(small_experiment):
    cell = small_experiment.cell("vp/capo-frs-sig1.5-s0")
    page = build_report(cell)
    assert page == cell / "report" / "index.html"
    files = assert_self_contained(page)
    text = page.read_text()
    assert "Results on held-out prompts" in text and "Gold accuracy" in text and "Win (%)" in text
    assert "training.png" in files and any(f.startswith("scatter-") for f in files)
    assert sum(f.startswith("grid-") for f in files) == 6
    assert "Resolved config" in text and "objective: capo" in text


def test_plain_run_falls_back_to_grid_png(small_experiment, tmp_path, capsys):
    src = small_experiment.cell("vp/capo-sum-sig1.5-s0")
    run = tmp_path / "run"
    shutil.copytree(src / "eval", run / "eval")
    shutil.copy(src / "config.yaml", run / "config.yaml")
    (run / "eval" / "images.parquet").unlink()  # what `capo evaluate` writes
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert "report:" in capsys.readouterr().out
    assert assert_self_contained(tmp_path / "r" / "index.html") == ["grid.png"]


def test_not_a_run_is_an_error(tmp_path):
    with pytest.raises(CapoError, match="not a run or experiment directory"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2


def test_fronts_by_hand():
    # a = (1, 0), b = (0, 1), c = (0, 0), d = (0.5, 0.5): a, b and d dominate c and nothing else
    R = np.array([[1, 0], [0, 1], [0, 0], [0.5, 0.5]])
    upper, lower = plots.fronts(R)
    assert upper.tolist() == [True, True, False, True] and lower.tolist() == [False, False, True, False]
    # e = (1, 1) dominates all: the only point of U; D = the points dominating nobody
    upper, lower = plots.fronts(np.vstack([R, [1, 1]]))
    assert upper.tolist() == [False, False, False, False, True]
    assert lower.tolist() == [False, False, True, False, False]


def test_scatter_and_curves_draw(tmp_path):
    R = np.random.default_rng(0).random((8, 3))
    pos, neg = np.zeros(8, bool), np.zeros(8, bool)
    pos[0], neg[1] = True, True
    assert plots.calibrated_scatter(R, ["a", "b", "c"], pos, neg, "p", tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert plots.calibrated_scatter(R[:, :1], ["a"], pos, neg, "p", tmp_path / "one.png")  # one reward
    assert not plots.training_curves({"none": tmp_path / "no-logs"}, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_round_curves_draw(tmp_path):
    stat = {"win_rate": 55.0, "ci_low": 50.0, "ci_high": 60.0}
    curve = [{"round": r, "rewards": {"a": stat, "b": stat}, "gold": {"base": 0.4, "tuned": 0.5}}
             for r in range(3)]
    assert plots.round_curves(curve, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert plots.round_curves([{k: v for k, v in row.items() if k != "gold"} for row in curve],
                              tmp_path / "no-gold.png")
    assert not plots.round_curves([], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_cells():
    stat = {"kind": "win", "value": 58.14, "low": 54.2, "high": 61.94, "seeds": 2, "planned": 3}
    assert cell_html(stat) == '<td>58.1 <span class="ci">[54.2, 61.9] (2/3 seeds)</span></td>'
    assert cell_html({**stat, "seeds": 3, "highlight": True}).startswith('<td class="hl">58.1 ')
    assert cell_html(None) == '<td class="label">n/a</td>'
    assert cell_html("a<b") == '<td class="label">a&lt;b</td>'
