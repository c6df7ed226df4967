"""``capo experiment`` end to end on a tiny shapes model: data generated and scored once and shared
by every cell (links, shard files untouched on rerun, one base evaluation), snapshots, the soup's
weights by hand, tables with intervals, resume, stale cells refused, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from capo.cli import main
from capo.errors import CapoError
from capo.experiments.matrix import Layout, load_experiment
from capo.experiments.runner import config_path, resolve_stages, run_experiment
from capo.soup import combine_slerp

SETS = ["rewards=[shapes-alignment, shapes-aesthetic]", "objectives=[capo]", "key_cells=[capo-frs, capo-sum]",
        "key_seeds=[0, 1]", "weightings=[constant, 'sigmoid:1.5']", "overopt_objectives=[capo]",
        "overopt_reward=shapes-alignment", "overopt_steps=4", "overopt_every=2", "train.log_with=none",
        "evaluate.grid_prompts=2", "torch_threads=1"]


def experiment(tiny: str, out, *extra: str):
    cfg = load_experiment(config_path("smoke"), [f"models={{vp: {tiny}}}", *SETS, *extra], out=str(out))
    return cfg, resolve_stages(cfg)


@pytest.fixture(scope="module")
def done(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "exp"
    cfg, stages = experiment(tiny, out)
    log: list[str] = []
    plan = run_experiment(cfg, stages, log=log.append)
    return cfg, stages, plan, Layout(out), log


def test_data_is_generated_once_and_shared(done, tiny):
    cfg, stages, plan, layout, log = done
    data = layout.data("vp")
    shards = sorted((data / "samples").glob("part-*.parquet"))
    assert len(shards) == 2  # 6 prompts in chunks of 3: generated once, for every cell
    assert sum("data/vp/generate" in line for line in log) == 1
    assert len(plan.cells) == 8  # 7 trainings (Table 5's sigmoid 1.5 is Table 2's CaPO-FRS) + 1 soup
    for cell in plan.cells.values():
        root = layout.cell(cell.key)
        for name in ("samples", "embeddings", "rewards", "calibrated.parquet", "prompts.parquet"):
            assert (root / name).is_symlink() and (root / name).resolve() == (data / name).resolve()
        assert (root / "pairs.parquet").is_file() == cell.trained
    before = {p: p.stat().st_mtime_ns for p in [*shards, data / "eval-base" / "meta.json",
                                                 *(data / "rewards").glob("*.parquet")]}
    rerun: list[str] = []
    run_experiment(cfg, stages, log=rerun.append)
    assert not [line for line in rerun if ": " in line and " s" in line.split(": ")[-1]], rerun  # no work
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_cells_share_the_base_evaluation(done):
    _, _, plan, layout, _ = done
    tables = [(layout.ref(plan, c.ref()) / "eval" / "scores.csv").read_text().splitlines() for c in
              plan.cells.values()]
    tuned_only = lambda column: "/tuned" in column or "image_msd" in column  # noqa: E731
    base_columns = [[",".join(x for i, x in enumerate(line.split(",")) if not tuned_only(head[i]))
                     for line in t] for t, head in ((t, t[0].split(",")) for t in tables)]
    assert all(b == base_columns[0] for b in base_columns)
    assert "gold/base" in tables[0][0] and "category" in tables[0][0]
    assert len(tables[0]) == 1 + 6 * 2


def test_snapshots_of_the_overoptimisation_cell(done):
    _, _, plan, layout, _ = done
    cell = plan.cells["vp/capo-bw.shapes-alignment-sig1.5-s0"]
    assert cell.snapshot_steps() == [2, 4]
    snap = layout.at(cell, 2)
    assert json.loads((snap / "model" / "train_summary.json").read_text())["steps"] == 2
    assert json.loads((layout.cell(cell.key) / "model" / "train_summary.json").read_text())["steps"] == 4
    assert (snap / "eval" / "images.parquet").is_file() and (snap / "eval" / "results.json").is_file()


def test_training_in_segments_equals_one_run(done, tmp_path):
    """The over-optimisation cell trained 0 -> 2 -> 4 (resuming) holds the weights of one 4-step run."""
    import dataclasses

    from capo.experiments.runner import LINKS, train_config
    from capo.pipeline.rundir import RunDir
    from capo.pipeline.train import train

    _, stages, plan, layout, _ = done
    cell = plan.cells["vp/capo-bw.shapes-alignment-sig1.5-s0"]
    run = RunDir.at(tmp_path / "one-run")
    run.root.mkdir()
    for name in LINKS:
        (run.root / name).symlink_to(layout.data("vp") / name)
    (run.root / "pairs.parquet").write_bytes((layout.cell(cell.key) / "pairs.parquet").read_bytes())
    train(train_config(stages.train, dataclasses.replace(cell, every=0), str(run.root), 4))
    one = load_file(run.model_dir / "adapter_model.safetensors")
    segments = load_file(layout.cell(cell.key) / "model" / "adapter_model.safetensors")
    assert one.keys() == segments.keys() and all(torch.equal(one[k], segments[k]) for k in one)


def test_soup_weights_are_the_slerp_of_the_lora_deltas(done):
    _, _, plan, layout, _ = done
    soup = plan.cells["vp/capo-soup-sig1.5-s0"]
    merged = load_file(layout.cell(soup.key) / "model" / "denoiser.safetensors")
    from capo.models.shapes import load_shapes

    spec = json.loads((layout.data("vp") / "base_model.json").read_text())
    base = load_shapes("vp", spec["path"]).denoiser.state_dict()
    members = [load_file(layout.ref(plan, m) / "model" / "adapter_model.safetensors") for m in soup.members]
    key = next(k for k in members[0] if "lora_A" in k and members[0][k].ndim == 2)  # a linear layer
    weight = key.replace(".lora_A.weight", ".weight")
    scale = 2.0 / 2  # lora_alpha / r of the smoke config
    deltas = [scale * m[key.replace("lora_A", "lora_B")] @ m[key] for m in members]  # τ_i = s B_i A_i
    assert torch.allclose(merged[weight] - base[weight], combine_slerp(deltas, [0.5, 0.5]), atol=1e-6)
    untouched = next(k for k in base if k not in {x.replace(".lora_A.weight", ".weight") for x in members[0]})
    assert torch.equal(merged[untouched], base[untouched])


def test_tables_have_every_cell_with_its_interval(done):
    _, _, _, layout, _ = done
    data = json.loads((layout.tables_dir / "tables.json").read_text())
    assert list(data["tables"]) == ["table1", "table2", "key", "table5", "overopt"]
    stats = [c for t in data["tables"].values() for x in t["models"].values() for row in x["rows"]
             for c in row if isinstance(c, dict)]
    assert len(stats) > 30
    for s in stats:
        assert s["low"] <= s["value"] + 1e-9 and s["value"] <= s["high"] + 1e-9, s
    key_rows = data["tables"]["key"]["models"]["vp"]["rows"]
    assert key_rows[0][1]["seeds"] == 2 and len(key_rows[0][1]["per_seed"]) == 2
    assert key_rows[-1][0] == "CaPO / FRS − CaPO / SUM"
    md = (layout.tables_dir / "tables.md").read_text()
    assert [line for line in md.splitlines() if "| n/a" in line] == [  # only the base row's win-rates
        line for line in md.splitlines() if line.startswith("| base | - |")]
    assert "| CaPO | shapes-alignment | **" in md and "| 0 (base) |" in md
    for name in ("table1", "table2", "key", "table5", "overopt"):
        assert (layout.tables_dir / f"{name}.md").is_file() and (layout.tables_dir / f"{name}.json").is_file()


def test_changed_settings_are_refused(done, tiny):
    _, _, _, layout, _ = done
    cfg, stages = experiment(tiny, layout.root, "train.learning_rate=0.5")
    before = {p: p.read_bytes() for p in layout.root.glob("*.*")}
    with pytest.raises(CapoError, match="was run with other 'train' settings; use a new --out"):
        run_experiment(cfg, stages, log=lambda _: None)
    assert {p: p.read_bytes() for p in layout.root.glob("*.*")} == before  # nothing rewritten


def test_cli_dry_run_and_tables_only(done, tiny, capsys):
    _, _, _, layout, _ = done
    args = ["experiment", config_path("smoke"), "--out", str(layout.root), "--set", f"models={{vp: {tiny}}}"]
    for s in SETS:
        args += ["--set", s]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 cells (7 trained, 1 soups)") and "work: generated images 24" in out
    assert main([*args, "--tables-only"]) == 0
    assert "### Table 1" in capsys.readouterr().out
    assert main(["experiment", "no-such.yaml"]) == 2
