"""The model card of an export: README.md in the Hugging Face Hub format (YAML front matter, Markdown).

Front matter (huggingface_hub ``ModelCardData``): ``base_model`` (when the base is a hub id),
``library_name``, ``pipeline_tag``, ``tags``. The body says how to load the export, then what
the model was aligned to, read from the run directory: the rewards with their Bradley-Terry
scales (the metadata of rewards/NAME.parquet), the calibration (Eq. 7, ensemble over rewards),
the pair rule (config.yaml ``select``), the objective with beta, weighting, steps and LoRA rank
(model/train_summary.json), or a soup's method and members, the prompt set (config.yaml
``generate``), and the evaluation table with its intervals (eval/results.json) when there is one.
Whatever the run did not record is said to be not recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData

from capo.errors import CapoError
from capo.pipeline.evaluation import results_markdown
from capo.pipeline.rundir import RunDir
from capo.pipeline.score import read_reward_meta

NOT_RECORDED = "not recorded"
#: world -> the front matter's library_name
LIBRARIES = {"diffusers": "diffusers", "shapes": "capo"}
#: format -> (tag, base_model_relation)
RELATIONS = {"lora": ("lora", "adapter"), "merged": ("merged", "finetune")}
#: (world, format) -> how to load the export ({base}: the base model, {repo}: the export)
USAGE: dict[tuple[str, str], str] = {
    ("diffusers", "lora"): 'from diffusers import DiffusionPipeline\n\n'
                           'pipe = DiffusionPipeline.from_pretrained("{base}")\n'
                           'pipe.load_lora_weights("{repo}")\nimage = pipe("{prompt}").images[0]',
    ("diffusers", "merged"): 'from diffusers import DiffusionPipeline\n\n'
                             'pipe = DiffusionPipeline.from_pretrained("{repo}")\n'
                             'image = pipe("{prompt}").images[0]',
    ("shapes", "lora"): "# the LoRA of a shapes model, read by capo's evaluation\n"
                        "capo evaluate --run RUN --tuned {repo}",
    ("shapes", "merged"): "# a saved shapes model: sample from it, or evaluate it against its base\n"
                          "capo generate --model {repo} --run NEW_RUN --prompts shapes:heldout\n"
                          "capo evaluate --run RUN --tuned {repo}",
}
#: world -> language of the usage snippet
LANGUAGES = {"diffusers": "python", "shapes": "bash"}
#: weighting -> its parameters as the card states them
WEIGHTING_DETAILS = {"sigmoid": lambda t: f" (bias {t['sigmoid_bias']})"}
#: normalize_weighting -> how the card states it (None: a run from before the option existed)
NORMALISATION = {True: lambda s: f", divided by its mean E_t f = {_number(s.get('weight_mean'))}",
                 False: lambda s: ", not normalised (the paper's f)", None: lambda s: ""}
#: LoRA or not -> what was trained
UPDATES = {True: lambda t: (f"LoRA rank {t['lora_rank']}, alpha {t['lora_alpha']} "
                            f"(scale {t['lora_alpha'] / t['lora_rank']:g})"),
           False: lambda t: "full fine-tune of the denoiser"}
#: (world, format) -> what the export holds
CONTENTS: dict[tuple[str, str], str] = {
    ("diffusers", "lora"): "the LoRA adapter of the denoiser in diffusers' format "
                           "(pytorch_lora_weights.safetensors; its config, hence its scale alpha / r, in the "
                           "file's metadata)",
    ("diffusers", "merged"): "the whole pipeline with the tuned denoiser folded in (a LoRA fused at "
                             "its scale alpha / r); its scheduler is the sampler capo generated and "
                             "evaluated with",
    ("shapes", "lora"): "the peft LoRA adapter of the shapes UNet (adapter_model.safetensors)",
    ("shapes", "merged"): "a saved shapes model (capo_shapes.json, model.safetensors) with the tuned UNet",
}
EXAMPLE_PROMPT = "a red cube left of a blue sphere"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else NOT_RECORDED


def hub_id(spec: dict[str, Any]) -> str | None:
    """The base model's hub id; None for a built-in or a local checkpoint (recorded as absolute)."""
    path = spec.get("path")
    return None if path is None or Path(path).is_absolute() else str(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CapoError(f"invalid JSON: {e}", path=str(path)) from None


def _config(root: Path) -> dict[str, Any]:
    """config.yaml of a run directory (cells of capo experiment: plus cell.json's settings)."""
    cell = _read_json(root / "cell.json") or {}
    own = RunDir.at(root).load_config() if (root / "config.yaml").is_file() else {}
    return {**{k: v for k, v in cell.items() if isinstance(v, dict)}, **own}


def rewards_section(run: RunDir, config: dict[str, Any]) -> list[str]:
    """The rewards with their Bradley-Terry declarations and the calibration."""
    names = (config.get("calibrate") or {}).get("reward") or run.reward_names()
    if not names:
        return ["Rewards: " + NOT_RECORDED + "."]
    lines = ["| reward | Bradley-Terry scale | transform | higher is better |", "|---|---:|---|---|"]
    for name in names:
        meta = read_reward_meta(run.reward_path(name)) if run.reward_path(name).is_file() else {}
        better = {True: "yes", False: "no"}.get(meta.get("higher_is_better"), NOT_RECORDED)
        lines.append(f"| {name} | {meta.get('bt_scale', NOT_RECORDED)} | "
                     f"{meta.get('transform', NOT_RECORDED)} | {better} |")
    return lines + ["", "Calibration (Eq. 7): each reward's Bradley-Terry logit R = scale * transform(score) "
                    "becomes the expected win-rate of a sample against the other samples of its prompt; "
                    f"the ensemble is their mean over the {len(names)} reward(s)."]


def pairs_line(config: dict[str, Any]) -> str:
    select = config.get("select")
    if not select:
        return f"Pair rule: {NOT_RECORDED}."
    extra = {k: v for k, v in select.items() if k != "rule" and v not in (None, [], {})}
    return f"Pair rule: `{select['rule']}`" + (f" ({_pairs(extra)})" if extra else "") + "."


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


def objective_line(train: dict[str, Any] | None, summary: dict[str, Any]) -> str:
    """Objective, beta, weighting (and its normalisation), steps, batch, learning rate and LoRA rank
    of a training config; ``summary``: its train_summary.json (E_t f when normalised)."""
    if not train:
        return f"Objective: {NOT_RECORDED}."
    weighting = train["weighting"] + WEIGHTING_DETAILS.get(train["weighting"], lambda t: "")(train)
    weighting += NORMALISATION[train.get("normalize_weighting")](summary)
    return (f"Objective: `{train['objective']}`, beta = {train['beta']:g}, weighting {weighting}, "
            f"{train['max_steps']} steps of {train['batch_size']} pairs, learning rate "
            f"{train['learning_rate']:g}, {UPDATES[bool(train['lora'])](train)}, seed {train['seed']}.")


def training_section(model_dir: Path, config: dict[str, Any]) -> list[str]:
    """The pair rule and objective of a trained model, or a soup's method and its members'."""
    soup = _read_json(model_dir / "soup.json")
    if soup is None:
        summary = _read_json(model_dir / "train_summary.json") or {}
        train = summary.get("config") or config.get("train")
        return [f"- {pairs_line(config)}", f"- {objective_line(train, summary)}"]
    lines = [f"- Model soup (Sec. 5.2): `{soup['method']}` merge of the task vectors of "
             f"{len(soup['members'])} fine-tunes of the same base, uniform weights. Members:"]
    for member in map(Path, soup["members"]):
        summary = _read_json(member / "train_summary.json") or {}
        member_config = _config(member.parent)
        lines.append(f"  - `{member.parent.name}`: {pairs_line(member_config)} "
                     f"{objective_line(summary.get('config') or member_config.get('train'), summary)}")
    return lines


def prompts_line(config: dict[str, Any]) -> str:
    gen = config.get("generate")
    if not gen:
        return f"Prompt set: {NOT_RECORDED}."
    subset = f", a subset of {gen['num_prompts']} prompts" if gen.get("num_prompts") else ""
    steps, guidance = (gen[k] if gen.get(k) is not None else "family default" for k in ("steps", "guidance"))
    return (f"Prompt set: `{gen['prompts']}`{subset}; {gen['samples_per_prompt']} samples per prompt "
            f"from the base model (steps {steps}, guidance {guidance}, seed {gen['seed']}).")


def evaluation_section(run: RunDir, config: dict[str, Any]) -> list[str]:
    results = _read_json(run.eval_dir / "results.json")
    if results is None:
        return ["No evaluation recorded (run `capo evaluate`)."]
    ev = config.get("evaluate") or {}
    where = (f"`{ev['prompts']}` prompts, {ev['seeds']} seed(s) each, base and tuned from the same "
             f"initial noise, {ev['n_boot']} bootstrap replicates over prompts. " if ev else "")
    return [f"{where}From eval/results.json of the run:", "", results_markdown(results).strip()]


def model_card(run: RunDir, spec: dict[str, Any], model_dir: Path, fmt: str, world: str, repo: str) -> str:
    """README.md text: front matter + how to load + alignment + prompt set + evaluation."""
    config = _config(run.root)
    base = hub_id(spec)
    tag, relation = RELATIONS[fmt]
    relation = {True: "merge", False: relation}[(model_dir / "soup.json").is_file()]  # soups merge models
    data = ModelCardData(base_model=base, library_name=LIBRARIES[world], pipeline_tag="text-to-image",
                         tags=["text-to-image", "capo", "preference-optimization", spec["family"], tag],
                         base_model_relation=relation if base else None)
    usage = USAGE[(world, fmt)].format(base=base or spec.get("path") or spec["model"], repo=repo,
                                       prompt=EXAMPLE_PROMPT)
    language = LANGUAGES[world]
    body = [f"# {spec['model']} aligned with CaPO ({fmt})", "",
            f"Base model: `{spec['model']}` (family `{spec['family']}`, loader options "
            f"{yaml.safe_dump(spec.get('options') or {}, default_flow_style=True).strip()}). "
            "Fine-tuned with capo (Calibrated Preference Optimization) on the base model's own "
            "samples, scored by the reward models below.", "",
            f"This export holds {CONTENTS[(world, fmt)]}.", "",
            f"```{language}", usage, "```", "", "## Alignment", "",
            *rewards_section(run, config), "", *training_section(model_dir, config),
            f"- {prompts_line(config)}", "", "## Evaluation", "", *evaluation_section(run, config)]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
