"""Interrupted training resumes to exactly the weights of an uninterrupted run (docs/design.md §7)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import config, make_run

import capo.pipeline.train as T
from capo.errors import CapoError
from capo.pipeline.checkpoint import LORA_STATE, checkpoints

SETTINGS = {"max_steps": 6, "checkpoint_every": 3, "batch_size": 2, "lr_schedule": "cosine",
            "warmup_steps": 2, "keep_checkpoints": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def copy_run(src, dst):
    skip = shutil.ignore_patterns("checkpoints", "model", "logs", "config.yaml")
    shutil.copytree(src.root, dst, ignore=skip)
    return type(src).at(dst)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, base_model):
    """An uninterrupted run of SETTINGS, trained in this process."""
    run = make_run(tmp_path_factory.mktemp("whole"), base_model, n_prompts=3)
    T.train(config(run, **SETTINGS))
    return run


def assert_same_weights(a, b):
    wa, wb = T.trained_state_dict(a.model_dir), T.trained_state_dict(b.model_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class Stop(Exception):
    """Raised right after the first checkpoint: the process 'dies' there."""


def test_stop_after_checkpoint_then_resume_equals_uninterrupted(tmp_path, whole, monkeypatch):
    cut = copy_run(whole, tmp_path / "cut")

    save = T.save_checkpoint

    def save_then_die(*args):
        save(*args)
        raise Stop

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(Stop):
        T.train(config(cut, **SETTINGS))
    monkeypatch.setattr(T, "save_checkpoint", save)
    assert sorted(checkpoints(cut)) == [3] and not cut.model_dir.exists()
    saved = sorted(p.name for p in checkpoints(cut)[3].iterdir())  # LoRA only, not the frozen base
    assert LORA_STATE in saved and not [n for n in saved if n.startswith(("model", "pytorch_model"))], saved
    with pytest.raises(CapoError, match="checkpoints exist; pass --resume"):
        T.train(config(cut, **SETTINGS))
    with pytest.raises(CapoError, match="--beta 1.0 differs from the checkpoint's 1000.0"):
        T.train(config(cut, resume=True, **{**SETTINGS, "beta": 1.0}))
    # every identity field of TrainConfig is a trajectory field (issue 13: declared once, in doc())
    for key, value in {"max_grad_norm": 0.5, "grad_accum": 2, "max_steps": 8}.items():
        with pytest.raises(CapoError, match=f"--{key.replace('_', '-')} {value} differs from the checkpoint"):
            T.train(config(cut, resume=True, **{**SETTINGS, key: value}))
    summary = T.train(config(cut, resume=True, **SETTINGS))
    assert summary["resumed_from"] == 3
    assert sorted(checkpoints(cut)) == [6]  # keep_checkpoints=1 pruned step-3
    assert_same_weights(whole, cut)
    again = T.train(config(cut, resume=True, **SETTINGS))  # a resume of a finished run keeps its metrics
    assert again["resumed_from"] == 6 and again["last_metrics"] == summary["last_metrics"] != {}
    assert_same_weights(whole, cut)


def cli(run, *extra):
    """``capo train`` with SETTINGS in a subprocess (one thread, as this process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**SETTINGS, "learning_rate": 1e-3}.items()]
    args = [sys.executable, "-m", "capo.cli", "train", "--run", str(run.root), "--log-with", "none",
            *flags, *extra]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_during_training_then_resume_equals_uninterrupted(tmp_path, whole):
    killed = copy_run(whole, tmp_path / "killed")
    proc = cli(killed)
    first = killed.checkpoints_dir / "step-3" / "position.json"
    deadline = time.time() + 300
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert running and first.is_file(), proc.stderr.read()[-2000:]
    assert not killed.model_dir.exists() and sorted(checkpoints(killed)) == [3]
    resumed = cli(killed, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert json.loads((killed.model_dir / "train_summary.json").read_text())["resumed_from"] == 3
    assert_same_weights(whole, killed)
