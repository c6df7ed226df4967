"""``capo train``: preference fine-tuning (DPO / IPO / CaPO, docs/design.md §2.5) of the denoiser only.

Reads the run's pairs.parquet and the latents and text embeddings cached by generate (no VAE
or text encoder is loaded), trains LoRA adapters through diffusers' PEFT integration (reference
= adapters disabled) or the full denoiser (reference = a frozen copy) under accelerate, and
writes resumable checkpoints ``checkpoints/step-K/`` and the final weights ``model/``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from diffusers.optimization import get_scheduler
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from capo.config import add_arguments, build, doc
from capo.errors import CapoError
from capo.losses import LOSSES, TARGETS
from capo.models.base import DiffusionAdapter
from capo.pipeline.checkpoint import register_lora_hooks, resume, save_checkpoint
from capo.pipeline.diagnostics import Diagnostics, step_values
from capo.pipeline.generate import load_base
from capo.pipeline.integrity import write_manifest
from capo.pipeline.preference import REFERENCES, FrozenReference, Reference, preference_step
from capo.pipeline.rundir import RunDir
from capo.pipeline.trainset import PairBatch, PairSet, StepBatches, pair_loader
from capo.pipeline.tuned import (  # noqa: F401 - apply_trained, trained_state_dict: imported from here too
    FULL_FILE,
    LIKELY_SETTINGS,
    LORA_FILE,
    apply_trained,
    check_finite_weights,
    load_weights,
    trained_state_dict,
    weights_file,
)
from capo.weighting import WEIGHTINGS, Weighting
from capo.weighting import build as build_weighting

#: our names -> diffusers.optimization schedule names (each with linear warm-up)
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
#: weighting name -> its factory's keyword arguments from the config
WEIGHTING_ARGS = {"constant": lambda c: {}, "sigmoid": lambda c: {"bias": c.sigmoid_bias}}
#: --lora-init -> peft ``init_lora_weights`` (both start with B = 0: step 0 is the base model)
LORA_INITS = {"gaussian": "gaussian", "default": True}
#: reference option -> whether p_ref is taken before init_model is loaded (True: the base model)
REFERENCE_MODELS = {"base": True, "init": False}
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "none": None}
#: mixed precision -> dtype of the frozen base weights under LoRA (trainable weights stay fp32)
WEIGHT_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class TrainConfig:
    """Settings of ``capo train`` (YAML section ``train`` or ``--flags``)."""

    run: str = doc("run directory with pairs.parquet and the generate cache", "", identity=False)
    objective: str = doc("preference objective", "capo", choices=LOSSES)
    weighting: str = doc("loss weighting f(t)", "sigmoid", choices=WEIGHTINGS)
    sigmoid_bias: float = doc("bias b of the sigmoid weighting w(lambda) = sigmoid(-lambda + b)", 1.5)
    normalize_weighting: bool = doc("divide f(t) by its mean E_t f under the model's training t "
                                    "(so beta means the same for every weighting and family; "
                                    "false: the paper's f, docs/objectives.md)", True)
    beta: float = doc("beta, the scale of the implicit reward difference", 1000.0, gt=0)
    lora: bool = doc("train LoRA adapters (false: fine-tune the full denoiser)", True)
    lora_rank: int = doc("LoRA rank r", 8, ge=1)
    lora_alpha: float = doc("LoRA alpha (update scale alpha / r)", 8.0, gt=0)
    lora_init: str = doc("LoRA init (B = 0 in both)", "gaussian", choices=LORA_INITS)
    learning_rate: float = doc("AdamW learning rate", 1e-4, gt=0)
    weight_decay: float = doc("AdamW weight decay", 0.0, ge=0)
    adam_epsilon: float = doc("AdamW epsilon", 1e-8, gt=0)
    warmup_steps: int = doc("linear learning-rate warm-up steps (<= max_steps)", 0, ge=0)
    lr_schedule: str = doc("learning-rate schedule after warm-up", "constant", choices=LR_SCHEDULES)
    max_steps: int = doc("optimizer steps", 1000, ge=1)
    batch_size: int = doc("global pairs per optimizer step (all processes, all micro-batches)", 8, ge=1)
    grad_accum: int = doc("micro-batches per optimizer step on each process", 1, ge=1)
    max_grad_norm: float = doc("clip the gradient norm to this (0: no clipping)", 1.0, ge=0)
    mixed_precision: str = doc("mixed precision (applied on CUDA only; CPU trains in fp32)", "no",
                               choices=WEIGHT_DTYPES)
    seed: int = doc("seed of the pair stream, t, noise and LoRA init", 0, ge=0)
    checkpoint_every: int = doc("save a resumable checkpoint every K steps (0: never)", 500, ge=0,
                                identity=False)
    keep_checkpoints: int = doc("number of newest checkpoints kept", 2, ge=1, identity=False)
    resume: bool = doc("continue from the newest checkpoint in RUN/checkpoints", False, identity=False)
    init_model: str | None = doc("start from this trained model (a RUN/model directory of the same base "
                                 "and LoRA settings: an online round continues from the current "
                                 "weights) instead of the base", None)
    reference: str = doc("the implicit reward's reference model: base, or init (the model training "
                         "starts from: init_model)", "base", choices=REFERENCE_MODELS)
    share_noise: bool = doc("one noise for x+ and x- (as Diffusion-DPO) instead of two", False)
    draws: int = doc("K (t, noise) draws per pair; the loss is of the pair's mean margin over the "
                     "K draws (less variance in beta x margin, K times the compute)", 1, ge=1)
    t_min: float | None = doc("override the smallest training t of the schedule (< t_max)", None, ge=0)
    t_max: float | None = doc("override the largest training t of the schedule (> t_min)", None, ge=0)
    log_with: str = doc("metrics tracker", "tensorboard", choices=TRACKERS, identity=False)
    gradient_checkpointing: bool = doc("recompute activations in backward to save memory", False)
    loader_workers: int = doc("DataLoader processes assembling the pairs (0: the training process)", 2,
                              ge=0, identity=False)
    loader_prefetch: int = doc("batches each loader worker keeps ready", 2, ge=1, identity=False)

    def validate(self) -> None:
        """Cross-field checks (each field's own range is declared in ``doc()`` above)."""
        if not self.run:
            raise CapoError("train: --run is required")
        if self.warmup_steps > self.max_steps:
            raise CapoError(f"config key 'warmup_steps' ({self.warmup_steps}) must be <= max_steps "
                            f"({self.max_steps})")
        if self.t_min is not None and self.t_max is not None and self.t_min >= self.t_max:
            raise CapoError(f"config key 't_min' ({self.t_min}) must be < t_max ({self.t_max})")
        if self.log_with == "wandb" and importlib.util.find_spec("wandb") is None:
            raise CapoError("train: log_with 'wandb' but wandb is not installed")


@dataclass
class Trainer:
    """What ``setup`` builds; ``policy`` is the prepared (possibly DDP-wrapped) denoiser."""

    config: TrainConfig
    run: RunDir
    accelerator: Accelerator
    adapter: DiffusionAdapter
    policy: nn.Module
    reference: Reference
    optimizer: Any
    scheduler: Any
    data: PairSet
    params: list[nn.Parameter]
    weighting: Weighting  # f(t), divided by weight_mean when config.normalize_weighting
    weight_mean: float  # E_t f(t) of the un-normalised f under the training t-distribution
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # kept in checkpoints


def setup(config: TrainConfig) -> Trainer:
    """Accelerator, cached pairs, denoiser-only adapter (+ LoRA), AdamW, LR schedule, prepare."""
    run = RunDir.at(config.run)
    precision = config.mixed_precision if torch.cuda.is_available() else "no"
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                      log_with=TRACKERS[config.log_with], project_dir=str(run.root / "logs"),
                      step_scheduler_with_optimizer=False)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise CapoError("train: DeepSpeed is not supported (its engine steps and accumulates by itself); "
                        "use DDP, or FSDP for full fine-tuning (docs/scaling.md)")
    if config.batch_size % (acc.num_processes * config.grad_accum):
        raise CapoError(f"train: batch_size {config.batch_size} does not split into {acc.num_processes} "
                        f"processes x {config.grad_accum} micro-batches")
    with acc.main_process_first():  # the main process builds RUN/trainset/ if missing, the others open it
        data = PairSet.from_run(run)
    adapter = load_base(run.read_base_model(), acc.device, WEIGHT_DTYPES[precision if config.lora else "no"],
                        load_text_encoders=False, load_vae=False)
    adapter.schedule.t_min = config.t_min if config.t_min is not None else adapter.schedule.t_min
    adapter.schedule.t_max = config.t_max if config.t_max is not None else adapter.schedule.t_max
    weighting, weight_mean = build_weighting(config.weighting, adapter.schedule, config.normalize_weighting,
                                             **WEIGHTING_ARGS[config.weighting](config))
    acc.print(f"train: weighting {config.weighting}: E_t f(t) = {weight_mean:.6g} under the training t; "
              + ("f is divided by it" if config.normalize_weighting else "not normalised (paper form)"))
    denoiser = adapter.denoiser.requires_grad_(not config.lora)
    torch.manual_seed(config.seed)  # the LoRA init, identical on every process
    if config.lora:
        denoiser.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                        init_lora_weights=LORA_INITS[config.lora_init],
                                        target_modules=list(adapter.lora_targets)))
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    reference = start_from(config, denoiser)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:  # trainable weights in fp32; a frozen LoRA base may stay in bf16/fp16
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  eps=config.adam_epsilon)
    scheduler = get_scheduler(LR_SCHEDULES[config.lr_schedule], optimizer,
                              num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps)
    if config.lora:
        register_lora_hooks(acc)  # checkpoints hold the adapters, not the frozen base
    policy, optimizer, scheduler = acc.prepare(denoiser, optimizer, scheduler)
    params = [p for p in policy.parameters() if p.requires_grad]  # FSDP replaces the parameters
    return Trainer(config, run, acc, adapter, policy, reference, optimizer, scheduler, data, params,
                   weighting, weight_mean)


