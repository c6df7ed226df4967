"""``capo experiment CONFIG``: run a matrix of pipeline runs that share their data, write the tables.

Per base model, generate + score + calibrate run ONCE into a data root (OUT/data/MODEL); every
cell is a run directory whose read-only inputs (prompts, samples, embeddings, rewards, calibrated
rewards, base_model.json) are symbolic links to the data root, so the pipeline stages run on it
unchanged: select writes the cell's pairs.parquet, train its model/ (and logs/), and the shared
evaluation (``capo.experiments.evaluation``) its eval/. The base model's held-out images and
scores are computed once per base model too. SOUP cells merge trained cells with ``capo.soup``
(no training). Over-optimisation cells train in segments of K steps (resuming from the
checkpoint at each segment's end, which gives the same trajectory as one run) and keep and
evaluate the model after every segment. Everything resumes: a rerun skips finished work, and a
cell whose settings changed is an error (use a new --out). Tables are rewritten after each model.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from capo.config import from_dict, identity_keys, to_dict
from capo.errors import CapoError
from capo.experiments.evaluation import IMAGES, load_eval_set
from capo.experiments.matrix import (
    Cell,
    ExperimentConfig,
    Layout,
    Plan,
    expand,
    load_experiment,
    plan_to_json,
)
from capo.pipeline.calibrate import CalibrateConfig
from capo.pipeline.evaluate import EvaluateConfig
from capo.pipeline.generate import GenerateConfig
from capo.pipeline.run import STAGE
from capo.pipeline.rundir import RunDir, write_text_atomic
from capo.pipeline.score import ScoreConfig
from capo.pipeline.select import SelectConfig, select_pairs
from capo.pipeline.tuned import trained_state_dict

#: data-root files a cell links to (read-only inputs of select, train and evaluate)
LINKS = ("prompts.parquet", "base_model.json", "samples", "embeddings", "rewards", "calibrated.parquet")
SOUP_SUMMARY = "soup.json"


@dataclass
class Stages:
    """The validated stage configs: generate per model label, the rest shared."""

    generate: dict[str, GenerateConfig]
    score: ScoreConfig
    calibrate: CalibrateConfig
    train: Any  # TrainConfig template (run / objective / seed ... set per cell)
    evaluate: EvaluateConfig


def resolve_stages(cfg: ExperimentConfig, source: str = "<experiment>") -> Stages:
    """Every stage section validated by its dataclass; errors name the section and the key."""
    from capo.pipeline.train import TrainConfig

    gen = {label: from_dict(GenerateConfig, {**cfg.generate, "model": model}, f"{source} [generate]")
           for label, model in cfg.models.items()}
    stages = Stages(gen, from_dict(ScoreConfig, {**cfg.score, "reward": cfg.rewards}, f"{source} [score]"),
                    CalibrateConfig(reward=list(cfg.rewards)),
                    from_dict(TrainConfig, {**cfg.train, "run": "<cell>"}, f"{source} [train]"),
                    from_dict(EvaluateConfig, {**cfg.evaluate, "reward": cfg.rewards},
                              f"{source} [evaluate]"))
    return stages


def check_plan(plan: Plan, stages: Stages) -> None:
    """Snapshots need a constant learning rate (a segment boundary must not change the schedule)."""
    if any(c.every for c in plan.cells.values()) and stages.train.lr_schedule != "constant":
        raise CapoError(f"config key 'train.lr_schedule' is '{stages.train.lr_schedule}'; the "
                        "over-optimisation snapshots (and Table 1 read from them) need 'constant'")


class Timings:
    """timings.json: seconds of each phase that did work (kept across reruns), and one record per
    invocation (start time, --only, wall seconds). Each write re-reads the file and merges, so
    invocations running side by side (e.g. ``--only 'vp/*'`` and ``--only 'flow/*'``) keep both."""

    def __init__(self, path: Path, only: list[str] | None = None):
        self.path, self.began = path, time.time()
        self.record = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "only": only or None, "seconds": 0.0,
                       "finished": False}
        self.save()

    def add(self, phase: str, seconds: float) -> None:
        self.save({phase: round(seconds, 2)})

    def save(self, phases: dict[str, float] | None = None, finished: bool = False) -> None:
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        data.setdefault("phases", {}).update(phases or {})
        self.record.update(seconds=round(time.time() - self.began, 1), finished=finished)
        runs = [r for r in data.get("invocations", []) if r["started"] != self.record["started"]
                or r["only"] != self.record["only"]]
        data["invocations"] = [*runs, self.record]
        write_text_atomic(json.dumps(data, indent=1) + "\n", self.path)


def timed(timings: Timings, phase: str, fn: Callable[[], bool], log: Callable[[str], None]) -> None:
    """Run ``fn`` (returns whether it did work); record and log its time if it did."""
    began = time.time()
    if fn():
        timings.add(phase, time.time() - began)
        log(f"[capo experiment] {phase}: {time.time() - began:.1f} s")


def prepare_data(layout: Layout, model: str, stages: Stages, timings: Timings,
                 log: Callable[[str], None]) -> RunDir:
    """The data root of ``model``: generate, score and calibrate once (each resumes or is skipped
    as in ``capo run``)."""
    run = RunDir.at(layout.data(model))
    configs = {"generate": stages.generate[model], "score": stages.score, "calibrate": stages.calibrate}
    for name, cfg in configs.items():
        timed(timings, f"data/{model}/{name}", partial(STAGE[name].advance, run, cfg, False), log)
    return run


def select_config(cell: Cell) -> SelectConfig:
    return SelectConfig(rule=cell.rule, reward=cell.reward if cell.rule == "best_worst" else None)


def train_config(template: Any, cell: Cell, run: str, step: int, resume: bool = False) -> Any:
    """The cell's TrainConfig for training (in run directory ``run``) up to ``step``; the cell's own
    beta and learning rate (chosen on validation) replace the template's."""
    bias = cell.bias if cell.bias is not None else template.sigmoid_bias
    every = cell.every or template.checkpoint_every
    beta = cell.beta if cell.beta is not None else template.beta
    lr = cell.lr if cell.lr is not None else template.learning_rate
    return dataclasses.replace(template, run=run, objective=cell.objective, weighting=cell.weighting,
                               sigmoid_bias=bias, seed=cell.seed, max_steps=step, checkpoint_every=every,
                               resume=resume, beta=beta, learning_rate=lr)


