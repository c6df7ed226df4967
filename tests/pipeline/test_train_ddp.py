"""Two CPU processes (torchrun, gloo DDP) with the same global batch reach the weights of one.

Each rank takes half of every global batch and draws its pairs' t and noise from per-pair seeds,
and DDP averages the two local means, so the gradient is the one-process mean up to float
rounding. AdamW normalises each coordinate by its gradient scale, so a coordinate whose gradient
is ~0 (a rounding-level value) can move by up to ~lr either way; ``adam_epsilon`` = 1e-4 keeps
that sensitivity at the gradient's own precision, and the test also checks the weights moved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from test_train import make_run

from capo.pipeline.train import trained_state_dict

SETTINGS = {"log_with": "none", "max_steps": 3, "batch_size": 4, "checkpoint_every": 0, "learning_rate": 1e-3,
            "adam_epsilon": 1e-4, "lr_schedule": "cosine", "warmup_steps": 1}


def launch(prefix, run):
    """``capo train --config FILE``: all settings in the YAML (torchrun's own parser would take
    ``--run`` for an ambiguous prefix of its ``--run-path``)."""
    config = run.root / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {"run": str(run.root), **SETTINGS}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*prefix, "-m", "capo.cli", "train", "--config", str(config)]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one(tmp_path, base_model):
    one = make_run(tmp_path / "one", base_model, n_prompts=4)
    shutil.copytree(one.root, tmp_path / "two")
    two = type(one).at(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    procs = [launch([sys.executable], one), launch(torchrun, two)]
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read()[-3000:]
    summary_two = (two.model_dir / "train_summary.json").read_text()
    assert '"processes": 2' in summary_two
    w1, w2 = trained_state_dict(one.model_dir), trained_state_dict(two.model_dir)
    assert w1.keys() == w2.keys()
    moved = max(w1[k].abs().max().item() for k in w1 if "lora_B" in k)  # B starts at 0
    assert moved > 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