def start_from(config: TrainConfig, denoiser: nn.Module) -> Reference:
    """Load ``config.init_model`` (if any) into the denoiser (its LoRA adapters, or the full
    weights) and return the reference p_ref: the base (adapters disabled, or a frozen copy taken
    before the load) or, with reference 'init', a frozen copy of the model training starts from."""
    if config.init_model is None:
        return REFERENCES[config.lora](denoiser)
    before = REFERENCES[config.lora](denoiser) if REFERENCE_MODELS[config.reference] else None
    weights = weights_file(config.init_model)
    if weights.name != (LORA_FILE if config.lora else FULL_FILE):
        raise CapoError(f"init_model holds {weights.name}, but this training has lora={config.lora}",
                        path=config.init_model)
    state = load_weights(weights, str(next(denoiser.parameters()).device))
    if config.lora:
        result = set_peft_model_state_dict(denoiser, state)
        if getattr(result, "unexpected_keys", None):
            raise CapoError(f"LoRA key '{result.unexpected_keys[0]}' does not fit this training's LoRA "
                            "settings", path=str(weights))
    else:
        denoiser.load_state_dict(state)
    return before if before is not None else FrozenReference(denoiser)


def step_batches(tr: Trainer) -> StepBatches:
    """This rank's share of every global batch (the pair stream of ``cfg.seed``)."""
    cfg, acc = tr.config, tr.accelerator
    return StepBatches(tr.data, cfg.seed, cfg.batch_size, acc.process_index, acc.num_processes,
                       tr.adapter.schedule.sample_t, cfg.share_noise, cfg.draws)


