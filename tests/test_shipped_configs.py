"""Every YAML shipped under src/capo/configs/ loads with the loader of the command that reads it.

- ``capo run`` configs through ``capo.pipeline.run.resolve`` (RunConfig + every stage dataclass;
  unknown keys are errors), and the paper configs hold the paper's settings;
- ``capo experiment`` configs through ``load_experiment`` + ``resolve_stages``;
- accelerate configs (configs/accelerate/) through accelerate's own loader and launch validation.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from capo.errors import CapoError
from capo.rewards.base import REWARDS

CONFIGS = Path(str(resources.files("capo") / "configs"))
ACCELERATE = CONFIGS / "accelerate"
ALL_YAML = sorted(p for p in CONFIGS.rglob("*.yaml"))
EXPERIMENT = [p for p in ALL_YAML if p.parent == CONFIGS and p.name.startswith("experiment-")]
ACCEL = [p for p in ALL_YAML if p.parent == ACCELERATE]
RUN = [p for p in ALL_YAML if p not in EXPERIMENT and p not in ACCEL]

#: accelerate file -> its distributed_type
ACCEL_TYPES = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP"}


def resolve(path: Path, sets: list[str] | None = None):
    from capo.pipeline.run import resolve as run_resolve

    return run_resolve(str(path), None, sets or [])


def test_every_shipped_yaml_has_a_loader():
    assert ALL_YAML, CONFIGS
    assert {p.name for p in ACCEL} == set(ACCEL_TYPES)
    assert {p.name for p in RUN} >= {"shapes.yaml", "sdxl-paper.yaml", "sd3m-paper.yaml",
                                      "sdxl-pickscore-dpo-comparison.yaml",
                                      "sdxl-pickscore-dpo-comparison-dpo.yaml"}


@pytest.mark.parametrize("path", RUN, ids=lambda p: p.name)
def test_run_configs_load_into_the_stage_dataclasses(path):
    cfg, stages = resolve(path)
    assert set(stages) == {"generate", "score", "calibrate", "select", "train", "evaluate"}
    raw = yaml.safe_load(path.read_text())
    for name, section in raw.items():  # every key given reached its dataclass unchanged
        if name == "round_evaluate":  # RunConfig's per-round evaluation, over the evaluate section
            from capo.pipeline.rounds import round_evaluate_config

            assert all(getattr(round_evaluate_config(cfg), k) == v for k, v in section.items())
        elif isinstance(section, dict):
            for key, value in section.items():
                assert getattr(stages[name], key) == value, (path.name, name, key)
    names = stages["score"].reward + stages["evaluate"].reward
    if not path.name.startswith("shapes"):
        assert set(names) <= set(REWARDS), names


@pytest.mark.parametrize("path", RUN, ids=lambda p: p.name)
def test_an_unknown_key_in_a_shipped_config_is_an_error(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    data["train"] = {**(data.get("train") or {}), "learning_rat": 1.0}
    bad = tmp_path / path.name
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(CapoError, match="unknown config key 'learning_rat'"):
        resolve(bad)


@pytest.mark.parametrize("path", EXPERIMENT, ids=lambda p: p.name)
def test_experiment_configs_load(path):
    from capo.experiments.matrix import load_experiment
    from capo.experiments.runner import resolve_stages

    cfg = load_experiment(str(path))
    resolve_stages(cfg, str(path))


PAPER = {  # Sec. 5: base model, sampling, N, prompts, rewards (VILA -> laion-aesthetic), rule, b
    "sdxl-paper.yaml": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 7.5, 1.5, "parti-prompts"),
    "sd3m-paper.yaml": ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 5.0, None, "dpg-bench"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_papers_settings(name):
    model, family, guidance, bias, eval_prompts = PAPER[name]
    _, s = resolve(CONFIGS / name)
    gen = s["generate"]
    assert (gen.model, gen.family, gen.steps, gen.guidance) == (model, family, 50, guidance)
    assert (gen.num_prompts, gen.samples_per_prompt) == (100_000, 16)
    assert "diffusiondb" in gen.prompts and eval_prompts in s["evaluate"].prompts
    assert s["score"].reward == ["mps", "vqascore", "laion-aesthetic"]
    assert s["select"].rule == "frs"
    assert (s["train"].objective, s["train"].weighting) == ("capo", "sigmoid")
    assert s["train"].normalize_weighting is False  # the paper's f(t), so its beta keeps its meaning
    if bias is not None:
        assert s["train"].sigmoid_bias == bias


def test_dpo_comparison_variants_differ_only_in_objective_and_stages():
    """Table 4: PickScore, best/worst pairs; CaPO and DPO-Syn train on the same data."""
    capo_cfg, capo = resolve(CONFIGS / "sdxl-pickscore-dpo-comparison.yaml")
    dpo_cfg, dpo = resolve(CONFIGS / "sdxl-pickscore-dpo-comparison-dpo.yaml")
    assert (capo["train"].objective, dpo["train"].objective) == ("capo", "dpo")
    assert dpo_cfg.stages == ["select", "train", "evaluate"] and capo_cfg.run != dpo_cfg.run
    for name in ("generate", "score", "select", "evaluate"):
        assert capo[name] == dpo[name], name
    keep = {"objective", "run"}
    assert {k: v for k, v in vars(capo["train"]).items() if k not in keep} == \
        {k: v for k, v in vars(dpo["train"]).items() if k not in keep}
    assert capo["score"].reward == ["pickscore"]
    assert (capo["select"].rule, capo["select"].reward) == ("best_worst", "pickscore")
    assert "pickapic" in capo["generate"].prompts and "parti" in capo["evaluate"].prompts
    assert capo["evaluate"].reward == ["pickscore", "mps", "vqascore", "laion-aesthetic"]


# --- accelerate ---------------------------------------------------------------------------------
def launch_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {a.dest for a in launch_command_parser()._actions}


@pytest.mark.parametrize("path", ACCEL, ids=lambda p: p.name)
def test_accelerate_configs_parse_and_name_known_keys(path):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    for key in ("compute_environment", "distributed_type", "num_processes", "mixed_precision"):
        assert key in raw, key
    assert raw["distributed_type"] == ACCEL_TYPES[path.name]
    assert raw["mixed_precision"] in ("no", "bf16", "fp16")
    config = load_config_from_file(str(path))  # accelerate's loader: unknown top-level keys raise
    assert config.distributed_type.value == ACCEL_TYPES[path.name]
    dests = launch_dests()  # nested keys become `accelerate launch` arguments (fsdp_ prefixed)
    nested = list(raw.get("fsdp_config", {}))
    assert [k for k in nested if k not in dests] == []


@pytest.mark.parametrize("path", ACCEL, ids=lambda p: p.name)
def test_accelerate_launch_accepts_the_config(path):
    """``accelerate launch --config_file FILE -m capo.cli train ...`` passes accelerate's own checks."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "capo.cli", "train", "--run", "RUN", "--config", "FILE"])
    args, _, _ = _validate_launch_command(args)
    assert args.training_script_args == ["train", "--run", "RUN", "--config", "FILE"]
    assert (args.use_fsdp, args.use_deepspeed) == (path.name == "fsdp.yaml", False)


def test_fsdp_config_builds_accelerates_fsdp2_plugin(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE / "fsdp.yaml"), "-m", "capo.cli", "train"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
