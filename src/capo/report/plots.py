"""The report's figures (matplotlib, Agg, PNG): training curves, calibrated rewards per prompt with
the Pareto fronts and X+ / X- marked, over-optimisation curves, base-vs-tuned grids per category.

Every function writes one PNG (temporary name, then renamed) and returns whether it drew anything.
"""

from __future__ import annotations

import io
import itertools
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from capo.pairs import dominance

#: TensorBoard scalars of ``capo train`` shown as training curves, in this order
TRAIN_TAGS = ("loss", "implicit_acc", "delta_theta", "err_policy")
MAX_CURVES = 10


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, title: str | None = None, wrap: int = 80) -> None:
    """Lay ``fig`` out (under ``title`` wrapped at ``wrap`` characters, if given), write it to
    ``path`` as PNG atomically and close it."""
    if title is not None:
        fig.suptitle("\n".join(textwrap.wrap(title, wrap)), fontsize=8)
    fig.tight_layout()
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def read_scalars(logdir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps [T], values [T]) from every TensorBoard event file under ``logdir`` (a resumed
    training writes several; a step logged twice keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, dict[int, float]] = {}
    for directory in sorted({p.parent for p in logdir.rglob("events.out.tfevents*")}):
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for tag, v in points.items()}


def training_curves(runs: dict[str, Path], path: Path, tags: Sequence[str] = TRAIN_TAGS) -> bool:
    """One panel per tag, one line per run (label -> logs dir), against the training step."""
    data = {label: read_scalars(d) for label, d in list(runs.items())[:MAX_CURVES] if d.is_dir()}
    present = [t for t in tags if any(t in d for d in data.values())]
    if not present:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(3.3 * len(present), 3.0), squeeze=False)
    for ax, tag in zip(axes[0], present, strict=True):
        for label, d in data.items():
            if tag in d:
                ax.plot(*d[tag], label=label, lw=1.0)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    _save(fig, path)
    return True


def fronts(R_ca: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(upper [N], lower [N]) of one prompt's samples, R_ca [N, L] (Sec. 4.3): upper = dominated by
    none (the Pareto front U), lower = dominating none (D); dominance as ``capo.pairs.dominance``."""
    dom = dominance(R_ca[None], np.ones((1, len(R_ca)), dtype=bool))[0]  # [i, k]: x_i dominates x_k
    return ~dom.any(axis=0), ~dom.any(axis=1)


def calibrated_scatter(R_ca: np.ndarray, names: Sequence[str], positive: np.ndarray, negative: np.ndarray,
                       title: str, path: Path) -> bool:
    """Calibrated rewards of one prompt's N samples (R_ca [N, L]), one panel per pair of rewards
    (sample index on x for one reward): all samples, the upper (U) and lower (D) Pareto fronts of
    all L rewards, and the selected X+ (positive [N]) and X- (negative [N])."""
    upper, lower = fronts(R_ca)
    axes_pairs = list(itertools.combinations(range(R_ca.shape[1]), 2)) or [(None, 0)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(axes_pairs), figsize=(3.2 * len(axes_pairs), 3.3), squeeze=False)
    for ax, (j, k) in zip(axes[0], axes_pairs, strict=True):
        x = np.arange(len(R_ca)) if j is None else R_ca[:, j]
        y = R_ca[:, k]
        ax.scatter(x, y, s=14, c="#bbbbbb", label="samples")
        for sel, colour, label in ((upper, "#1f77b4", "upper front U"), (lower, "#ff7f0e", "lower front D")):
            order = np.argsort(x[sel])
            ax.plot(x[sel][order], y[sel][order], ls="--", lw=0.8, c=colour)
            ax.scatter(x[sel], y[sel], s=40, facecolors="none", edgecolors=colour, label=label)
        ax.scatter(x[positive], y[positive], s=60, marker="+", c="#2ca02c", label="X+")
        ax.scatter(x[negative], y[negative], s=40, marker="x", c="#d62728", label="X-")
        ax.set_xlabel("sample" if j is None else names[j], fontsize=8)
        ax.set_ylabel(names[k], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    _save(fig, path, title)
    return True


def _stat_series(table: dict[str, Any], column: int) -> tuple[list[float], ...]:
    """(steps, values, lows, highs) of one column of the over-optimisation table (missing cells skipped)."""
    out: tuple[list[float], ...] = ([], [], [], [])
    for row in table["rows"]:
        stat = row[column]
        if isinstance(stat, dict):
            step = 0.0 if str(row[0]).startswith("0") else float(row[0])
            for seq, value in zip(out, (step, stat["value"], stat["low"], stat["high"]), strict=True):
                seq.append(value)
    return out


def round_curves(curve: list[dict[str, Any]], path: Path) -> bool:
    """Online rounds (RUN/rounds/curve.json): the validation win-rate over the base of each reward
    with its 95% band, and the balanced gold accuracy of the round's model and of the base, against
    the round."""
    if not curve:
        return False
    plt = _pyplot()
    rounds = [row["round"] for row in curve]
    gold = all("gold" in row for row in curve)
    fig, axes = plt.subplots(1, 2 if gold else 1, figsize=(8.0 if gold else 4.5, 3.0), squeeze=False)
    ax = axes[0][0]
    for name in curve[0]["rewards"]:
        stats = [row["rewards"][name] for row in curve]
        ax.plot(rounds, [s["win_rate"] for s in stats], marker="o", ms=3, label=name)
        ax.fill_between(rounds, [s["ci_low"] for s in stats], [s["ci_high"] for s in stats], alpha=0.2)
    ax.axhline(50.0, color="#999", lw=0.8, ls="--")
    ax.set_title("validation win-rate over the base (%)", fontsize=9)
    if gold:
        g = axes[0][1]
        g.plot(rounds, [row["gold"]["tuned"] for row in curve], marker="o", ms=3, label="round's model")
        g.plot(rounds, [row["gold"]["base"] for row in curve], color="#999", ls="--", label="base")
        g.set_title("balanced gold accuracy (validation)", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("round", fontsize=8)
        ax.set_xticks(rounds)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def overopt_curves(models: dict[str, dict[str, Any]], path: Path) -> bool:
    """Per base model: gold accuracy and trained-reward win-rate against the training step, one line
    per objective with its 95% band (from the over-optimisation table of tables.json)."""
    if not models:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(models), 2, figsize=(8.0, 3.0 * len(models)), squeeze=False)
    for row_axes, (model, table) in zip(axes, models.items(), strict=True):
        for panel, ax in enumerate(row_axes):  # columns: Step, then (gold, win) per objective
            for c in range(1 + panel, len(table["columns"]), 2):
                steps, values, lows, highs = _stat_series(table, c)
                label = table["columns"][c].split(" ")[0]
                ax.plot(steps, values, marker="o", ms=3, label=label)
                ax.fill_between(steps, lows, highs, alpha=0.2)
            what = "gold accuracy" if panel == 0 else table["columns"][2].split(" ", 1)[1]
            ax.set_title(f"{model}: {what}", fontsize=9)
            ax.set_xlabel("training step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
    _save(fig, path)
    return True


def category_grids(images_parquet: Path, out_dir: Path, prefix: str, per_category: int = 6
                   ) -> list[tuple[str, str]]:
    """One grid per prompt category (row 1 base, row 2 tuned, the same initial noise per column,
    first seed) from an evaluation's images.parquet; returns [(category, file name)]."""
    from capo.pipeline.evaluation import image_grid

    t = pq.read_table(images_parquet).to_pydict()
    by_cat: dict[str, list[int]] = {}
    for i, (cat, seed) in enumerate(zip(t["category"], t["seed_idx"], strict=True)):
        if seed == 0 and len(by_cat.setdefault(cat, [])) < per_category:
            by_cat[cat].append(i)
    decode = lambda b: Image.open(io.BytesIO(b)).convert("RGB")  # noqa: E731
    out = []
    for cat, rows in by_cat.items():
        name = f"{prefix}grid-{cat}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        image_grid([t["prompt"][i] for i in rows], [decode(t["base"][i]) for i in rows],
                   [decode(t["tuned"][i]) for i in rows], out_dir / name)
        out.append((cat, name))
    return out


