"""``capo report RUN_OR_EXPERIMENT [--out DIR]``: a static HTML page of a run or an experiment.

index.html and its PNG figures go to one directory (default: PATH/report/); every image is a
relative link to a file beside the page and nothing is fetched from elsewhere. A run's page: the
results (win-rate over the base model with its 95% interval, mean scores, gold accuracy), base vs
tuned image grids per prompt category (same initial noise), calibrated rewards per prompt with
the Pareto fronts and X+ / X- marked, training curves, the resolved config. An experiment's
page: every table, the over-optimisation curves, per base model the grids, scatter plots and
training curves of its key cells, the timings and the resolved config. A tiny inline script
records after loading how many images loaded and how many errors occurred
(``<body data-images="LOADED/TOTAL" data-errors="N">``), which the browser test reads.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from capo.errors import CapoError
from capo.experiments.matrix import METHODS, Cell, CellRef, Layout, Plan, parse_key_cell
from capo.experiments.tables import FORMATS
from capo.pipeline.rundir import RunDir, write_text_atomic
from capo.report import plots

CSS = """body{font-family:sans-serif;margin:2em;max-width:1500px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}
td.label{text-align:left}td.hl{font-weight:bold;background:#fff6d5}.ci{color:#666;font-size:11px}
img{max-width:100%;border:1px solid #eee}figure{margin:.5em 0 1.5em}figcaption{font-size:12px;color:#555}
pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:12px}
.figures{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}"""
SCRIPT = """var capoErrors = 0;
window.addEventListener('error', function () { capoErrors++; }, true);
window.addEventListener('load', function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.setAttribute('data-images', loaded + '/' + images.length);
  document.body.setAttribute('data-errors', String(capoErrors));
});"""
MAX_SCATTER = 6


def cell_html(value: Any) -> str:
    """One table cell: a label, n/a, or a statistic "value [low, high]" (highlighted if marked)."""
    if value is None:
        return '<td class="label">n/a</td>'
    if not isinstance(value, dict):
        return f'<td class="label">{html.escape(str(value))}</td>'
    f = FORMATS[value["kind"]]
    seeds = value.get("seeds", 1), value.get("planned", 1)
    note = f" ({seeds[0]}/{seeds[1]} seeds)" if seeds[0] < seeds[1] else ""
    interval = f"[{f.format(value['low'])}, {f.format(value['high'])}]{note}"
    cls = ' class="hl"' if value.get("highlight") else ""
    return f'<td{cls}>{f.format(value["value"])} <span class="ci">{html.escape(interval)}</span></td>'


def table_html(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell_html(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(name: str, caption: str) -> str:
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}"><figcaption>' \
           f"{html.escape(caption)}</figcaption></figure>"


def figures(parts: list[str]) -> str:
    """Figures side by side (wrapping)."""
    return f'<div class="figures">{"".join(parts)}</div>' if parts else ""


def section(title: str, *parts: str, level: int = 2) -> str:
    return f"<h{level}>{html.escape(title)}</h{level}>" + "".join(parts) if any(parts) else ""


def pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def results_html(results: dict[str, Any], rewards: bool = True) -> str:
    """eval/results.json: win-rate with its interval and mean scores per reward (if ``rewards``);
    gold accuracy per category."""
    rows = [[name, {"kind": "win", "value": r["win_rate"], "low": r["ci_low"], "high": r["ci_high"]},
             f"{r['mean_base']:.4g}", f"{r['mean_tuned']:.4g}"] for name, r in results["rewards"].items()]
    out = table_html(["Reward", "Win (%) [95% CI]", "Base score", "Tuned score"], rows) if rewards else ""
    if "gold" in results:
        cats = [c for c in results["gold"]["base"] if c != "overall"] + ["overall"]
        out += table_html(["Gold accuracy", *cats], [[m, *[f"{results['gold'][m][c]:.3f}" for c in cats]]
                                                       for m in ("base", "tuned")])
    return out


def scores_html(run: RunDir) -> str:
    """An experiment cell's evaluation (eval/scores.csv with gold verdicts): every number with its
    95% interval, as in the experiment's tables; "" for other evaluations."""
    from capo.experiments.tables import Context, read_scores

    scores = read_scores(run.eval_dir)
    if scores is None or "gold" not in scores.tuned:
        return ""
    ref = CellRef("run", 0)
    cell = run.root / "cell.json"
    evaluate = json.loads(cell.read_text())["evaluate"] if cell.is_file() else {"n_boot": 1000, "seed": 0}
    ctx = Context(Layout(run.root), Plan(), [], {}, evaluate["n_boot"], evaluate["seed"], {}, {ref: scores})
    rows = [[name, ctx.win((ref,), name), ctx.score((ref,), name, "base"), ctx.score((ref,), name)]
            for name in scores.tuned if name != "gold"]
    rows.append(["gold accuracy", None, ctx.gold((ref,), "base"), ctx.gold((ref,))])
    return table_html(["Reward", "Win (%)", "Base", "Tuned"], rows)


