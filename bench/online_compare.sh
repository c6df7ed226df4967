#!/usr/bin/env bash
# Online CaPO against offline CaPO (and DPO) in the shapes world, with the same total number of
# generated samples and training steps (docs/results.md, "Online CaPO").
#
#   MODEL=shapes-vp BETA_CAPO=100 BETA_DPO=1000 bash bench/online_compare.sh OUT SEED [SEED ...]
#   python bench/online_table.py OUT [--split eval-test] [--plot OUT/frontier.png]
#
# Per objective (capo, dpo; the run's other settings from configs/shapes-online.yaml) and seed:
#   offline          1 round: P prompts x N samples, STEPS steps
#   online-base      K rounds: round 0 P prompts x N/2, rounds 1..K-1 P/(K-1) prompts x N/2 each
#                    (the same P x N samples in all), STEPS/K steps per round; reference = base
#   online-previous  the same with reference = the previous round's model (round 0 is copied
#                    from online-base: it is the same computation)
# Every model is evaluated on the validation prompts (evaluate.images_per_category=EVAL_IPC); with
# TEST=1 the finished models are then evaluated once on the test prompts (OUT/RUN/eval-test).
# Sizes: P, N, STEPS, K, EVAL_IPC, ROUND_IPC (the per-round curve points) in the environment;
# MODEL (default shapes-vp), and each objective's beta and learning rate, BETA_CAPO, BETA_DPO,
# LR_CAPO, LR_DPO (default: the config's train section; use the values capo sweep chose on
# validation).
set -euo pipefail
OUT=$1; shift
P=${P:-96} N=${N:-8} STEPS=${STEPS:-120} K=${K:-3} EVAL_IPC=${EVAL_IPC:-16} ROUND_IPC=${ROUND_IPC:-4}
CONFIG=${CONFIG:-src/capo/configs/shapes-online.yaml} MODEL=${MODEL:-shapes-vp}
mkdir -p "$OUT"

base_of() {  # copy the finished round 0 of $1 into $2 (everything a rerun finds up to date)
  mkdir -p "$2"
  for f in "$1"/*; do
    case "$(basename "$f")" in rounds|eval|logs) ;; *) cp -r "$f" "$2/" ;; esac
  done
}

for seed in "$@"; do
  for obj in capo dpo; do
    beta_var="BETA_${obj^^}" lr_var="LR_${obj^^}" && beta=${!beta_var:-} lr=${!lr_var:-}
    common=(--config "$CONFIG" --set generate.model="$MODEL" --set generate.num_prompts="$P" --set generate.seed="$seed"
            ${beta:+--set train.beta="$beta"} ${lr:+--set train.learning_rate="$lr"}
            --set train.seed="$seed" --set train.objective="$obj" --set train.log_with=none
            --set evaluate.images_per_category="$EVAL_IPC"
            --set round_evaluate.images_per_category="$ROUND_IPC")
    off="$OUT/offline-$obj-s$seed" onb="$OUT/online-base-$obj-s$seed" onp="$OUT/online-previous-$obj-s$seed"
    if [ "$obj" = dpo ] && [ ! -d "$off" ]; then  # the samples and scores of capo's runs, trained again
      base_of "$OUT/offline-capo-s$seed" "$off" && rm -rf "$off"/{model,checkpoints,trainset}
    fi
    capo run "${common[@]}" --run "$off" --rounds 1 --set generate.samples_per_prompt="$N" \
      --set train.max_steps="$STEPS"
    online=("${common[@]}" --rounds "$K" --set generate.samples_per_prompt=$((N / 2))
            --set prompts_per_round=$((P / (K - 1))) --set samples_per_round=$((N / 2))
            --set steps_per_round=$((STEPS / K)))
    if [ "$obj" = dpo ] && [ ! -d "$onb" ]; then
      base_of "$OUT/online-base-capo-s$seed" "$onb" && rm -rf "$onb"/{model,checkpoints,trainset}
    fi
    capo run "${online[@]}" --run "$onb" --set reference=base
    [ -d "$onp" ] || base_of "$onb" "$onp"
    capo run "${online[@]}" --run "$onp" --set reference=previous
  done
done

if [ "${TEST:-0}" = 1 ]; then  # once, at the end: the test split (never used to choose anything)
  for run in "$OUT"/*-s*; do
    [ -f "$run/eval-test/results.json" ] && continue
    last=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['evaluate'].get('tuned') or sys.argv[2])" \
           "$run/config.yaml" "$run/model")
    capo evaluate --run "$run" --tuned "$last" --prompts shapes:test --images-per-category "$EVAL_IPC" \
      --out "$run/eval-test"
  done
fi