def optimizer_step(tr: Trainer, step: int, batch: PairBatch | None = None) -> dict[str, float]:
    """One optimizer step on global batch ``step``: this rank's pairs (``batch``, else drawn here)
    in grad_accum micro-batches; DDP averages gradients over ranks. Returns metrics averaged over
    all pairs of the step."""
    cfg, acc = tr.config, tr.accelerator
    local = (batch if batch is not None else step_batches(tr)[step]).to(acc.device)
    totals: dict[str, torch.Tensor] = {}
    for m, micro in enumerate(local.split(cfg.grad_accum)):
        with nullcontext() if m == cfg.grad_accum - 1 else acc.no_sync(tr.policy):
            with acc.autocast():
                loss, metrics = preference_step(tr.adapter, tr.policy, tr.reference, micro, tr.weighting,
                                                LOSSES[cfg.objective], cfg.beta, TARGETS[cfg.objective])
            acc.backward(loss.mean() / cfg.grad_accum)  # the mean over pairs, never a loss of a mean
        totals = {k: totals.get(k, 0) + v / cfg.grad_accum for k, v in metrics.items()}
    grad_norm = acc.clip_grad_norm_(tr.params, cfg.max_grad_norm or math.inf)
    lr = tr.scheduler.get_last_lr()[0]
    reduced = acc.reduce(torch.stack(list(totals.values())), "mean").tolist()
    metrics = {**step_values(dict(zip(totals, reduced, strict=True)), float(grad_norm), cfg.max_grad_norm),
               "grad_norm": float(grad_norm), "lr": lr}
    check_finite_step(step, metrics)  # before the update: the weights stay finite
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return metrics


