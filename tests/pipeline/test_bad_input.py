"""Bad input through the CLI: a one-line error naming file/row/key, exit code 2, and nothing
already written lost (every file's bytes compared before and after)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from capo.cli import main
from capo.rewards.base import RewardModel, register_reward


class NanReward(RewardModel):
    """NaN for the second image it sees, 0.5 otherwise."""

    name = "test-nan-cli"
    needs_prompt = False

    def score_batch(self, images, prompts):
        return np.array([np.nan if i == 1 else 0.5 for i in range(len(images))], dtype=np.float32)


register_reward("test-nan-cli", NanReward)


def snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fails(capsys, argv: list[str], match: str, root: Path) -> str:
    """Run the CLI expecting exit 2 and one error line matching ``match``; files under root unchanged."""
    before = snapshot(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1, err
    assert err[0].startswith(f"capo {argv[0]}: error: ")
    assert match in err[0], err[0]
    assert snapshot(root) == before
    return err[0]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

@pytest.fixture(scope="module")
def prompts(prompt_file) -> str:
    return prompt_file(3)  # tests/pipeline/conftest.py


def generated(tmp_path, base_model, prompts, n: int = 2) -> Path:
    run = tmp_path / f"run{n}"
    argv = ["generate", "--run", str(run), "--model", base_model, "--prompts", prompts,
            "--samples-per-prompt", str(n), "--steps", "1"]
    assert main(argv) == 0
    return run


def test_empty_and_duplicate_prompt_files(tmp_path, capsys, base_model):
    empty, dup = tmp_path / "empty.txt", tmp_path / "dup.csv"
    empty.write_text("\n  \n")
    dup.write_text("prompt\na circle\na square\na circle\n")
    run = tmp_path / "run"
    fails(capsys, ["generate", "--run", str(run), "--model", base_model, "--prompts", str(empty)],
          f"{empty}: no prompts in file", tmp_path)
    fails(capsys, ["generate", "--run", str(run), "--model", base_model, "--prompts", str(dup)],
          f"{dup}, row 4: duplicate prompt 'a circle' (first at row 2)", tmp_path)
    assert not run.exists()


def test_missing_earlier_stage(tmp_path, capsys, base_model, prompts):
    empty = tmp_path / "nothing"
    fails(capsys, ["score", "--run", str(empty), "--reward", "shapes-aesthetic"], "run `capo generate` first",
          tmp_path)
    run = generated(tmp_path, base_model, prompts)
    fails(capsys, ["calibrate", "--run", str(run)], "run `capo score` first", run)
    fails(capsys, ["select", "--run", str(run)], "run `capo calibrate` first", run)
    fails(capsys, ["evaluate", "--run", str(run)], "run `capo train` first", run)
    fails(capsys, ["train", "--run", str(run), "--max-steps", "1", "--log-with", "none"],
          "run `capo select` first", run)


def test_reward_returning_nan(tmp_path, capsys, base_model, prompts):
    run = generated(tmp_path, base_model, prompts)
    assert main(["score", "--run", str(run), "--reward", "shapes-aesthetic"]) == 0
    line = fails(capsys, ["score", "--run", str(run), "--reward", "test-nan-cli"],
                 "reward 'test-nan-cli' returned nan for prompt ", run)
    assert "sample 1" in line and "samples/part-00000-00000.parquet" in line
    assert not (run / "rewards" / "test-nan-cli.parquet").exists()
    assert (run / "samples" / "part-00000-00000.parquet").is_file()


def test_one_sample_per_prompt_is_refused_before_any_work(tmp_path, capsys, base_model, prompts):
    run = tmp_path / "run1"
    fails(capsys, ["generate", "--run", str(run), "--model", base_model, "--prompts", prompts,
                   "--samples-per-prompt", "1"], "config key 'samples_per_prompt' must be >= 2, got 1",
          tmp_path)
    assert not run.exists()


def test_config_typos_and_bad_values(tmp_path, capsys, base_model, prompts):
    run = tmp_path / "run"
    typo = tmp_path / "typo.yaml"
    typo.write_text("generate:\n  num_promts: 3\n")
    fails(capsys, ["generate", "--run", str(run), "--config", str(typo)],
          f"{typo}: unknown config key 'num_promts' for GenerateConfig", tmp_path)
    fails(capsys, ["generate", "--run", str(run), "--samples-per-prompt", "two"],
          "config key 'samples_per_prompt' expects int, got 'two'", tmp_path)
    section = tmp_path / "section.yaml"
    section.write_text("generat:\n  num_prompts: 3\n")
    fails(capsys, ["run", "--config", str(section), "--run", str(run)], "unknown config key 'generat'",
          tmp_path)
    deep = tmp_path / "deep.yaml"
    deep.write_text("train:\n  max_step: 3\n")
    fails(capsys, ["run", "--config", str(deep), "--run", str(run)], "unknown config key 'max_step'",
          tmp_path)
    fails(capsys, ["select", "--run", str(run), "--rule", "best"], "config key 'rule' must be one of",
          tmp_path)
    fails(capsys, ["score", "--run", str(run), "--reward", "nope"], "unknown reward 'nope'", tmp_path)
    assert not run.exists()


def test_existing_outputs_survive_a_failed_rerun(tmp_path, capsys, base_model, prompts):
    run = generated(tmp_path, base_model, prompts)
    assert main(["score", "--run", str(run), "--reward", "shapes-aesthetic"]) == 0
    assert main(["calibrate", "--run", str(run)]) == 0
    shutil.copy(run / "calibrated.parquet", tmp_path / "cal.parquet")
    fails(capsys, ["calibrate", "--run", str(run), "--reward", "not-scored"], "run `capo score` first", run)
    assert (run / "calibrated.parquet").read_bytes() == (tmp_path / "cal.parquet").read_bytes()
