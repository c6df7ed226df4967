"""capo.report.plots.frontier: sweep rows (labelled by beta) and labelled points without lines."""

from __future__ import annotations

from capo.report.plots import frontier


def row(objective: str, beta: float, div: float, win: float, **extra) -> dict:
    stat = {"value": win, "low": win - 2, "high": win + 2}
    return {"objective": objective, "beta": beta, "divergence": div, "criterion": win,
            "wins": {"r": stat}, "gold": {"value": 0.4, "low": 0.3, "high": 0.5},
            "gold_base": {"value": 0.35}, **extra}


def test_frontier_of_a_sweep_and_of_labelled_points(tmp_path):
    sweep = [row("capo", 100, 1e-3, 60, chosen=True), row("capo", 1000, 1e-4, 55)]
    assert frontier(sweep, tmp_path / "sweep.png", "sweep")
    arms = [row("CaPO", 0, 1e-3, 60, label="offline"), row("CaPO", 0, 2e-3, 58, label="online-base")]
    assert frontier(arms, tmp_path / "arms.png", "arms", lines=False)
    assert min((tmp_path / n).stat().st_size for n in ("sweep.png", "arms.png")) > 1000
    assert not frontier([{**sweep[0], "divergence": None}], tmp_path / "none.png", "none")  # nothing to draw
