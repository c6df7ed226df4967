"""The tables of bench/online_compare.sh, pooled over training seeds, as the experiment's tables.

    python bench/online_table.py OUT [--split eval|eval-test] [--plot FILE]

OUT holds runs named ARM-OBJECTIVE-sSEED (ARM: offline, online-base, online-previous). Per arm
and objective, over its seeds: the win-rate over the base of each reward (samples of a prompt
pooled over seeds; percentile-bootstrap 95% interval over prompts, which does not include the
spread over seeds: the per-seed values follow), the category-balanced gold accuracy, and the
divergence from the base (mean image_msd, results.json). Then the differences, paired by prompt
(every run of a base model shares the evaluation's base images and noise): each online arm minus
offline for the same objective, and CaPO minus DPO in the same arm. Then each online arm's
per-round validation curve, averaged over seeds (rounds/curve.json). ``--plot``: the
reward-divergence frontier of the arms (``capo.report.plots.frontier``, one point per arm).
The shapes rewards are all higher-is-better, so a win is a higher score.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from capo.experiments.matrix import CellRef, Layout, Plan
from capo.experiments.tables import Context, fmt, read_scores
from capo.pipeline.evaluation import GOLD

NAME = re.compile(r"^(offline|online-base|online-previous)-([a-z]+)-s(\d+)$")
ARMS = ("offline", "online-base", "online-previous")
LABELS = {"capo": "CaPO", "dpo": "DPO", "ipo": "IPO"}
Group = tuple[str, str]  # (arm, objective)


def groups(out: Path, split: str) -> tuple[dict[Group, tuple[CellRef, ...]], Context]:
    """(arm, objective) -> the refs of its evaluated seeds, and a tables Context holding their scores."""
    cache, found = {}, {}
    for run in sorted(p for p in out.iterdir() if p.is_dir() and NAME.match(p.name)):
        scores = read_scores(run / split, done="scores.csv")
        if scores is not None:
            arm, objective, _ = NAME.match(run.name).groups()
            ref = CellRef(run.name, 0)
            cache[ref] = scores
            found.setdefault((arm, objective), []).append(ref)
    rewards = [n for n in next(iter(cache.values())).tuned if n != GOLD] if cache else []
    ctx = Context(Layout(out), Plan(), rewards, {}, 1000, 1000, {}, cache)
    order = sorted(found, key=lambda g: (list(LABELS).index(g[1]) if g[1] in LABELS else 9, ARMS.index(g[0])))
    return {g: tuple(found[g]) for g in order}, ctx


def divergence(out: Path, split: str, refs: tuple[CellRef, ...]) -> float | None:
    values = [json.loads((out / r.cell / split / "results.json").read_text()).get("divergence") for r in refs]
    return None if None in values else float(np.mean(values))


def label(group: Group) -> str:
    return f"{LABELS.get(group[1], group[1])} {group[0]}"


def pooled(out: Path, split: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown lines of the pooled table and its rows (for the frontier)."""
    found, ctx = groups(out, split)
    head = ["Arm", "seeds", *[f"{r} win (%)" for r in ctx.rewards], "Gold acc.", "divergence (image MSD)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    rows = []
    for g, refs in found.items():
        wins = {r: ctx.win(refs, r) for r in ctx.rewards}
        div = divergence(out, split, refs)
        rows.append({"objective": LABELS.get(g[1], g[1]), "label": g[0], "beta": 0.0, "wins": wins,
                     "gold": ctx.gold(refs), "gold_base": ctx.gold(refs, "base"), "divergence": div,
                     "criterion": float(np.mean([w["value"] for w in wins.values()]))})
        lines.append(f"| {label(g)} | {len(refs)} | " + " | ".join(fmt(w) for w in wins.values())
                     + f" | {fmt(ctx.gold(refs))} | {'n/a' if div is None else f'{div:.3g}'} |")
    if found:
        base = ctx.gold(next(iter(found.values())), "base")
        lines.append(f"\nBase gold accuracy: {fmt(base)}.")
    lines += ["", *per_seed(found, ctx), "", *differences(found, ctx)]
    return lines, rows


def per_seed(found: dict[Group, tuple[CellRef, ...]], ctx: Context) -> list[str]:
    out = ["Per seed (win-rate %, one number per reward; gold):"]
    for g, refs in found.items():
        wins = [ctx.win(refs, r)["per_seed"] for r in ctx.rewards]
        gold = ctx.gold(refs)["per_seed"]
        seeds = [" / ".join(f"{w[i]:.1f}" for w in wins) + f" ({gold[i]:.3f})" for i in range(len(refs))]
        out.append(f"- {label(g)}: " + "; ".join(seeds))
    return out


def differences(found: dict[Group, tuple[CellRef, ...]], ctx: Context) -> list[str]:
    """A − B paired by prompt: online arms − offline (same objective), CaPO − DPO (same arm)."""
    pairs = [((arm, o), ("offline", o)) for (arm, o) in found if arm != "offline" and ("offline", o) in found]
    pairs += [((arm, "capo"), (arm, "dpo")) for arm in ARMS
              if (arm, "capo") in found and (arm, "dpo") in found]
    head = ["A − B", *[f"{r} win (points)" for r in ctx.rewards], "Gold acc."]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for a, b in pairs:
        cells = [ctx.diff(found[a], found[b], r) for r in [*ctx.rewards, GOLD]]
        lines.append(f"| {label(a)} − {label(b)} | " + " | ".join(fmt(c) for c in cells) + " |")
    return lines


def curves(out: Path) -> list[str]:
    """Each online arm's per-round validation curve, mean over its seeds."""
    by_group: dict[Group, list[list[dict]]] = {}
    for run in sorted(out.iterdir()):
        m = NAME.match(run.name)
        if m and m.group(1) != "offline" and (run / "rounds" / "curve.json").is_file():
            curve = json.loads((run / "rounds" / "curve.json").read_text())
            by_group.setdefault(m.groups()[:2], []).append(curve)
    lines = []
    for g, runs in by_group.items():
        lines.append(f"{label(g)} ({len(runs)} seeds): per round, mean over seeds (validation win % "
                     "per reward; gold base -> tuned)")
        for points in zip(*runs, strict=False):
            wins = [np.mean([p["rewards"][n]["win_rate"] for p in points]) for n in points[0]["rewards"]]
            gold = [np.mean([p.get("gold", {}).get(k, np.nan) for p in points]) for k in ("base", "tuned")]
            lines.append(f"  round {points[0]['round']}: " + ", ".join(f"{w:.1f}" for w in wins)
                         + f"; gold {gold[0]:.3f} -> {gold[1]:.3f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--split", default="eval", help="eval (validation, default) or eval-test")
    p.add_argument("--plot", type=Path, help="write the reward-divergence frontier of the arms here")
    args = p.parse_args()
    lines, rows = pooled(args.out, args.split)
    print("\n".join([*lines, "", *(curves(args.out) if args.split == "eval" else [])]))
    if args.plot:
        from capo.report.plots import frontier

        title = f"{args.out.name}, {args.split}: one point per arm (mean over seeds)"
        frontier(rows, args.plot, title, lines=False)


if __name__ == "__main__":
    main()
