"""kill -9 at seeded points of ``capo run`` (inside generate, score and train, and at random
moments), then a rerun of the same command: the final outputs equal an uninterrupted run's, byte
for byte, and ``capo verify`` finds nothing wrong (docs/failures.md)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from capo.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CONFIG = {"threads": 1,
          "generate": {"prompts": "shapes:train", "num_prompts": 6, "samples_per_prompt": 3, "steps": 2,
                       "chunk_size": 1},
          "score": {"reward": ["shapes-alignment", "shapes-aesthetic"]},
          "select": {"rule": "frs"},
          "train": {"max_steps": 4, "batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 2,
                    "log_with": "none", "loader_workers": 0},
          "evaluate": {"num_prompts": 2, "seeds": 1, "n_boot": 20, "grid_prompts": 1}}
#: files that record how a run went (time, resumed_from, resume flag), not what it made
HISTORY = ("config.yaml", "model/train_summary.json", "model/manifest.json")
SKIP_DIRS = ("logs", "checkpoints", "trainset")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The tiny model, the config file and an uninterrupted run."""
    from capo.models.shapes import build_shapes_model

    root = tmp_path_factory.mktemp("crash")
    torch.manual_seed(0)
    build_shapes_model("vp", size="tiny").save_pretrained(str(root / "tiny"))
    generate = {**CONFIG["generate"], "model": str(root / "tiny")}
    config = {**CONFIG, "run": str(root / "unused"), "generate": generate}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    proc = capo_run(root / "tiny.yaml", root / "whole")
    assert proc.wait(timeout=900) == 0, log(root / "whole")
    return {"config": root / "tiny.yaml", "whole": root / "whole"}


def capo_run(config: Path, run: Path) -> subprocess.Popen:
    """``capo run`` in a subprocess; its stderr goes to RUN.log (a pipe could fill and block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "capo.cli", "run", "--config", str(config), "--run", str(run)]
    with open(f"{run}.log", "a") as err:
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)


def log(run: Path) -> str:
    return Path(f"{run}.log").read_text()[-3000:]


def outputs(run: Path) -> dict[str, str]:
    """sha256 of every file the stages make (not logs, checkpoints or the records of the history)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and str(p.relative_to(run)) not in HISTORY
            and p.relative_to(run).parts[0] not in SKIP_DIRS and p.name != ".capo.lock"}


def _files(pattern: str, n: int) -> Callable[[Path, Path], bool]:
    return lambda run, whole: len(list(run.glob(pattern))) >= n


class Progress:
    """Holds once the run has written ``fraction`` of the files an uninterrupted run ends with
    (distinct paths seen so far, temporary files included): a seeded point of the whole run,
    whatever the machine's speed."""

    def __init__(self, fraction: float):
        self.fraction, self.seen = fraction, set()

    def __call__(self, run: Path, whole: Path) -> bool:
        self.seen |= {str(p) for p in run.rglob("*") if p.is_file()}
        return len(self.seen) >= max(1, int(self.fraction * sum(p.is_file() for p in whole.rglob("*"))))


#: where to kill: when the marker holds (inside a stage, or at a seeded point of the whole run)
KILLS: dict[str, Callable[[Path, Path], bool]] = {
    "generate": _files("samples/part-*.parquet", 2),
    "score": _files("rewards/*.parts/part-*.parquet", 2),
    "train": _files("checkpoints/step-2/position.json", 1),
    "run-seed-0": Progress(random.Random(0).uniform(0.1, 0.9)),
    "run-seed-1": Progress(random.Random(1).uniform(0.1, 0.9)),
}


def kill_when(proc: subprocess.Popen, run: Path, when: Callable[[Path, Path], bool], whole: Path) -> bool:
    """SIGKILL ``proc`` when ``when(run, whole)`` holds; whether it was still running then."""
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline and not when(run, whole):
        time.sleep(0.01)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return running


@pytest.mark.parametrize("kind", KILLS)
def test_kill_9_then_rerun_equals_uninterrupted(kind, setup, tmp_path, capsys):
    run = tmp_path / "killed"
    proc = capo_run(setup["config"], run)
    assert kill_when(proc, run, KILLS[kind], setup["whole"]), f"{kind}: the run ended before the kill"
    again = capo_run(setup["config"], run)
    assert again.wait(timeout=900) == 0, log(run)
    assert outputs(run) == outputs(setup["whole"])
    assert main(["verify", "--run", str(run)]) == 0, capsys.readouterr()