def grids_html(eval_dir: Path, out: Path, prefix: str) -> str:
    """Base vs tuned grids per category (eval/images.parquet), else the evaluation's grid.png."""
    if (eval_dir / "images.parquet").is_file():
        files = plots.category_grids(eval_dir / "images.parquet", out, prefix)
        return figures([figure(name, f"{cat}: base (top) vs tuned (bottom), same initial noise")
                        for cat, name in files])
    if (eval_dir / "grid.png").is_file():
        (out / f"{prefix}grid.png").write_bytes((eval_dir / "grid.png").read_bytes())
        return figure(f"{prefix}grid.png", "base (top) vs tuned (bottom), same initial noise")
    return ""


def scatter_html(run: RunDir, out: Path, prefix: str) -> str:
    """Calibrated rewards of a few prompts (one per category first) with fronts and X+ / X-."""
    if not (run.calibrated_path.is_file() and run.pairs_path.is_file()):
        return ""
    from capo.pipeline.calibrate import calibrated_arrays

    prompt_ids, names, R_ca, mask = calibrated_arrays(run)
    pairs = run.read_pairs().to_pydict()
    meta = run.read_prompts().to_pydict()
    info = {pid: (text, cat) for pid, text, cat in zip(meta["prompt_id"], meta["prompt"], meta["category"],
                                                        strict=True)}
    by_cat: dict[str, list[int]] = {}
    for r, pid in enumerate(pairs["prompt_id"]):
        by_cat.setdefault(info[pid][1], []).append(r)
    rows = [r for group in itertools.zip_longest(*by_cat.values()) for r in group if r is not None]
    parts = []
    for i, r in enumerate(rows[:MAX_SCATTER]):
        pid = pairs["prompt_id"][r]
        p = prompt_ids.index(pid)
        samples = np.flatnonzero(mask[p])
        pos, neg = np.isin(samples, pairs["positives"][r]), np.isin(samples, pairs["negatives"][r])
        text, cat = info[pid]
        name = f"{prefix}scatter-{i}.png"
        plots.calibrated_scatter(R_ca[p][samples], names, pos, neg, f"{cat}: {text} ({pairs['rule'][r]})",
                                 out / name)
        parts.append(figure(name, f"{cat}: {text}; rule {pairs['rule'][r]}"))
    return figures(parts)


def curves_html(runs: dict[str, Path], out: Path, name: str) -> str:
    if plots.training_curves(runs, out / name):
        return figure(name, "training curves (TensorBoard scalars of capo train)")
    return ""


def rounds_html(run: RunDir, out: Path) -> str:
    """The online rounds' validation curves (RUN/rounds/curve.json, ``capo run --rounds K``)."""
    path = run.root / "rounds" / "curve.json"
    if not path.is_file() or not plots.round_curves(json.loads(path.read_text()), out / "rounds.png"):
        return ""
    return figure("rounds.png", "online CaPO: validation win-rate over the base (95% interval) and "
                  "balanced gold accuracy after every round (round 0: the offline model)")


def run_body(src: Path, out: Path) -> str:
    run = RunDir.at(src)
    results = run.eval_dir / "results.json"
    parts = [f"<h1>capo report: run <code>{html.escape(str(src))}</code></h1>",
             section("Results on held-out prompts", with_ci := scores_html(run),
                     results_html(json.loads(results.read_text()), not with_ci) if results.is_file() else ""),
             section("Online rounds", rounds) if (rounds := rounds_html(run, out)) else "",
             section("Base vs tuned, per prompt category", grids_html(run.eval_dir, out, "")),
             section("Calibrated rewards per prompt: Pareto fronts, X+ and X-", scatter_html(run, out, "")),
             section("Training curves", curves_html({"train": run.root / "logs"}, out, "training.png"))]
    for name, title in (("cell.json", "Cell"), ("config.yaml", "Resolved config")):
        if (src / name).is_file():
            parts.append(section(title, pre((src / name).read_text())))
    return "".join(parts)


