"""Resumable checkpoints of ``capo train``: ``RUN/checkpoints/step-K/``.

A checkpoint is accelerate's state (model weights, optimizer, LR scheduler, the RNG states of
every rank) plus ``position.json`` (the data position = step, and the config). Under LoRA only
the adapter weights are saved (``lora.safetensors``), not the frozen base: accelerate's save and
load hooks replace its model file with peft's state dict, as diffusers' LoRA scripts do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from capo.config import identity_keys
from capo.errors import CapoError
from capo.pipeline.integrity import damage, manifest
from capo.pipeline.rundir import RunDir

#: learning-rate schedules whose value at step k does not depend on max_steps: under them a resume
#: may extend max_steps (the first steps are the same trajectory); under the others it may not
SCHEDULES_WITHOUT_END = ("constant",)
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
LORA_STATE = "lora.safetensors"


def register_lora_hooks(acc: Accelerator) -> None:
    """Make ``save_state`` / ``load_state`` write and read only the LoRA weights of the model."""

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if acc.is_main_process:
            state = get_peft_model_state_dict(acc.unwrap_model(models[0]))
            save_file({k: v.detach().contiguous() for k, v in state.items()}, Path(output_dir) / LORA_STATE)
        weights.clear()  # accelerate would save the whole model (frozen base included) otherwise

    def load(models: list[Any], input_dir: str) -> None:
        model = acc.unwrap_model(models.pop())
        device = str(next(model.parameters()).device)
        set_peft_model_state_dict(model, load_file(Path(input_dir) / LORA_STATE, device=device))

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def checkpoints(run: RunDir) -> dict[int, Path]:
    """step -> complete checkpoint dir (temporary dirs of an interrupted save are ignored)."""
    found = {}
    for p in run.checkpoints_dir.glob("step-*"):
        if (m := CHECKPOINT_RE.match(p.name)) and (p / "position.json").is_file():
            found[int(m.group(1))] = p
    return found


def save_checkpoint(acc: Accelerator, run: RunDir, config: Any, step: int, metrics: dict[str, float]) -> Path:
    """RUN/checkpoints/step-K/: accelerate state and position.json (step, config, the last step's
    metrics, file manifest); written to a temp dir, then renamed; only the newest
    ``config.keep_checkpoints`` are kept."""
    root = run.checkpoints_dir
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        position = {"step": step, "config": dataclasses.asdict(config), "metrics": metrics,
                    "files": manifest(tmp)}
        (tmp / "position.json").write_text(json.dumps(position, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(checkpoints(run))[: -config.keep_checkpoints or None]:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    acc.wait_for_everyone()
    return final


def trajectory_keys(config: Any) -> tuple[str, ...]:
    """The settings a resumed training must share with its checkpoint: the config's identity
    (``doc(identity=...)`` in TrainConfig), less max_steps under a schedule that ignores it."""
    keys = identity_keys(type(config))
    if config.lr_schedule in SCHEDULES_WITHOUT_END:
        keys = tuple(k for k in keys if k != "max_steps")
    return keys


def check_trajectory(saved: dict[str, Any], config: Any, where: Path) -> None:
    """A resume with another trajectory setting is an error naming it."""
    for key in trajectory_keys(config):
        if saved["config"].get(key) != getattr(config, key):
            raise CapoError(f"--{key.replace('_', '-')} {getattr(config, key)} differs from the checkpoint's "
                            f"{saved['config'].get(key)} (it changes the training trajectory; use the "
                            "checkpoint's value or a new --run)", path=str(where))
    if saved["step"] > config.max_steps:
        raise CapoError(f"the checkpoint is at step {saved['step']}, past --max-steps {config.max_steps}",
                        path=str(where))


def read_position(ckpt: Path, full: bool = True) -> tuple[dict[str, Any] | None, str | None]:
    """(position.json, None) for an intact checkpoint, else (None, what is damaged)."""
    try:
        saved = json.loads((ckpt / "position.json").read_text())
        int(saved["step"]), saved["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, "position.json: not readable"
    problem = damage(ckpt, saved.get("files", {}), full=full)  # older checkpoints have no manifest
    return (None, problem) if problem else (saved, None)


def newest_intact(run: RunDir, warn: Any = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint whose files match their manifest; a damaged newer one is passed
    over with a warning naming it. None if there is no checkpoint; an error if none is intact."""
    found = checkpoints(run)
    for step in sorted(found, reverse=True):
        saved, problem = read_position(found[step])
        if saved is not None:
            return found[step], saved
        warn(f"capo train: warning: {found[step]}: damaged ({problem}); trying an older checkpoint")
    if found:
        raise CapoError("no intact checkpoint; remove checkpoints/ to train from the start",
                        path=str(run.checkpoints_dir))
    return None


def resume(acc: Accelerator, run: RunDir, config: Any) -> tuple[int, dict[str, float]]:
    """Load the newest intact checkpoint of RUN into ``acc`` if config.resume (else refuse to
    overwrite one); (its step, its last metrics), (0, {}) when there is none."""
    found = checkpoints(run)
    if not found:
        return 0, {}
    if not config.resume:
        raise CapoError("checkpoints exist; pass --resume to continue, or remove them",
                        path=str(found[max(found)]))
    newest, saved = newest_intact(run, warn=_warn(acc))
    check_trajectory(saved, config, newest)
    if newest != found[max(found)] and acc.is_main_process:
        print(f"capo train: resuming from {newest} (step {saved['step']})", file=sys.stderr)
    try:
        acc.load_state(str(newest))
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CapoError(f"cannot load this checkpoint ({type(e).__name__}: {str(e)[:160]}); remove it to "
                        "resume from an older one", path=str(newest)) from None
    return int(saved["step"]), dict(saved.get("metrics", {}))


def _warn(acc: Accelerator) -> Any:
    return (lambda msg: print(msg, file=sys.stderr)) if acc.is_main_process else (lambda msg: None)
