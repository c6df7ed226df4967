"""``capo run``: the whole pipeline generate -> score -> calibrate -> select -> train -> evaluate.

The configuration is one YAML file with a section per stage (default: the shipped
``capo/configs/shapes.yaml``, the shapes world end to end on a CPU) plus ``--set
SECTION.KEY=VALUE`` overrides. Every section is validated before anything runs. A rerun
resumes: generate and score skip finished shards; calibrate, select, train and evaluate are
skipped when their output exists with the same settings and nothing upstream changed, and an
interrupted training resumes from its newest checkpoint. The resolved configuration is saved in
RUN/config.yaml and the results table is printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from capo.config import doc, from_dict, identity_keys, load_yaml, to_dict
from capo.errors import CapoError
from capo.pipeline.calibrate import CalibrateConfig, calibrate_run
from capo.pipeline.evaluate import EvaluateConfig, evaluate
from capo.pipeline.evaluation import results_markdown
from capo.pipeline.generate import GenerateConfig, generate, process_state
from capo.pipeline.prompts import load_prompts, subset
from capo.pipeline.rounds import base_round, round_evaluate_config, run_rounds
from capo.pipeline.rundir import RunDir
from capo.pipeline.score import ScoreConfig, score
from capo.pipeline.select import SelectConfig, select_pairs


def _changed_key(saved: dict[str, Any] | None, cfg: Any) -> str | None:
    """The first identity setting of ``cfg`` (config.identity_keys) that differs from the saved
    one ('(never ran)' if none saved), else None."""
    if saved is None:
        return "(never ran)"
    current, keys = to_dict(cfg), identity_keys(type(cfg))
    return next((k for k in keys if saved.get(k) != current.get(k)), None)


def saved_settings(run: RunDir, name: str) -> dict[str, Any] | None:
    """The settings stage ``name`` last ran with. Train's are read from model/train_summary.json,
    which appears in the same rename as the model (config.yaml is written just after it)."""
    summary = run.model_dir / "train_summary.json"
    if name == "train" and summary.is_file():
        try:
            return json.loads(summary.read_text())["config"]
        except (ValueError, KeyError, UnicodeDecodeError):
            raise CapoError("unreadable train summary; remove model/ and rerun", path=str(summary)) from None
    return run.load_config().get(name)


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once: ``capo run`` runs it (``advance``), ``capo NAME`` is its
    subcommand (``capo.pipeline.commands``), and ``capo experiment`` prepares its data roots with it.

    A stage with an ``output`` reruns unless that output exists with the same identity settings and
    nothing upstream changed, and it changed something if its output's bytes changed (a repaired
    input that gives the same output leaves the later stages up to date); one without resumes by
    itself (finished shards are skipped) and ``worked`` tells from its summary whether it did work.
    ``pending`` says what a rerun would change in a run that already holds a trained model.
    """

    name: str
    config: Callable[[], type]  # its config dataclass (train's is imported lazily: it pulls in the trainer)
    step: Callable[[RunDir, Any], Any]  # the stage itself: (run, config) -> summary
    summary: Callable[[Any], str]  # the summary as its subcommand prints it
    help: str
    description: str
    output: Callable[[RunDir], Path] | None = None
    worked: Callable[[Any], bool] = bool
    pending: Callable[[Stage, RunDir, Any], str | None] | None = None  # None: nothing upstream of the model
    main_only: bool = False  # runs in one process; under torchrun / accelerate launch the others wait
    recomputed: bool = False  # its output is recomputed whole: after it, only its own change counts
    runner: Callable[[Stage, RunDir, Any, bool], bool] | None = None  # instead of ``advance``'s rule
    cli: Callable[[Any], None] | None = None  # its own subcommand (train: its config carries the run)

    def changed(self, run: RunDir, cfg: Any) -> str | None:
        """The first identity setting that differs from the one the stage last ran with, else None."""
        return _changed_key(saved_settings(run, self.name), cfg)

    def settings_changed(self, run: RunDir, cfg: Any) -> str | None:
        key = self.changed(run, cfg)
        return None if key is None else f"setting '{key}' changed"

    def advance(self, run: RunDir, cfg: Any, dirty: bool) -> bool:
        """Run the stage unless it is up to date (``dirty``: something upstream changed); returns
        whether it changed anything. A stage that runs on every process asks the main one."""
        if self.runner is not None:
            return self.runner(self, run, cfg, dirty)
        if self.output is None:
            return self.worked(self.step(run, cfg))
        output = self.output(run)
        current = lambda: not dirty and output.exists() and self.changed(run, cfg) is None  # noqa: E731
        if current() if self.main_only else on_main_process(process_state(), current):
            return False
        before = _sha256(output)
        self.step(run, cfg)
        return _sha256(output) != before


