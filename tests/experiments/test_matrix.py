"""Experiment matrix: config validation, cell expansion (dedup, seeds, soups, snapshots), plan JSON,
layout paths, the shipped configs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo.config import from_dict
from capo.errors import CapoError
from capo.experiments.matrix import (
    TABLES,
    Cell,
    CellRef,
    ExperimentConfig,
    Layout,
    expand,
    load_experiment,
    parse_key_cell,
    parse_weighting,
    plan_from_json,
    plan_to_json,
)

TRAIN = SimpleNamespace(weighting="sigmoid", sigmoid_bias=1.5, max_steps=300, lr_schedule="constant")
REWARDS = ["shapes-alignment", "shapes-aesthetic", "shapes-preference"]


def config(**kw) -> ExperimentConfig:
    return from_dict(ExperimentConfig, kw)


def test_default_matrix_counts_and_sharing():
    plan = expand(config(), TRAIN)
    for model in ("vp", "flow"):
        cells = [c for c in plan.cells.values() if c.model == model]
        # Table 1: 3 x 3; Table 2: SUM/FRS x 3 objectives + 2 extra seeds x 3 key cells; Table 5: 3 new
        # (sigmoid 1.5 is Table 2's CaPO-FRS seed 0); over-optimisation reuses Table 1's cells.
        assert sum(c.trained for c in cells) == 9 + 6 + 6 + 3
        assert sum(not c.trained for c in cells) == 3
    t5 = {e.row: e.refs for e in plan.entries_of("table5", "vp")}
    t2 = {(e.row, e.column): e.refs for e in plan.entries_of("table2", "vp")}
    assert t5["sigmoid (b = 1.5)"] == t2[("capo", "FRS")][:1] == (CellRef("vp/capo-frs-sig1.5-s0", 300),)
    assert list(t5) == ["constant", "sigmoid (b = 1)", "sigmoid (b = 1.5)", "sigmoid (b = 2)"]
    assert [len(t2[k]) for k in [("capo", "FRS"), ("dpo", "FRS"), ("capo", "SUM"), ("ipo", "FRS"),
                                 ("dpo", "SOUP")]] == [3, 3, 3, 1, 1]


def test_overopt_cells_are_table1_cells_with_snapshots():
    plan = expand(config(overopt_steps=600, overopt_every=100), TRAIN)
    cell = plan.cells["vp/capo-bw.shapes-preference-sig1.5-s0"]
    assert (cell.steps, cell.every) == (600, 100)
    assert cell.snapshot_steps() == [100, 200, 300, 400, 500, 600]
    t1 = {(e.row, e.column): e.refs for e in plan.entries_of("table1", "vp")}
    assert t1[("capo", "shapes-preference")] == (CellRef(cell.key, 300),)  # Table 1 reads the snapshot
    assert plan.cells["vp/ipo-bw.shapes-preference-sig1.5-s0"].every == 0  # not an over-opt objective
    steps = [e.row for e in plan.entries_of("overopt", "vp") if e.column == "dpo"]
    assert steps == ["100", "200", "300", "400", "500", "600"]
    layout = Layout(Path("/x"))
    assert layout.at(cell, 600) == Path("/x/cells/vp/capo-bw.shapes-preference-sig1.5-s0")
    assert layout.at(cell, 300) == Path("/x/cells/vp/capo-bw.shapes-preference-sig1.5-s0/snapshots/step-300")


def test_snapshot_steps_must_hold_table1_step():
    with pytest.raises(CapoError, match="table1 needs step 300: make overopt_every divide train.max_steps"):
        expand(config(overopt_steps=600, overopt_every=70), TRAIN)


def test_soup_members_are_the_single_reward_cells():
    plan = expand(config(tables=["table2"], train_seeds=[3]), TRAIN)
    soup = plan.cells["flow/dpo-soup-sig1.5-s3"]
    assert not soup.trained
    assert soup.members == tuple(CellRef(f"flow/dpo-bw.{r}-sig1.5-s3", 300) for r in REWARDS)
    assert all(m.cell in plan.cells for m in soup.members)
    order = [c.trained for c in plan.ordered() if c.model == "flow"]
    assert order == sorted(order, reverse=True)  # trained cells first, then the soups


def test_constant_weighting_and_names():
    plan = expand(config(tables=["table5"], weightings=["constant"]),
                  SimpleNamespace(weighting="constant", sigmoid_bias=2.0, max_steps=10))
    assert list(plan.cells) == ["vp/capo-frs-const-s0", "flow/capo-frs-const-s0"]
    assert plan.cells["vp/capo-frs-const-s0"].bias is None


def test_hyper_gives_each_objective_its_own_values_and_names():
    cfg = config(tables=["table2"], objectives=["capo", "dpo"], key_cells=[],
                 hyper={"vp": {"capo": {"beta": 100, "learning_rate": 3e-4}}})
    plan = expand(cfg, TRAIN)
    cell = plan.cells["vp/capo-frs-sig1.5-b100-lr0.0003-s0"]
    assert (cell.beta, cell.lr) == (100.0, 3e-4)
    assert plan.cells["vp/dpo-frs-sig1.5-s0"].beta is None  # the train section's
    assert plan.cells["flow/capo-frs-sig1.5-s0"].beta is None  # hyper is per model
    assert plan_from_json(plan_to_json(plan)).cells == plan.cells


def test_sweep_grid_cells_and_entries():
    cfg = config(tables=["sweep"], models={"vp": "shapes-vp"}, train_seeds=[0, 1],
                 sweep_betas={"capo": [10, 100], "dpo": [1000]}, sweep_learning_rates=[1e-4, 3e-4])
    plan = expand(cfg, TRAIN)
    assert len(plan.cells) == 3 * 2 * 2  # (2 + 1) betas x 2 lrs x 2 seeds
    entries = plan.entries_of("sweep", "vp")
    assert [(e.row, e.column) for e in entries][:2] == [("capo", "beta=10 lr=0.0001"),
                                                       ("capo", "beta=10 lr=0.0003")]
    assert all(len(e.refs) == 2 for e in entries)
    assert {plan.cells[r.cell].rule for e in entries for r in e.refs} == {"frs"}


def test_train_config_takes_the_cells_values():
    from capo.experiments.runner import train_config
    from capo.pipeline.train import TrainConfig

    template = TrainConfig(run="x", beta=1000.0, learning_rate=1e-4)
    cell = Cell("vp", "capo", "frs", None, "sigmoid", 1.5, 0, 10, beta=50.0)
    got = train_config(template, cell, "r", 10)
    assert (got.beta, got.learning_rate, got.objective) == (50.0, 1e-4, "capo")
    plain = train_config(template, Cell("vp", "dpo", "frs", None, "sigmoid", 1.5, 0, 10), "r", 10)
    assert (plain.beta, plain.learning_rate) == (1000.0, 1e-4)


@pytest.mark.parametrize("data, message", [
    ({"tables": ["table9"]}, "config key 'tables': unknown 'table9'"),
    ({"objectives": ["ppo"]}, "config key 'objectives': unknown 'ppo'"),
    ({"key_cells": ["capo-best"]}, "'capo-best' is not OBJECTIVE-METHOD"),
    ({"weightings": ["sigmoid"]}, "'sigmoid' is not 'constant' or 'sigmoid:BIAS'"),
    ({"weightings": ["sigmoid:x"]}, "'sigmoid:x' is not"),
    ({"overopt_reward": "pickscore"}, "'pickscore' is not in 'rewards'"),
    ({"rewards": ["a", "a"]}, "lists a reward twice"),
    ({"models": {"a b": "shapes-vp"}}, "label 'a b'"),
    ({"generate": {"model": "x"}}, "'generate.model' is set by the experiment"),
    ({"train": {"objective": "dpo"}}, "'train.objective' is set by the experiment"),
    ({"soup": "ties"}, "config key 'soup'"),
    ({"overopt_every": 0}, "'overopt_every'"),
    ({"nope": 1}, "unknown config key 'nope'"),
    ({"sweep_betas": {"ppo": [1]}}, "config key 'sweep_betas': unknown 'ppo'"),
    ({"sweep_betas": {"capo": [0]}}, "'sweep_betas' must list positive numbers"),
    ({"sweep_rule": "best_worst"}, "'sweep_rule' must be frs or sum"),
    ({"criterion": "gold"}, "config key 'criterion': unknown 'gold'"),
    ({"hyper": {"xx": {"capo": {"beta": 1}}}}, "'hyper': 'xx' is not a model label"),
    ({"hyper": {"vp": {"capo": {"lr": 1}}}}, "config key 'hyper.vp.capo': unknown 'lr'"),
    ({"hyper": {"vp": {"capo": {"beta": -1}}}}, "'hyper.vp.capo' must hold positive numbers"),
])
def test_bad_config_is_one_clear_error(data, message):
    with pytest.raises(CapoError, match=message):
        config(**data)


def test_parsers():
    assert parse_key_cell("capo-frs") == ("capo", "frs")
    assert parse_key_cell("dpo-SOUP") == ("dpo", "soup")
    assert parse_weighting("constant") == ("constant", None)
    assert parse_weighting("sigmoid:2") == ("sigmoid", 2.0)


@settings(max_examples=40, deadline=None)
@given(tables=st.lists(st.sampled_from(TABLES), min_size=1, unique=True),
       objectives=st.lists(st.sampled_from(["dpo", "ipo", "capo"]), min_size=1, unique=True),
       seeds=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
       key_seeds=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
       every=st.sampled_from([1, 2, 5, 10]))
def test_every_reference_is_a_kept_model(tables, objectives, seeds, key_seeds, every):
    cfg = config(tables=tables, objectives=objectives, train_seeds=seeds, key_seeds=key_seeds,
                 overopt_every=every, rewards=REWARDS[:2], overopt_reward=REWARDS[0])
    plan = expand(cfg, SimpleNamespace(weighting="sigmoid", sigmoid_bias=1.0, max_steps=10))
    for entry in plan.entries:
        assert len(set(entry.refs)) == len(entry.refs) >= 1
        for ref in entry.refs:
            assert ref.step in plan.cells[ref.cell].snapshot_steps()
    for cell in plan.cells.values():
        assert cell.key == f"{cell.model}/{cell.name}"
        assert all(plan.cells[m.cell].trained for m in cell.members)
    assert plan_from_json(plan_to_json(plan)).cells == plan.cells
    assert plan_from_json(plan_to_json(plan)).entries == plan.entries


@pytest.mark.parametrize("name", ["experiment-shapes.yaml", "experiment-smoke.yaml"])
def test_shipped_configs_resolve(name):
    from capo.experiments.runner import config_path, resolve_stages

    path = Path(config_path(name.split("-")[1].split(".")[0]))
    assert path.name == name and path.is_file()
    cfg = load_experiment(str(path), ["train_seeds=[0, 1]"], out="elsewhere")
    assert cfg.out == "elsewhere" and cfg.train_seeds == [0, 1]
    stages = resolve_stages(cfg, str(path))
    plan = expand(cfg, stages.train)
    assert plan.cells and set(stages.generate) == set(cfg.models)
    assert all(isinstance(c, Cell) for c in plan.ordered())