def check_finite_step(step: int, metrics: dict[str, float]) -> None:
    """A non-finite loss or gradient norm stops training before the update, naming the step."""
    for key in ("loss", "grad_norm"):
        if not math.isfinite(metrics[key]):
            raise CapoError(f"train: step {step + 1}: {key} is {metrics[key]}; nothing was updated or "
                            f"saved at this step (check {LIKELY_SETTINGS})")


def save_model(tr: Trainer, summary: dict[str, Any]) -> None:
    """RUN/model/: LoRA as peft adapter_model.safetensors + adapter_config.json, or the full
    denoiser.safetensors; plus train_summary.json. Written to a temp dir, then renamed."""
    acc = tr.accelerator
    acc.wait_for_everyone()
    state = acc.get_state_dict(tr.policy)  # every rank takes part: FSDP gathers the shards here
    if acc.is_main_process:
        denoiser = acc.unwrap_model(tr.policy)
        final = tr.run.model_dir
        tmp = final.with_name(".model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lora = get_peft_model_state_dict(denoiser, state_dict=state) if tr.config.lora else None
        weights = _contiguous(state if lora is None else lora)
        check_finite_weights(weights, str(final))
        save_file(weights, tmp / (LORA_FILE if tr.config.lora else FULL_FILE))
        if tr.config.lora:
            denoiser.peft_config["default"].save_pretrained(str(tmp))
            _sort_targets(tmp / "adapter_config.json")
        # the summary holds the config: the model and the record describing it appear in one rename
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=1))
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        tr.run.save_config("train", dataclasses.asdict(tr.config))
    acc.wait_for_everyone()


def train(config: TrainConfig) -> dict[str, Any]:
    """Run the recipe (resuming if asked); returns the summary written to model/train_summary.json."""
    tr = setup(config)
    acc, began = tr.accelerator, time.time()
    start, tr.last_metrics = resume(acc, tr.run, config)
    acc.init_trackers("capo-train", config={k: v for k, v in dataclasses.asdict(config).items()
                                            if v is not None})
    metrics = dict(tr.last_metrics)  # a resume at max_steps keeps the checkpoint's last metrics
    diagnostics = Diagnostics(config.objective, config.beta, config.max_steps, config.warmup_steps)
    bar = tqdm(total=config.max_steps, initial=start, desc="train", disable=not acc.is_local_main_process)
    steps = range(start, config.max_steps)
    loader = pair_loader(step_batches(tr), steps, config.loader_workers, config.loader_prefetch,
                         pin_memory=acc.device.type == "cuda")
    for step, batch in zip(steps, loader, strict=True):
        metrics = tr.last_metrics = optimizer_step(tr, step, batch)
        acc.log(metrics, step=step + 1)
        bar.update()
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", acc=f"{metrics['implicit_acc']:.2f}")
        diagnostics.record(metrics)
        if (warning := diagnostics.check()) and acc.is_main_process:
            tqdm.write(f"capo train: {warning}", file=sys.stderr)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(acc, tr.run, config, step + 1, tr.last_metrics)
    bar.close()
    summary = {"steps": config.max_steps, "resumed_from": start, "processes": acc.num_processes,
               "seconds": round(time.time() - began, 3), "last_metrics": metrics,
               "weight_mean": tr.weight_mean, "normalize_weighting": config.normalize_weighting,
               "diagnostics": diagnostics.summary(),
               "config": dataclasses.asdict(config), "base_model": tr.run.read_base_model()}
    save_model(tr, summary)
    for tracker in acc.trackers:  # not end_training(): it ends the process group `capo run` goes on with
        tracker.finish()
    return summary


def _sort_targets(path: Path) -> None:
    """peft writes target_modules from a set (its order changes from process to process): sorted,
    the same training writes the same bytes."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def register(subparsers: Any) -> None:
    """``capo train --run DIR [--config FILE] [--objective capo ...]``."""
    p = subparsers.add_parser("train", help="preference fine-tuning (DPO / IPO / CaPO) on the run's pairs")
    p.add_argument("--config", default=None, help="YAML file whose 'train' section sets the defaults")
    add_arguments(p, TrainConfig)
    p.add_argument("--run-dir", dest="run", default=None, metavar="DIR",
                   help="the same as --run (torchrun takes --run for its own --run-path)")
    p.set_defaults(func=lambda args: train(build(TrainConfig, args, args.config, section="train")))


if __name__ == "__main__":
    from capo.cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))