def _pending_generate(stage: Stage, run: RunDir, cfg: GenerateConfig) -> str | None:
    n = len(subset(load_prompts(cfg.prompts), cfg.num_prompts, cfg.seed))
    return None if len(run.sample_shards()) >= -(-n // cfg.chunk_size) else "samples are incomplete"


def _pending_score(stage: Stage, run: RunDir, cfg: ScoreConfig) -> str | None:
    missing = [r for r in cfg.reward if not run.reward_path(r).is_file()]
    return f"reward '{missing[0]}' is not scored yet" if missing else None


def _run_train(stage: Stage, run: RunDir, cfg: Any, dirty: bool) -> bool:
    """Train unless RUN/model matches; resume an interrupted training; never overwrite other work."""
    from capo.pipeline.checkpoint import checkpoints

    fresh = stage.changed(run, cfg) is None
    if run.model_dir.is_dir() and not model_intact(run):
        shutil.rmtree(run.model_dir)  # damaged: trained again (from the newest intact checkpoint)
    if run.model_dir.is_dir():
        if fresh and not dirty:
            return False
        raise CapoError("holds a model trained from other pairs or settings; use a new --run "
                        "(or remove model/ and checkpoints/)", path=str(run.model_dir))
    if checkpoints(run) and dirty:
        raise CapoError("holds checkpoints of a training on other pairs; use a new --run "
                        "(or remove checkpoints/)", path=str(run.checkpoints_dir))
    cfg.resume = bool(checkpoints(run))
    stage.step(run, cfg)
    return True


def model_intact(run: RunDir) -> bool:
    """Whether RUN/model matches its manifest; a damaged one is reported on stderr."""
    from capo.pipeline.integrity import damage

    problem = damage(run.model_dir) or (None if (run.model_dir / "train_summary.json").is_file()
                                        else "train_summary.json: missing")
    if problem is not None:
        print(f"capo run: {run.model_dir}: damaged ({problem}); training it again", file=sys.stderr)
    return problem is None


def _train_config() -> type:
    from capo.pipeline.train import TrainConfig

    return TrainConfig


def _train(run: RunDir, cfg: Any) -> Any:
    from capo.pipeline.train import train

    return train(cfg)


def _register_train(sub: Any) -> None:
    from capo.pipeline.train import register

    register(sub)


#: the pipeline, in order
PIPELINE: tuple[Stage, ...] = (
    Stage("generate", lambda: GenerateConfig, generate, lambda r: (
        f"generate: {r.prompts} prompts, {r.chunks} chunks: {r.written} written now "
        f"({r.samples_written} samples), {r.skipped} already done"),
        "sample N images per prompt from the base model",
        "Generate N samples per prompt (images, final latents, seeds) and cache text embeddings; "
        "resumes after an interruption; runs on every rank under torchrun/accelerate launch.",
        worked=lambda r: r.written > 0, pending=_pending_generate),
    Stage("score", lambda: ScoreConfig, score, lambda r: "score: " + ", ".join(
        f"{name} ({n} scored now)" for name, n in r.items()),
        "score every sample with reward models",
        "Score all samples with each reward model (one file per reward); resumable.",
        worked=lambda r: any(r.values()), pending=_pending_score),
    Stage("calibrate", lambda: CalibrateConfig, calibrate_run, lambda r: (
        f"calibrate: {r['samples']} samples of {r['prompts']} prompts, {r['rewards']} rewards"),
        "calibrated rewards (expected win-rates, Eq. 7)",
        "Turn raw scores into calibrated rewards and their ensemble: calibrated.parquet.",
        output=lambda run: run.calibrated_path, pending=Stage.settings_changed, main_only=True,
        recomputed=True),
    Stage("select", lambda: SelectConfig, select_pairs, lambda r: (
        f"select: {r['kept']} of {r['prompts']} prompts kept, mean |X+| {r['mean_pos']:.2f}, "
        f"mean |X-| {r['mean_neg']:.2f}"),
        "select training pairs (best_worst | sum | frs)",
        "Select positive and negative sets per prompt from calibrated rewards: pairs.parquet.",
        output=lambda run: run.pairs_path, pending=Stage.settings_changed, main_only=True, recomputed=True),
    Stage("train", _train_config, _train, str, "", "",  # help: its own subcommand, capo.pipeline.train
          output=lambda run: run.model_dir, pending=Stage.settings_changed, runner=_run_train,
          cli=_register_train),
    Stage("evaluate", lambda: EvaluateConfig, evaluate, results_markdown,
          "base vs tuned: win-rates, scores, gold accuracy",
          "Compare the tuned model with the base model on held-out prompts with shared initial noise: "
          "eval/results.json, results.md, scores.csv, grid.png.",
          output=lambda run: run.eval_dir / "results.json", recomputed=True),
)
STAGES = tuple(stage.name for stage in PIPELINE)
STAGE = {stage.name: stage for stage in PIPELINE}


def default_config() -> str:
    """Path of the shipped shapes-world configuration."""
    return str(resources.files("capo") / "configs" / "shapes.yaml")


@dataclass
class RunConfig:
    """``capo run``: the run directory, the stages to run, and one section per stage."""

    run: str = doc("run directory", "runs/shapes-capo")
    stages: list[str] = doc("stages to run, in pipeline order", list(STAGES))
    threads: int | None = doc("torch CPU threads (default: torch's choice; 1 is faster on a busy CPU)", None)
    generate: dict = doc("settings of stage generate (GenerateConfig)", {})
    score: dict = doc("settings of stage score (ScoreConfig)", {})
    calibrate: dict = doc("settings of stage calibrate (CalibrateConfig)", {})
    select: dict = doc("settings of stage select (SelectConfig)", {})
    train: dict = doc("settings of stage train (TrainConfig)", {})
    evaluate: dict = doc("settings of stage evaluate (EvaluateConfig)", {})
    rounds: int = doc("online CaPO rounds K: round 0 is the offline run, rounds 1..K-1 sample from the "
                      "current model and train on (capo.pipeline.rounds); 1: offline", 1, ge=1)
    prompts_per_round: int | None = doc("prompts of each round after the first: a category-balanced subset "
                                        "of the base round's, new every round (default: all)", None, ge=1)
    samples_per_round: int | None = doc("samples per prompt in each round after the first (default: "
                                        "generate.samples_per_prompt)", None, ge=2)
    steps_per_round: int | None = doc("training steps of every round, round 0 included (default: "
                                      "train.max_steps)", None, ge=1)
    reference: str = doc("the implicit reward's reference model in rounds after the first: base (one "
                         "anchor for all rounds) or previous (the previous round's model)", "base",
                         choices=("base", "previous"))
    round_evaluate: dict = doc("settings over the evaluate section for the evaluation after every round "
                               "(RUN/rounds/rR/eval-val; with rounds > 1)", {"prompts": "shapes:val"})

    def validate(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise CapoError(f"config key 'stages': unknown stage '{bad[0]}' (known: {', '.join(STAGES)})")
        if self.rounds > 1:
            round_evaluate_config(self)  # a bad key of round_evaluate is an error before anything runs
        if self.threads is not None and self.threads < 1:
            raise CapoError(f"config key 'threads' must be >= 1, got {self.threads}")


def apply_overrides(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``SECTION.KEY=VALUE`` (or top-level ``KEY=VALUE``) overrides; VALUE is parsed as YAML."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CapoError(f"--set expects SECTION.KEY=VALUE, got '{item}'")
        section, dot, field = key.partition(".")
        parsed = yaml.safe_load(value) if value else None
        if dot:
            if not isinstance(data.get(section, {}), dict):
                raise CapoError(f"--set {item}: '{section}' is not a section")
            data[section] = {**(data.get(section) or {}), field: parsed}
        else:
            data[key] = parsed
    return data


def resolve(
    config_path: str | None, run_dir: str | None, sets: list[str]
) -> tuple[RunConfig, dict[str, Any]]:
    """(RunConfig, stage -> validated stage config); any bad key or value is an error naming it."""
    path = config_path or default_config()
    data = apply_overrides(load_yaml(path), sets)
    if run_dir is not None:
        data["run"] = run_dir
    cfg = from_dict(RunConfig, data, source=path)
    stages: dict[str, Any] = {}
    for name in STAGES:
        section = dict(getattr(cfg, name) or {})
        if name == "train":
            section["run"] = cfg.run
        stages[name] = from_dict(STAGE[name].config(), section, source=f"{path} [{name}]")
    return cfg, stages


def preflight(run: RunDir, cfg: RunConfig, stages: dict[str, Any]) -> None:
    """Refuse, before writing anything, a rerun that would make RUN/model stale."""
    if not run.model_dir.is_dir() or "train" not in cfg.stages:
        return
    for stage in (s for s in PIPELINE if s.pending is not None and s.name in cfg.stages):
        reason = stage.pending(stage, run, stages[stage.name])
        if reason is not None:
            raise CapoError(f"holds a model trained with other data or settings ({stage.name}: {reason}); "
                            "use a new --run (or remove model/ and checkpoints/)", path=str(run.model_dir))


def on_main_process(state: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main process only; every process returns its result or raises its error."""
    if state.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box = [("ok", fn())]
        except Exception as e:  # the others must not wait for ever
            box = [("error", str(e))]
            broadcast_object_list(box)
            raise
    broadcast_object_list(box)
    kind, value = box[0]
    if kind == "error":
        raise CapoError(f"the main process failed: {value}")
    return value


def advance(state: Any, stage: Stage, run: RunDir, cfg: Any, dirty: bool) -> bool:
    """``stage.advance``; a main-only stage runs on the main process while the others wait."""
    step = partial(stage.advance, run, cfg, dirty)
    return on_main_process(state, step) if stage.main_only else step()


def run_pipeline(
    cfg: RunConfig, stages: dict[str, Any], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the configured stages in order (resuming); returns eval/results.json's content (or {}).
    Under a multi-process launcher, generate, score, train and evaluate split their work over the
    processes; calibrate and select run on the main process while the others wait."""
    run = RunDir.at(cfg.run)
    stages = base_round(cfg, stages)  # round 0 trains steps_per_round steps when that is set
    preflight(run, cfg, stages)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    state = process_state()
    log = log if state.is_main_process else (lambda _: None)
    dirty = False
    for stage in (s for s in PIPELINE if s.name in cfg.stages):
        began = time.time()
        changed = advance(state, stage, run, stages[stage.name], dirty)
        dirty = changed if stage.recomputed else dirty or changed
        log(f"[capo run] {stage.name}: {'done' if changed else 'up to date'} ({time.time() - began:.1f} s)")
        if stage.name == "train" and cfg.rounds > 1:  # online rounds; evaluate then takes the last model
            last, dirty = run_rounds(run, cfg, stages, dirty, partial(advance, state), log)
            final = replace(stages["evaluate"], tuned=str(last), out=str(run.eval_dir))
            stages = {**stages, "evaluate": final}
    if state.is_main_process:
        run.save_config("run", {k: v for k, v in to_dict(cfg).items() if k not in STAGES})
    state.wait_for_everyone()
    results_path = run.eval_dir / "results.json"
    return json.loads(results_path.read_text()) if results_path.is_file() else {}


def run_command(args: argparse.Namespace) -> None:
    rounds = [] if args.rounds is None else [f"rounds={args.rounds}"]
    cfg, stages = resolve(args.config, args.run, [*(args.set or []), *rounds])
    began = time.time()
    results = run_pipeline(cfg, stages)
    if not process_state().is_main_process:
        return
    print(f"[capo run] finished in {time.time() - began:.1f} s; run directory {cfg.run}")
    if results:
        print(results_markdown(results), end="")


def register(sub: Any) -> None:
    """``capo run [--config FILE] [--run DIR] [--set SECTION.KEY=VALUE ...]``."""
    p = sub.add_parser("run", help="the whole pipeline (default: the shapes world, shipped settings)",
                       description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1])
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"YAML file with one section per stage (default: {default_config()})")
    p.add_argument("--run", "--run-dir", dest="run", default=None, metavar="DIR",
                   help="run directory (default: the config's 'run'); under torchrun spell it --run-dir")
    p.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set generate.num_prompts=64 (repeatable)")
    p.add_argument("--rounds", type=int, default=None, metavar="K",
                   help="online CaPO: K rounds, each sampling from the current model (default: the "
                        "config's 'rounds', 1 = offline; capo.pipeline.rounds)")
    p.set_defaults(func=run_command)
