"""The tables of bench/online_compare.sh: per run, the win-rate over the base of each reward with its
bootstrap 95% interval over prompts and the category-balanced gold accuracy (base -> tuned), on the
validation prompts (eval/) and, where evaluated, the test prompts (eval-test/); then each online
run's per-round validation curve (rounds/curve.json).

    python bench/online_table.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(name: str, results: dict) -> str:
    wins = [f"{v['win_rate']:.1f} [{v['ci_low']:.1f}, {v['ci_high']:.1f}]"
            for v in results["rewards"].values()]
    gold = results.get("gold")
    gold_cell = f"{gold['base']['overall']:.3f} -> {gold['tuned']['overall']:.3f}" if gold else "-"
    return f"| {name} | " + " | ".join(wins) + f" | {gold_cell} |"


def table(runs: list[Path], sub: str, title: str) -> None:
    found = [(r.name, json.loads((r / sub / "results.json").read_text())) for r in runs
             if (r / sub / "results.json").is_file()]
    if not found:
        return
    names = list(found[0][1]["rewards"])
    header = "| run | " + " | ".join(f"{n} win % [95% CI]" for n in names) + " | balanced gold base->tuned |"
    print(f"\n{title}\n\n{header}\n" + "|---" * (len(names) + 2) + "|")
    for name, results in found:
        print(row(name, results))


def curves(runs: list[Path]) -> None:
    for run in runs:
        path = run / "rounds" / "curve.json"
        if path.is_file():
            points = json.loads(path.read_text())
            print(f"\n{run.name}: per round (samples, steps; validation win % per reward; gold)")
            for p in points:
                wins = ", ".join(f"{v['win_rate']:.1f}" for v in p["rewards"].values())
                gold = p.get("gold", {})
                print(f"  round {p['round']}: {p['samples']} samples, {p['steps']} steps; {wins}; "
                      f"gold {gold.get('base', float('nan')):.3f} -> {gold.get('tuned', float('nan')):.3f}")


def main(out: str) -> None:
    runs = sorted(p for p in Path(out).iterdir() if p.is_dir())
    table(runs, "eval", "Validation (shapes:val)")
    table(runs, "eval-test", "Test (shapes:test), evaluated once at the end")
    curves(runs)


if __name__ == "__main__":
    main(sys.argv[1])
