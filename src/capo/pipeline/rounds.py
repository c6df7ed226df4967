"""Online CaPO (``capo run --rounds K``): rounds of generate -> score -> calibrate -> select ->
train from the current weights, each calibrated against the base model's samples.

Round 0 is the run itself (RUN/samples ... RUN/model: exactly the offline ``capo run``); its
samples are the reference bank. Round r >= 1 is the run directory RUN/rounds/rR/: it samples
``samples_per_round`` images for each of ``prompts_per_round`` of the base round's prompts (a
category-balanced subset, a new one every round) from the base model with round r-1's weights
(generate's ``tuned``: the same adapters and sampler), scores them, calibrates each sample against
the base round's samples of the same prompt (calibrate's ``bank``: R_ca(x) = mean over base samples
x' of sigmoid(R(x) - R(x')), Eq. 7 with the base round as the bank), selects pairs with the run's
rule among the round's samples, and trains ``steps_per_round`` steps starting from round r-1's
weights (train's ``init_model``; a new optimizer each round) against the reference ``reference``
(base: the base model in every round; previous: round r-1's model). After every round its model is
evaluated on the validation prompts (``round_evaluate``) in RUN/rounds/rR/eval-val/, and
RUN/rounds/curve.json collects the figures per round. Every step is a pipeline ``Stage`` of the
round's directory, so a run killed in any round resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capo.config import from_dict, to_dict
from capo.errors import CapoError
from capo.pipeline.evaluate import EvaluateConfig, evaluate
from capo.pipeline.generate import process_state
from capo.pipeline.rundir import RunDir, write_text_atomic

#: RunConfig.reference -> TrainConfig.reference (the model p_ref of rounds r >= 1)
ROUND_REFERENCES = {"base": "base", "previous": "init"}
ROUND_STAGES = ("generate", "score", "calibrate", "select", "train")


def round_run(run: RunDir, r: int) -> RunDir:
    """The run directory of round ``r``: the run itself for round 0, else RUN/rounds/rR."""
    return run if r == 0 else RunDir.at(run.root / "rounds" / f"r{r}")


def eval_dir(run: RunDir, r: int) -> Path:
    """Where round ``r``'s model is evaluated on the validation prompts."""
    return run.root / "rounds" / f"r{r}" / "eval-val"


def base_round(cfg: Any, stages: dict[str, Any]) -> dict[str, Any]:
    """Round 0's stage configs: train runs ``steps_per_round`` steps when that is set."""
    if cfg.rounds == 1 or cfg.steps_per_round is None:
        return stages
    return {**stages, "train": dataclasses.replace(stages["train"], max_steps=cfg.steps_per_round)}


def round_stages(run: RunDir, cfg: Any, stages: dict[str, Any], r: int) -> dict[str, Any]:
    """The stage configs of round ``r`` >= 1 (see the module docstring)."""
    gen, train, prev = stages["generate"], stages["train"], round_run(run, r - 1)
    return {
        "generate": dataclasses.replace(
            gen, prompts=str(run.prompts_path), num_prompts=cfg.prompts_per_round,
            samples_per_prompt=cfg.samples_per_round or gen.samples_per_prompt, seed=gen.seed + r,
            tuned=str(prev.model_dir)),
        "score": stages["score"],
        "calibrate": dataclasses.replace(stages["calibrate"], bank=str(run.root)),
        "select": stages["select"],
        "train": dataclasses.replace(
            train, run=str(round_run(run, r).root), init_model=str(prev.model_dir), seed=train.seed + r,
            reference=ROUND_REFERENCES[cfg.reference], max_steps=cfg.steps_per_round or train.max_steps),
    }


def round_evaluate_config(cfg: Any, source: str = "round_evaluate") -> EvaluateConfig:
    """The per-round evaluation: the run's evaluate section with ``round_evaluate`` over it."""
    return from_dict(EvaluateConfig, {**(cfg.evaluate or {}), **(cfg.round_evaluate or {})}, source=source)


def _model_digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()


def evaluate_round(run: RunDir, r: int, ecfg: EvaluateConfig, dirty: bool) -> dict[str, Any]:
    """Evaluate round ``r``'s model on the validation prompts unless done with the same settings
    and model (RUN/rounds/rR/eval-val/settings.json); returns its results."""
    model, out = round_run(run, r).model_dir, eval_dir(run, r)
    ecfg = dataclasses.replace(ecfg, tuned=str(model), out=str(out))
    settings = {"evaluate": to_dict(ecfg), "model": _model_digest(model)}
    done = out / "settings.json"
    if not dirty and done.is_file() and json.loads(done.read_text()) == settings:
        return json.loads((out / "results.json").read_text())
    results = evaluate(round_run(run, r), ecfg)
    if process_state().is_main_process:
        write_text_atomic(json.dumps(settings, indent=1) + "\n", done)
    return results


def curve_row(r: int, run: RunDir, results: dict[str, Any]) -> dict[str, Any]:
    """One point of the curves: the round, its samples and steps, win-rates, balanced gold."""
    rr = round_run(run, r)
    summary = json.loads((rr.model_dir / "train_summary.json").read_text())
    row: dict[str, Any] = {"round": r, "samples": len(rr.read_samples(["sample_idx"])),
                           "steps": summary["steps"],
                           "rewards": {n: {k: v[k] for k in ("win_rate", "ci_low", "ci_high")}
                                       for n, v in results["rewards"].items()}}
    if "gold" in results:
        gold = results["gold"]
        row["gold"] = {"base": gold["base"]["overall"], "tuned": gold["tuned"]["overall"]}
    return row


def run_rounds(run: RunDir, cfg: Any, stages: dict[str, Any], dirty: bool,
               advance: Callable[[Any, RunDir, Any, bool], bool], log: Callable[[str], None]
               ) -> tuple[Path, bool]:
    """Rounds 1..K-1 after round 0 (the run's own stages, done by the caller), each evaluated on
    validation; ``advance(stage, run, config, dirty)`` runs one stage (resuming). Returns the
    last round's model directory and whether it changed."""
    from capo.pipeline.run import STAGE

    ecfg, began = round_evaluate_config(cfg), time.time()
    curve = [curve_row(0, run, evaluate_round(run, 0, ecfg, dirty))]
    log(f"[capo run] round 0 evaluated on {ecfg.prompts} ({time.time() - began:.1f} s)")
    for r in range(1, cfg.rounds):
        rr, cfgs = round_run(run, r), round_stages(run, cfg, stages, r)
        if dirty and rr.sample_shards():
            raise CapoError(f"holds round {r} sampled from an earlier model of round {r - 1}; use a new "
                            "--run (or remove rounds/)", path=str(rr.root))
        for name in ROUND_STAGES:
            began = time.time()
            changed = advance(STAGE[name], rr, cfgs[name], dirty)
            dirty = changed if STAGE[name].recomputed else dirty or changed
            state = "done" if changed else "up to date"
            log(f"[capo run] round {r} {name}: {state} ({time.time() - began:.1f} s)")
        began = time.time()
        curve.append(curve_row(r, run, evaluate_round(run, r, ecfg, dirty)))
        log(f"[capo run] round {r} evaluated on {ecfg.prompts} ({time.time() - began:.1f} s)")
    if process_state().is_main_process:
        write_text_atomic(json.dumps(curve, indent=1) + "\n", run.root / "rounds" / "curve.json")
    return round_run(run, cfg.rounds - 1).model_dir, dirty
