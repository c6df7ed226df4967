#!/bin/bash
# Variance control and diagnostics of CaPO training on a small shapes run (docs/objectives.md).
#
#   bash bench/variance_grid.sh RUN OUT
#
# RUN: a run directory after capo generate/score/calibrate/select (docs/objectives.md names the
# commands that made the one measured there); OUT: a directory for the train_summary.json copies.
# Trains 30 steps of 8 pairs at beta 300 and 3000, each as: K = 1 draw (the default), K = 4
# draws, shared noise, and the paper's un-normalised weighting; then prints the table.
set -euo pipefail
R=$1; OUT=$2
mkdir -p "$OUT"
common="--run $R --objective capo --max-steps 30 --batch-size 8 --seed 0 --log-with none --checkpoint-every 0 --loader-workers 0"
for beta in 300 3000; do
  for variant in "k1:" "k4:--draws 4" "shared:--share-noise" "paper:--normalize-weighting false"; do
    name=${variant%%:*}; flags=${variant#*:}
    echo "== beta $beta $name: capo train $common --beta $beta $flags"
    # shellcheck disable=SC2086
    nice -n 10 capo train $common --beta "$beta" $flags 2>&1 | grep -v "it/s\|s/it"
    cp "$R/model/train_summary.json" "$OUT/b${beta}-${name}.json"
  done
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
keys = ["beta_delta_theta", "beta_delta_theta_std", "near_target", "loss_at_start", "loss", "clipped"]
print("| beta | variant | " + " | ".join(f"{k} (last 5)" for k in keys)
      + " | std (all steps) | clipped (all steps) | warned | s |")
print("|---" * (len(keys) + 6) + "|")
for f in sorted(Path(sys.argv[1]).glob("b*.json"), key=lambda p: (int(p.stem.split("-")[0][1:]), p.stem)):
    s = json.loads(f.read_text()); d = s["diagnostics"]
    beta, name = f.stem.split("-")
    print(f"| {beta[1:]} | {name} | " + " | ".join(f"{d['last'][k]:.4g}" for k in keys)
          + f" | {d['mean']['beta_delta_theta_std']:.4g} | {d['mean']['clipped']:.2f} | {d['beta_too_large']}"
          + f" | {s['seconds']:.0f} |")
PY