def identity(cell: Cell, stages: Stages, soup: str) -> dict[str, Any]:
    """Everything a cell's results depend on (cell.json); a rerun with other values is refused."""
    keys = identity_keys(type(stages.train))  # TrainConfig fields not declared identity=False
    train = {k: v for k, v in to_dict(train_config(stages.train, cell, "", cell.steps)).items() if k in keys}
    return {"cell": dataclasses.asdict(cell), "generate": to_dict(stages.generate[cell.model]),
            "score": to_dict(stages.score), "train": train if cell.trained else None,
            "select": to_dict(select_config(cell)) if cell.trained else None,
            "soup": soup if not cell.trained else None, "evaluate": to_dict(stages.evaluate)}


def check_cell(layout: Layout, cell: Cell, stages: Stages, soup: str) -> dict[str, Any]:
    """The cell's identity; a cell directory run with other settings is an error naming them."""
    wanted = json.loads(json.dumps(identity(cell, stages, soup)))
    saved_path = layout.cell(cell.key) / "cell.json"
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        diff = next((k for k in wanted if saved.get(k) != wanted[k]), None)
        if diff is not None:
            raise CapoError(f"cell {cell.key} was run with other '{diff}' settings; use a new --out "
                            "(or remove this cell's directory)", path=str(saved_path))
    return wanted


def prepare_cell(layout: Layout, cell: Cell, stages: Stages, soup: str) -> RunDir:
    """The cell's run directory: links to the data root, its config.yaml and cell.json."""
    root, data = layout.cell(cell.key), RunDir.at(layout.data(cell.model))
    wanted = check_cell(layout, cell, stages, soup)
    saved_path = root / "cell.json"
    root.mkdir(parents=True, exist_ok=True)
    for name in LINKS:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(data.root / name, root))
    run = RunDir.at(root)
    if not run.config_path.is_file():
        shared = {k: v for k, v in data.load_config().items() if k in ("generate", "score", "calibrate")}
        write_text_atomic(yaml.safe_dump(shared, sort_keys=False), run.config_path)
    write_text_atomic(json.dumps(wanted, indent=1) + "\n", saved_path)
    return run


def trained_steps(where: Path) -> int | None:
    """Training steps of the model in WHERE/model (None: no finished model there)."""
    summary = where / "model" / "train_summary.json"
    return json.loads(summary.read_text())["steps"] if summary.is_file() else None


def copy_model(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)


def train_cell(layout: Layout, cell: Cell, run: RunDir, template: Any) -> bool:
    """Select pairs, then train to each snapshot step in turn (resuming), keeping each model."""
    from capo.pipeline.checkpoint import checkpoints
    from capo.pipeline.train import train

    if not run.pairs_path.is_file():
        select_pairs(run, select_config(cell))
    did = False
    for step in cell.snapshot_steps():
        where = layout.at(cell, step)
        if trained_steps(where) == step:
            continue
        if trained_steps(run.root) != step:
            train(train_config(template, cell, str(run.root), step, resume=bool(checkpoints(run))))
            did = True
        if where != run.root:
            where.mkdir(parents=True, exist_ok=True)
            copy_model(run.model_dir, where / "model")
    return did