def frontier(rows: list[dict[str, Any]], path: Path, title: str, lines: bool = True) -> bool:
    """Reward-divergence frontier of a sweep (``capo.experiments.sweep``): one panel per reward (and
    gold, for reading only), win-rate (%) with its 95% interval against the divergence from the
    base, one line per objective through its grid points (labelled β, or a row's ``label``), the
    chosen point starred; ``lines=False``: markers only (points that are not a grid)."""
    rows = [r for r in rows if r["divergence"] is not None and r["criterion"] is not None]
    if not rows:
        return False
    rewards = list(rows[0]["wins"])
    panels = [*rewards, *(["gold"] if rows[0]["gold"] else [])]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for objective in dict.fromkeys(r["objective"] for r in rows):
            pts = sorted((r for r in rows if r["objective"] == objective), key=lambda r: r["divergence"])
            stats_ = [r["gold"] if panel == "gold" else r["wins"][panel] for r in pts]
            x = [r["divergence"] for r in pts]
            y = np.array([s["value"] for s in stats_])
            err = np.array([[v - s["low"], s["high"] - v] for v, s in zip(y, stats_, strict=True)]).T
            line = ax.errorbar(x, y, yerr=err, marker="o", ms=3, lw=1.0, ls="-" if lines else "none",
                               capsize=2, label=objective)
            for r, xi, yi in zip(pts, x, y, strict=True):
                ax.annotate(r.get("label", f"{r['beta']:g}"), (xi, yi), fontsize=5, xytext=(2, 2),
                            textcoords="offset points")
                if r.get("chosen"):
                    ax.scatter([xi], [yi], marker="*", s=90, color=line[0].get_color(), zorder=5)
        if panel == "gold":
            ax.axhline(rows[0]["gold_base"]["value"], ls=":", c="k", lw=0.8)
        else:
            ax.axhline(50.0, ls=":", c="k", lw=0.8)
        ax.set_title("gold accuracy (reading only)" if panel == "gold" else f"{panel} win (%)", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("divergence: image MSD vs base", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    _save(fig, path, title, wrap=110)
    return True
