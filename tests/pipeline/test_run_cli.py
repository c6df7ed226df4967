"""``capo run`` end to end on a tiny shapes model, resume/skip on rerun, the shipped config, --help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from capo.cli import build_parser, main
from capo.pipeline.generate import GenerateConfig
from capo.pipeline.run import STAGES, default_config, resolve

SUBCOMMANDS = ["generate", "score", "calibrate", "select", "train", "evaluate", "run"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: capo {command}" in capsys.readouterr().out


def test_all_subcommands_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(SUBCOMMANDS) <= set(sub.choices)


def test_shipped_config_resolves():
    cfg, stages = resolve(None, "somewhere", [])
    assert default_config().endswith("configs/shapes.yaml")
    assert cfg.run == "somewhere" and list(cfg.stages) == list(STAGES)
    assert isinstance(stages["generate"], GenerateConfig) and stages["generate"].model == "shapes-vp"
    assert stages["train"].run == "somewhere"
    _, over = resolve(None, None, ["generate.num_prompts=7", "select.rule=sum"])
    assert over["generate"].num_prompts == 7 and over["select"].rule == "sum"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, base_model) -> str:
    root = tmp_path_factory.mktemp("cfg")
    config = {
        "run": str(root / "unused"),
        "generate": {"model": base_model, "prompts": "shapes:train", "num_prompts": 6,
                     "samples_per_prompt": 4, "steps": 2, "chunk_size": 3},
        "score": {"reward": ["shapes-alignment", "shapes-aesthetic"]},
        "select": {"rule": "frs"},
        "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0, "log_with": "none"},
        "evaluate": {"num_prompts": 4, "seeds": 1, "n_boot": 50, "grid_prompts": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_run_end_to_end_then_resume(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["run", "--config", tiny_config, "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| Model | shapes-alignment Win (%) |" in out and "| tuned |" in out
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["rewards"]) == {"shapes-alignment", "shapes-aesthetic"} and "gold" in results
    for name in ("results.md", "grid.png", "scores.csv"):
        assert (run / "eval" / name).is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert set(STAGES) | {"run"} <= set(saved)
    assert saved["generate"]["num_prompts"] == 6 and saved["train"]["max_steps"] == 2
    # a rerun finds every stage up to date
    assert main(["run", "--config", tiny_config, "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert all(f"[capo run] {s}: up to date" in out for s in STAGES), out
    # new evaluation settings rerun evaluate only
    assert main(["run", "--config", tiny_config, "--run", str(run), "--set", "evaluate.seeds=2"]) == 0
    out = capsys.readouterr().out
    assert all(f"[capo run] {s}: up to date" in out for s in STAGES[:-1]), out
    assert "[capo run] evaluate: done" in out
    assert len((run / "eval" / "scores.csv").read_text().splitlines()) == 1 + 4 * 2
    # changing the pair rule would make the trained model stale: refused before anything is written
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["run", "--config", tiny_config, "--run", str(run), "--set", "select.rule=sum"]) == 2
    err = capsys.readouterr().err
    assert "(select: setting 'rule' changed); use a new --run" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_run_subset_of_stages(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    stages = ["generate", "score", "calibrate", "select"]
    assert main(["run", "--config", tiny_config, "--run", str(run), "--set", f"stages={stages}"]) == 0
    assert not (run / "model").exists() and (run / "pairs.parquet").is_file()
    out = capsys.readouterr().out
    assert "[capo run] select: done" in out and "train" not in out


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    argv = ["run", "--config", tiny_config, "--run", str(run), "--set", "train.checkpoint_every=1",
            "--set", "stages=[generate, score, calibrate, select, train]"]
    assert main(argv) == 0
    shutil.rmtree(run / "model")  # as if killed after the last checkpoint, before model/ was written
    assert main(argv) == 0
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 2
    assert "[capo run] train: done" in capsys.readouterr().out


@pytest.mark.slow
def test_run_under_torchrun_two_processes(tmp_path, tiny_config):
    """generate, score, train and evaluate split over 2 processes; calibrate and select run once."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "capo.cli", "run",
           "--config", tiny_config, "--run-dir", str(run), "--set", "threads=1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["part-00000-00000.parquet",
                                                                   "part-00001-00001.parquet"]
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    assert summary["processes"] == 2
    assert json.loads((run / "eval" / "results.json").read_text())["rewards"]
    for stage in STAGES:  # logged by the main process only
        assert done.stdout.count(f"[capo run] {stage}: done") == 1, done.stdout
    assert done.stdout.count("[capo run] finished") == 1 and "| tuned |" in done.stdout