def soup_cell(layout: Layout, plan: Plan, cell: Cell, run: RunDir, method: str) -> bool:
    """model/denoiser.safetensors = the base + the merged task vectors of the member cells (Sec. 5.2)."""
    if (run.model_dir / SOUP_SUMMARY).is_file():
        return False
    members = [layout.ref(plan, ref) / "model" for ref in cell.members]
    missing = [m for m in members if not m.is_dir()]
    if missing:
        raise CapoError(f"soup {cell.key} needs the trained model of a member cell; run it first",
                        path=str(missing[0]))
    write_soup(run, members, method)
    return True


def write_soup(run: RunDir, members: list[Path], method: str) -> None:
    """RUN/model/denoiser.safetensors: θ₀ + COMBINES[method](τ_1..τ_k) (Sec. 5.2), τ_i the members'
    task vectors (LoRA: dense deltas s·BA; full models: θ_i − θ₀), uniform weights; plus soup.json."""
    import torch
    from safetensors.torch import save_file

    from capo.pipeline.generate import load_base
    from capo.soup import merge_task_vectors

    adapter = load_base(run.read_base_model(), torch.device("cpu"), load_text_encoders=False, load_vae=False)
    base = {k: v.detach().clone() for k, v in adapter.denoiser.state_dict().items()}
    merged = merge_task_vectors(base, [task_vector(base, m) for m in members], method)
    tmp = run.root / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / "denoiser.safetensors"))
    (tmp / SOUP_SUMMARY).write_text(json.dumps({"method": method, "members": [str(m) for m in members]}))
    shutil.rmtree(run.model_dir, ignore_errors=True)
    os.replace(tmp, run.model_dir)


