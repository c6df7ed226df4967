"""The experiment matrix of ``capo experiment``: its config and its expansion into cells.

For each base model (label -> model) the experiment reproduces the paper's tables:

- ``table1`` (Table 1): objective x reward; pairs = best/worst on that one reward (Sec. 5.1);
- ``table2`` (Table 2): objective x {SUM, SOUP, FRS} (Sec. 5.2); SOUP merges the ``table1``
  models of the same objective (``soup``: slerp of their LoRA task vectors), no training;
- ``table5`` (Table 5): CaPO + FRS under each loss weighting (Sec. 4.4);
- ``overopt``: DPO and CaPO on one learned reward (best/worst pairs), evaluated every K steps;
- ``sweep`` (``capo sweep``): objective x β (x learning rate), pairs by ``sweep_rule``, evaluated
  on the validation prompts, to choose each objective's values (``hyper``) before the tables run.

``hyper`` (MODEL -> OBJECTIVE -> {beta, learning_rate}) gives every cell of that model and
objective its own training values (the sweep's chosen.yaml); a cell with its own values carries
them in its name (``capo-frs-sig1.5-b100-s0``).

A cell is one training (or one soup) = (model, objective, pair rule [+ reward], weighting, bias,
training seed); it is trained once even when several tables use it. A table entry points at cells
through ``CellRef`` (cell, training step): the over-optimisation cells train longer and keep
snapshots, and Table 1 reads their snapshot at ``train.max_steps`` (exact with a constant
learning rate: the pair stream is a function of (seed, step)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capo.config import doc, from_dict, load_yaml
from capo.errors import CapoError
from capo.pipeline.score import DEFAULT_REWARDS

TABLES = ("table1", "table2", "table5", "overopt", "sweep")
#: training values a sweep may vary / ``hyper`` may set per model and objective -> Cell field
HYPER_KEYS = {"beta": "beta", "learning_rate": "lr"}
#: Table 2 method -> pair rule of its cells
METHODS: dict[str, str] = {"SUM": "sum", "SOUP": "soup", "FRS": "frs"}
OBJECTIVES = ("dpo", "ipo", "capo")
SOUPS = ("slerp", "linear")
#: keys of a stage section that the experiment sets itself (per model or per cell)
RESERVED: dict[str, tuple[str, ...]] = {
    "generate": ("model",),
    "score": ("reward",),
    "train": ("run", "objective", "resume"),
    "evaluate": ("tuned", "reward"),
}
LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class ExperimentConfig:
    """``capo experiment``: the models, the tables, and one settings section per pipeline stage."""

    out: str = doc("experiment directory", "runs/experiment-shapes")
    models: dict = doc("base models: label -> model (built-in name or saved model dir)",
                       {"vp": "shapes-vp", "flow": "shapes-flow"})
    rewards: list[str] = doc("reward models: each trains a Table 1 column; all are evaluated",
                             list(DEFAULT_REWARDS))
    objectives: list[str] = doc("preference objectives of Tables 1 and 2", list(OBJECTIVES))
    tables: list[str] = doc("tables to produce: table1, table2, table5, overopt (sweep: capo sweep)",
                            ["table1", "table2", "table5", "overopt"])
    train_seeds: list[int] = doc("training seeds of every cell", [0], ge=0)
    key_cells: list[str] = doc("Table 2 cells OBJECTIVE-METHOD run with key_seeds",
                               ["capo-frs", "dpo-frs", "capo-sum"])
    key_seeds: list[int] = doc("training seeds of the key comparison cells", [0, 1, 2], ge=0)
    soup: str = doc("SOUP merge of task vectors: slerp | linear", "slerp")
    weightings: list[str] = doc("Table 5 loss weightings: constant | sigmoid:BIAS",
                                ["constant", "sigmoid:1.0", "sigmoid:1.5", "sigmoid:2.0"])
    overopt_objectives: list[str] = doc("objectives of the over-optimisation curves", ["dpo", "capo"])
    overopt_reward: str = doc("the learned reward trained on in the over-optimisation cells",
                              "shapes-preference")
    overopt_steps: int | None = doc("training steps of the over-optimisation cells (default: train)", None)
    overopt_every: int = doc("evaluate the over-optimisation cells every K steps", 50)
    hyper: dict = doc("per model and objective training values chosen on validation (capo sweep's "
                      "chosen.yaml): MODEL -> OBJECTIVE -> {beta, learning_rate}", {})
    sweep_betas: dict = doc("capo sweep: the beta grid per objective, OBJECTIVE -> [beta, ...]", {})
    sweep_learning_rates: list[float] = doc("capo sweep: learning rates crossed with every beta "
                                            "(empty: the train section's)", [])
    sweep_rule: str = doc("capo sweep: pair rule of the sweep cells: frs | sum", "frs")
    criterion: str = doc("capo sweep: the choice on validation, declared before the run: mean_win "
                         "(mean over the trained rewards of the win-rate) | min_win | mean_low (mean "
                         "of the intervals' lower bounds); never gold, never test", "mean_win")
    torch_threads: int | None = doc("CPU threads of torch (default: torch's; 1 on a busy CPU)", None)
    generate: dict = doc("settings of stage generate, shared by every cell (GenerateConfig)", {})
    score: dict = doc("settings of stage score (ScoreConfig; rewards come from 'rewards')", {})
    train: dict = doc("default training settings of every cell (TrainConfig)", {})
    evaluate: dict = doc("settings of the evaluation on held-out prompts (EvaluateConfig)", {})

    def validate(self) -> None:
        _check_subset("tables", self.tables, TABLES)
        _check_subset("objectives", self.objectives, OBJECTIVES)
        _check_subset("overopt_objectives", self.overopt_objectives, OBJECTIVES)
        if not self.models or not self.rewards or not self.train_seeds:
            raise CapoError("config keys 'models', 'rewards' and 'train_seeds' must not be empty")
        bad = [k for k, v in self.models.items() if not LABEL_RE.match(str(k)) or not isinstance(v, str)]
        if bad:
            raise CapoError(f"config key 'models': label '{bad[0]}' must be [A-Za-z0-9_.-]+ -> model name")
        if len(set(self.rewards)) != len(self.rewards):
            raise CapoError(f"config key 'rewards' lists a reward twice: {self.rewards}")
        if "overopt" in self.tables and self.overopt_reward not in self.rewards:
            raise CapoError(f"config key 'overopt_reward': '{self.overopt_reward}' is not in 'rewards'")
        if self.soup not in SOUPS:
            raise CapoError(f"config key 'soup' must be one of {', '.join(SOUPS)}, got '{self.soup}'")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise CapoError(f"config key 'torch_threads' must be >= 1, got {self.torch_threads}")
        if self.overopt_every < 1 or (self.overopt_steps is not None and self.overopt_steps < 1):
            raise CapoError("config keys 'overopt_every' and 'overopt_steps' must be >= 1")
        for item in self.key_cells:
            parse_key_cell(item)
        for item in self.weightings:
            parse_weighting(item)
        self._validate_sweep()
        for section, keys in RESERVED.items():
            given = [k for k in keys if k in (getattr(self, section) or {})]
            if given:
                raise CapoError(f"config key '{section}.{given[0]}' is set by the experiment; remove it")


    def _validate_sweep(self) -> None:
        from capo.experiments.sweep import CRITERIA

        _check_subset("sweep_betas", list(self.sweep_betas), OBJECTIVES)
        if self.sweep_rule not in ("frs", "sum"):
            raise CapoError(f"config key 'sweep_rule' must be frs or sum, got '{self.sweep_rule}'")
        if self.criterion not in CRITERIA:
            raise CapoError(f"config key 'criterion': unknown '{self.criterion}' "
                            f"(known: {', '.join(CRITERIA)})")
        grids = [("sweep_betas", v) for v in self.sweep_betas.values()]
        for key, values in [*grids, ("sweep_learning_rates", self.sweep_learning_rates)]:
            if not isinstance(values, list) or not all(_positive(v) for v in values):
                raise CapoError(f"config key '{key}' must list positive numbers, got {values}")
        for model, per_objective in self.hyper.items():
            if model not in self.models or not isinstance(per_objective, dict):
                raise CapoError(f"config key 'hyper': '{model}' is not a model label mapping to objectives")
            _check_subset(f"hyper.{model}", list(per_objective), OBJECTIVES)
            for objective, values in per_objective.items():
                where = f"hyper.{model}.{objective}"
                if not isinstance(values, dict) or not values:
                    raise CapoError(f"config key '{where}' must map beta / learning_rate to numbers")
                _check_subset(where, list(values), tuple(HYPER_KEYS))
                if not all(_positive(v) for v in values.values()):
                    raise CapoError(f"config key '{where}' must hold positive numbers, got {values}")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _check_subset(key: str, values: list[str], known: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in known]
    if bad:
        raise CapoError(f"config key '{key}': unknown '{bad[0]}' (known: {', '.join(known)})")


def parse_key_cell(item: str) -> tuple[str, str]:
    """``capo-frs`` -> ("capo", "frs"): an objective and a Table 2 method."""
    objective, _, method = item.partition("-")
    if objective not in OBJECTIVES or method.upper() not in METHODS:
        raise CapoError(f"config key 'key_cells': '{item}' is not OBJECTIVE-METHOD "
                        f"(objectives {', '.join(OBJECTIVES)}; methods {', '.join(METHODS).lower()})")
    return objective, METHODS[method.upper()]


def parse_weighting(item: str) -> tuple[str, float | None]:
    """``constant`` -> ("constant", None); ``sigmoid:1.5`` -> ("sigmoid", 1.5)."""
    name, _, bias = item.partition(":")
    try:
        if name == "constant" and not bias:
            return "constant", None
        if name == "sigmoid" and bias:
            return "sigmoid", float(bias)
    except ValueError:
        pass
    raise CapoError(f"config key 'weightings': '{item}' is not 'constant' or 'sigmoid:BIAS'")


def weighting_label(weighting: str, bias: float | None) -> str:
    return "constant" if weighting == "constant" else f"sigmoid (b = {bias:g})"


@dataclass(frozen=True)
class CellRef:
    """The model (and its evaluation) of cell ``cell`` ("MODEL/NAME") after ``step`` training steps."""

    cell: str
    step: int


@dataclass(frozen=True)
class Cell:
    """One training (rule best_worst | sum | frs) or one soup of trained cells (rule soup)."""

    model: str
    objective: str
    rule: str
    reward: str | None
    weighting: str
    bias: float | None
    seed: int
    steps: int
    every: int = 0  # keep a snapshot every K steps (0: only the final model)
    members: tuple[CellRef, ...] = ()  # soup: the merged models
    beta: float | None = None  # None: the train section's
    lr: float | None = None  # learning rate; None: the train section's

    @property
    def name(self) -> str:
        pairs = f"bw.{self.reward}" if self.rule == "best_worst" else self.rule
        weight = "const" if self.weighting == "constant" else f"sig{self.bias:g}"
        own = "".join(f"-{tag}{v:g}" for tag, v in (("b", self.beta), ("lr", self.lr)) if v is not None)
        return f"{self.objective}-{pairs}-{weight}{own}-s{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"

    @property
    def trained(self) -> bool:
        return self.rule != "soup"

    def snapshot_steps(self) -> list[int]:
        """Steps with a saved model: every K-th step, and the last."""
        every = list(range(self.every, self.steps, self.every)) if self.every else []
        return [*every, self.steps]

    def ref(self, step: int | None = None) -> CellRef:
        return CellRef(self.key, self.steps if step is None else step)


@dataclass(frozen=True)
class Entry:
    """One table entry: the cells (one per training seed) behind row ``row``, column group ``column``."""

    table: str
    model: str
    row: str
    column: str
    refs: tuple[CellRef, ...]


@dataclass
class Plan:
    """The cells to run (trained cells before soups, models in order) and the table entries."""

    cells: dict[str, Cell] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)

    def add(self, cell: Cell) -> Cell:
        """Add ``cell``; the same training asked twice is one cell (longest steps, snapshots kept)."""
        old = self.cells.get(cell.key)
        if old is not None:
            cell = dataclasses.replace(old, steps=max(old.steps, cell.steps),
                                       every=max(old.every, cell.every))
        self.cells[cell.key] = cell
        return cell

    def ordered(self) -> list[Cell]:
        models = list(dict.fromkeys(c.model for c in self.cells.values()))
        return [c for m in models for trained in (True, False) for c in self.cells.values()
                if c.model == m and c.trained == trained]

    def entries_of(self, table: str, model: str) -> list[Entry]:
        return [e for e in self.entries if e.table == table and e.model == model]


@dataclass
class _Expander:
    """Adds the cells and entries of each table for one base model."""

    cfg: ExperimentConfig
    plan: Plan
    model: str
    weighting: str  # Tables 1 and 2 (and overopt) use the train section's weighting
    bias: float | None
    steps: int

    def cell(self, objective: str, rule: str, reward: str | None = None, seed: int = 0,
             steps: int | None = None, every: int = 0, weighting: tuple[str, float | None] | None = None,
             members: tuple[CellRef, ...] = (), hyper: dict[str, float] | None = None) -> Cell:
        """The cell (added to the plan); training values from ``hyper``, else cfg.hyper[model][objective]."""
        w, b = weighting or (self.weighting, self.bias)
        own = hyper if hyper is not None else self.cfg.hyper.get(self.model, {}).get(objective, {})
        values = {HYPER_KEYS[k]: float(v) for k, v in own.items()}
        cell = Cell(self.model, objective, rule, reward, w, b, seed, steps or self.steps, every, members,
                    **values)
        return self.plan.add(cell)

    def entry(self, table: str, row: str, column: str, refs: list[CellRef]) -> None:
        self.plan.entries.append(Entry(table, self.model, row, column, tuple(refs)))

    def table1(self) -> None:
        """Objective x reward, best/worst pairs on that reward."""
        for obj in self.cfg.objectives:
            for reward in self.cfg.rewards:
                self.entry("table1", obj, reward, [self.cell(obj, "best_worst", reward, s).ref(self.steps)
                                                   for s in self.cfg.train_seeds])

    def table2(self) -> None:
        """Objective x {SUM, SOUP, FRS}; the key cells with key_seeds; SOUP merges Table 1 models."""
        keys = {parse_key_cell(k) for k in self.cfg.key_cells}
        for obj in self.cfg.objectives:
            for method, rule in METHODS.items():
                seeds = self.cfg.key_seeds if (obj, rule) in keys else self.cfg.train_seeds
                refs = [self.cell(obj, rule, None, s, members=self.members(obj, rule, s)).ref(self.steps)
                        for s in seeds]
                self.entry("table2", obj, method, refs)

    def members(self, objective: str, rule: str, seed: int) -> tuple[CellRef, ...]:
        if rule != "soup":
            return ()
        return tuple(self.cell(objective, "best_worst", r, seed).ref(self.steps) for r in self.cfg.rewards)

    def sweep(self) -> None:
        """Row = objective, column = "beta=B[ lr=L]": ``sweep_betas`` x ``sweep_learning_rates``."""
        for obj, betas in self.cfg.sweep_betas.items():
            for beta in betas:
                for lr in self.cfg.sweep_learning_rates or [None]:
                    hyper = {"beta": beta} | ({"learning_rate": lr} if lr is not None else {})
                    refs = [self.cell(obj, self.cfg.sweep_rule, None, s, hyper=hyper).ref(self.steps)
                            for s in self.cfg.train_seeds]
                    column = f"beta={beta:g}" + (f" lr={lr:g}" if lr is not None else "")
                    self.entry("sweep", obj, column, refs)

    def table5(self) -> None:
        """CaPO + FRS under each loss weighting."""
        for item in self.cfg.weightings:
            w = parse_weighting(item)
            refs = [self.cell("capo", "frs", None, s, weighting=w).ref(self.steps)
                    for s in self.cfg.train_seeds]
            self.entry("table5", weighting_label(*w), "", refs)

    def overopt(self) -> None:
        """Row = step (every K up to overopt_steps), column = objective; best/worst on one reward."""
        n, every = self.cfg.overopt_steps or self.steps, self.cfg.overopt_every
        for obj in self.cfg.overopt_objectives:
            cells = [self.cell(obj, "best_worst", self.cfg.overopt_reward, s, n, every)
                     for s in self.cfg.train_seeds]
            for step in cells[0].snapshot_steps():
                self.entry("overopt", str(step), obj, [c.ref(step) for c in cells])


#: table -> the expander method adding its cells and entries
BUILDERS = {"table1": _Expander.table1, "table2": _Expander.table2, "table5": _Expander.table5,
            "overopt": _Expander.overopt, "sweep": _Expander.sweep}


def expand(cfg: ExperimentConfig, train: Any) -> Plan:
    """All cells and table entries of ``cfg``; ``train`` is the resolved default TrainConfig
    (its weighting, sigmoid_bias and max_steps are the defaults of Tables 1 and 2)."""
    plan = Plan()
    bias = None if train.weighting == "constant" else train.sigmoid_bias
    for model in cfg.models:
        expander = _Expander(cfg, plan, model, train.weighting, bias, train.max_steps)
        for table in (t for t in TABLES if t in cfg.tables):
            BUILDERS[table](expander)
    check_refs(plan)
    return plan


def check_refs(plan: Plan) -> None:
    """Every referenced step must be a saved snapshot of its cell."""
    for entry in plan.entries:
        for ref in entry.refs:
            cell = plan.cells[ref.cell]
            if ref.step not in cell.snapshot_steps():
                raise CapoError(f"cell {ref.cell} keeps models at steps {cell.snapshot_steps()} but "
                                f"{entry.table} needs step {ref.step}: make overopt_every divide "
                                "train.max_steps")
    for cell in plan.cells.values():
        for ref in cell.members:
            if ref.step not in plan.cells[ref.cell].snapshot_steps():
                raise CapoError(f"soup {cell.key} needs step {ref.step} of {ref.cell}, which is not kept")


def load_experiment(path: str, sets: list[str] | None = None, out: str | None = None) -> ExperimentConfig:
    """The experiment config of YAML file ``path`` with ``KEY=VALUE`` / ``SECTION.KEY=VALUE`` overrides."""
    from capo.pipeline.run import apply_overrides

    data = apply_overrides(load_yaml(path), list(sets or []))
    if out is not None:
        data["out"] = out
    return from_dict(ExperimentConfig, data, source=str(path))


def plan_to_json(plan: Plan) -> dict[str, Any]:
    return {"cells": [dataclasses.asdict(c) for c in plan.ordered()],
            "entries": [dataclasses.asdict(e) for e in plan.entries]}


def plan_from_json(data: dict[str, Any]) -> Plan:
    """Inverse of ``plan_to_json``."""
    refs = lambda items: tuple(CellRef(**r) for r in items)  # noqa: E731
    plan = Plan()
    for c in data["cells"]:
        cell = Cell(**{**c, "members": refs(c["members"])})
        plan.cells[cell.key] = cell
    plan.entries = [Entry(**{**e, "refs": refs(e["refs"])}) for e in data["entries"]]
    return plan


@dataclass(frozen=True)
class Layout:
    """Paths of an experiment directory::

        experiment.yaml   resolved config (the experiment and every stage section)
        plan.json         the cells and the table entries
        timings.json      seconds of every phase that did work; the wall time of the last invocation
        data/MODEL/       data root: one run directory with generate, score and calibrate
        data/MODEL/eval-base/   the base model's held-out images and scores (shared by every cell)
        cells/MODEL/NAME/ one cell: a run directory whose read-only inputs link to the data root
        cells/MODEL/NAME/snapshots/step-K/   model/ and eval/ of an intermediate step
        tables/           tables.md, tables.json and one .md/.json per table
    """

    root: Path

    config_path = property(lambda self: self.root / "experiment.yaml")
    plan_path = property(lambda self: self.root / "plan.json")
    timings_path = property(lambda self: self.root / "timings.json")
    tables_dir = property(lambda self: self.root / "tables")

    def data(self, model: str) -> Path:
        return self.root / "data" / model

    def base_eval(self, model: str) -> Path:
        return self.data(model) / "eval-base"

    def cell(self, key: str) -> Path:
        return self.root / "cells" / key

    def at(self, cell: Cell, step: int) -> Path:
        """Directory holding model/ and eval/ of ``cell`` after ``step`` training steps."""
        root = self.cell(cell.key)
        return root if step == cell.steps else root / "snapshots" / f"step-{step}"

    def ref(self, plan: Plan, ref: CellRef) -> Path:
        return self.at(plan.cells[ref.cell], ref.step)

    def load_plan(self) -> Plan:
        if not self.plan_path.is_file():
            raise CapoError("not an experiment directory (no plan.json); run `capo experiment` first",
                            path=str(self.plan_path))
        return plan_from_json(json.loads(self.plan_path.read_text()))