def showcase(plan: Plan, settings: dict[str, Any], model: str) -> tuple[Cell | None, list[Cell]]:
    """(the cell shown in grids and scatter plots: the first key cell, else the first evaluated
    entry; the trained cells whose training curves are drawn: Table 2 and over-optimisation cells)."""
    entries = plan.entries_of("table2", model)
    keys = [parse_key_cell(k) for k in settings.get("key_cells", [])]
    key = [e for k in keys for e in entries if (e.row, METHODS[e.column]) == k]
    first = (key or entries or [e for e in plan.entries if e.model == model] or [None])[0]
    main = plan.cells[first.refs[0].cell] if first else None
    curves = [plan.cells[e.refs[0].cell] for e in entries] + [
        plan.cells[r.cell] for e in plan.entries_of("overopt", model) for r in e.refs[:1]]
    trained = list({c.key: c for c in curves if c.trained}.values())
    return main, trained


def model_html(layout: Layout, plan: Plan, settings: dict[str, Any], model: str, out: Path) -> str:
    main, trained = showcase(plan, settings, model)
    if main is None:
        return ""
    where = layout.at(main, main.steps)
    scatter_cell = main if main.trained else next((c for c in trained if c.rule == "frs"), None)
    scatter = scatter_html(RunDir.at(layout.cell(scatter_cell.key)), out, f"{model}-") if scatter_cell else ""
    runs = {c.name: layout.cell(c.key) / "logs" for c in trained}
    return section(f"Base model {model}",
                   section(f"Base vs {main.name}, per prompt category", grids_html(where / "eval", out,
                                                                                   f"{model}-"), level=3),
                   section("Calibrated rewards per prompt: Pareto fronts, X+ and X-"
                           + (f" ({scatter_cell.name})" if scatter_cell else ""), scatter, level=3),
                   section("Training curves", curves_html(runs, out, f"{model}-training.png"), level=3))


def tables_html(layout: Layout, out: Path) -> str:
    path = layout.tables_dir / "tables.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    parts = [f"<p>{html.escape(data['note'])}</p>"]
    for name, t in data["tables"].items():
        body = "".join(section(f"base model {m}", table_html(x["columns"], x["rows"]), level=3)
                       for m, x in t["models"].items())
        if name == "overopt" and plots.overopt_curves(t["models"], out / "overopt.png"):
            body += figure("overopt.png", "gold accuracy and trained-reward win-rate by step (95% bands)")
        parts.append(section(t["title"], body))
    return "".join(parts)


def timings_html(layout: Layout) -> str:
    if not layout.timings_path.is_file():
        return ""
    data = json.loads(layout.timings_path.read_text())
    rows = [[r["started"], ", ".join(r["only"] or ["all cells"]), f"{r['seconds']:.0f}", str(r["finished"])]
            for r in data.get("invocations", [])]
    total = sum(data.get("phases", {}).values())
    return (table_html(["Started", "Cells", "Wall seconds", "Finished"], rows)
            + f"<p>Sum of the recorded phases (work done, over all invocations): {total:.0f} s.</p>")


def experiment_body(src: Path, out: Path) -> str:
    import yaml

    layout = Layout(src)
    plan = layout.load_plan()
    resolved = yaml.safe_load(layout.config_path.read_text())
    settings = resolved["experiment"]
    command = resolved.get("command")
    parts = [f"<h1>capo report: experiment <code>{html.escape(str(src))}</code></h1>",
             f"<p>Command: <code>{html.escape(command)}</code></p>" if command else "",
             tables_html(layout, out)]
    parts += [model_html(layout, plan, settings, m, out) for m in settings["models"]]
    parts += [section("Timings", timings_html(layout)),
              section("Resolved config", pre(layout.config_path.read_text()))]
    return "".join(parts)


#: marker file -> page builder (an experiment directory also holds config files, so it comes first)
KINDS: dict[str, Callable[[Path, Path], str]] = {"plan.json": experiment_body, "config.yaml": run_body}


def build_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write OUT/index.html (default OUT = PATH/report) and its figures; returns the page's path."""
    src = Path(path)
    builder = next((b for marker, b in KINDS.items() if (src / marker).is_file()), None)
    if builder is None:
        raise CapoError("not a run or experiment directory (no config.yaml or plan.json)", path=str(src))
    target = Path(out) if out is not None else src / "report"
    target.mkdir(parents=True, exist_ok=True)
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>capo report: '
            f"{html.escape(src.name)}</title><style>{CSS}</style><script>{SCRIPT}</script></head>"
            f"<body>{builder(src, target)}</body></html>\n")
    write_text_atomic(page, target / "index.html")
    return target / "index.html"


def register(sub: Any) -> None:
    """``capo report RUN_OR_EXPERIMENT [--out DIR]``."""
    p = sub.add_parser("report", help="a static HTML report of a run or an experiment",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("path", metavar="RUN_OR_EXPERIMENT", help="a run directory or an experiment directory")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: PATH/report)")

    def command(args: argparse.Namespace) -> None:
        print(f"report: {build_report(args.path, args.out)}")

    p.set_defaults(func=command)