def task_vector(base: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """τ = θ − θ₀ of a trained model/: a LoRA adapter's dense deltas (alpha / r)·BA, or a full
    denoiser's difference to the base, keyed by base weight names."""
    from capo.soup import lora_delta

    weights = trained_state_dict(model_dir)
    lora_config = model_dir / "adapter_config.json"
    if lora_config.is_file():
        return lora_delta(weights, alpha=float(json.loads(lora_config.read_text())["lora_alpha"]))
    return {k: weights[k] - base[k] for k in weights if base[k].is_floating_point()}


def run_cell(layout: Layout, plan: Plan, cell: Cell, stages: Stages, es: Any, soup: str,
             timings: Timings, log: Callable[[str], None]) -> None:
    """Train (or merge) the cell, then evaluate every kept step that has no evaluation yet."""
    run = prepare_cell(layout, cell, stages, soup)
    if cell.trained:
        timed(timings, f"cells/{cell.key}/train", lambda: train_cell(layout, cell, run, stages.train), log)
    else:
        timed(timings, f"cells/{cell.key}/soup", lambda: soup_cell(layout, plan, cell, run, soup), log)
    for step in cell.snapshot_steps():
        where = layout.at(cell, step)
        if not (where / "eval" / IMAGES).is_file():
            timed(timings, f"cells/{cell.key}/eval-{step}",
                  lambda w=where, s=step: bool(es.evaluate(w, w / "model", f"evaluate {cell.key} @{s}")), log)


def write_experiment_config(layout: Layout, cfg: ExperimentConfig, stages: Stages, plan: Plan) -> None:
    """experiment.yaml (the resolved config of the experiment and of every stage) and plan.json."""
    resolved = {"experiment": to_dict(cfg),
                "stages": {"generate": {k: to_dict(v) for k, v in stages.generate.items()},
                           "score": to_dict(stages.score), "calibrate": to_dict(stages.calibrate),
                           "train": {k: v for k, v in to_dict(stages.train).items() if k != "run"},
                           "evaluate": to_dict(stages.evaluate)},
                "command": "capo " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("capo") else None}
    write_text_atomic(yaml.safe_dump(resolved, sort_keys=False), layout.config_path)
    write_text_atomic(json.dumps(plan_to_json(plan), indent=1) + "\n", layout.plan_path)


def run_experiment(cfg: ExperimentConfig, stages: Stages, only: list[str] | None = None,
                   log: Callable[[str], None] = print) -> Plan:
    """Run every cell of ``cfg`` (or those whose MODEL/NAME matches a glob in ``only``), then the tables."""
    from capo.experiments.tables import write_tables

    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    layout = Layout(Path(cfg.out))
    plan = expand(cfg, stages.train)
    check_plan(plan, stages)
    chosen = [c for c in plan.ordered() if not only or any(fnmatch.fnmatch(c.key, g) for g in only)]
    for cell in chosen:  # refuse changed settings before anything is written
        check_cell(layout, cell, stages, cfg.soup)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_experiment_config(layout, cfg, stages, plan)
    timings = Timings(layout.timings_path, only)
    for model in cfg.models:
        cells = [c for c in chosen if c.model == model]
        if not cells:
            continue
        data = prepare_data(layout, model, stages, timings, log)
        cached = (layout.base_eval(model) / "meta.json").is_file()
        began = time.time()
        es = load_eval_set(data, stages.evaluate, layout.base_eval(model))
        if not cached:
            timings.add(f"data/{model}/eval-base", time.time() - began)
        for i, cell in enumerate(cells):
            log(f"[capo experiment] cell {i + 1}/{len(cells)} of {model}: {cell.key}")
            run_cell(layout, plan, cell, stages, es, cfg.soup, timings, log)
        write_tables(layout)
    timings.save(finished=True)
    return plan


def workload(cfg: ExperimentConfig, stages: Stages, plan: Plan) -> dict[str, int]:
    """What the plan costs, in the units that take the time: images sampled for training data and
    for evaluation (base model once per model, every kept step of every cell), training steps."""
    from capo.pipeline.evaluation import eval_items
    from capo.pipeline.prompts import load_prompts, subset

    count = lambda c: len(subset(load_prompts(c.prompts), c.num_prompts, c.seed))  # noqa: E731
    evals = len(cfg.models) + sum(len(c.snapshot_steps()) for c in plan.cells.values())
    return {"generated images": sum(count(g) * g.samples_per_prompt for g in stages.generate.values()),
            "evaluated images": evals * len(eval_items(stages.evaluate)),
            "evaluations": evals,
            "trainings": sum(c.trained for c in plan.cells.values()),
            "training steps": sum(c.steps for c in plan.cells.values() if c.trained),
            "pairs per step": stages.train.batch_size}


#: short names of the shipped experiment configs
SHIPPED = {"shapes": "experiment-shapes.yaml", "smoke": "experiment-smoke.yaml",
           "sweep": "experiment-sweep.yaml"}


def config_path(name: str) -> str:
    """CONFIG as given, or the shipped config it names (``shapes``, ``smoke``)."""
    if Path(name).is_file() or name not in SHIPPED:
        return name
    from importlib import resources

    return str(resources.files("capo") / "configs" / SHIPPED[name])


def experiment_command(args: argparse.Namespace) -> None:
    path = config_path(args.config)
    cfg = load_experiment(path, args.set, args.out)
    stages = resolve_stages(cfg, path)
    if args.dry_run:
        plan = expand(cfg, stages.train)
        check_plan(plan, stages)
        trained = sum(c.trained for c in plan.cells.values())
        print(f"{len(plan.cells)} cells ({trained} trained, {len(plan.cells) - trained} soups), "
              f"{len(plan.entries)} table entries; output {cfg.out}")
        print("work: " + ", ".join(f"{k} {v}" for k, v in workload(cfg, stages, plan).items()))
        for cell in plan.ordered():
            every = f", snapshots every {cell.every}" if cell.every else ""
            print(f"  {cell.key}  steps {cell.steps}{every}")
        return
    from capo.experiments.tables import write_tables

    began = time.time()
    if not args.tables_only:
        run_experiment(cfg, stages, args.only)
    layout = Layout(Path(cfg.out))
    print(write_tables(layout), end="")
    print(f"[capo experiment] finished in {time.time() - began:.1f} s; tables in {layout.tables_dir}")


def register(sub: Any) -> None:
    """``capo experiment CONFIG [--out DIR] [--set KEY=VALUE ...] [--only GLOB ...] [--dry-run]``."""
    p = sub.add_parser("experiment", help="a matrix of pipeline runs sharing their data, and its tables",
                       description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1])
    add_matrix_arguments(
        p, config=f"experiment YAML file, or a shipped one: {', '.join(SHIPPED)}",
        out="experiment directory (default: the config's 'out')",
        example="--set train_seeds=[0,1] or --set train.max_steps=100",
        tables="only rewrite the tables from finished cells",
    )  # fmt: skip
    p.set_defaults(func=experiment_command)


def add_matrix_arguments(
    p: argparse.ArgumentParser, config: str, out: str, example: str, tables: str
) -> None:
    """CONFIG, --out, --set, --only, --dry-run, --tables-only: the options of a command over an
    experiment matrix (``capo experiment``, ``capo sweep``), with the command's help texts."""
    p.add_argument("config", metavar="CONFIG", help=config)
    p.add_argument("--out", default=None, metavar="DIR", help=out)
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help=f"override a setting, e.g. {example}")
    p.add_argument("--only", action="append", default=None, metavar="GLOB",
                   help="run only the cells whose MODEL/NAME matches, e.g. 'vp/*' (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.add_argument("--tables-only", action="store_true", help=tables)
