"""The model card: hub front matter (parsed back with huggingface_hub) and the run's alignment
settings and evaluation, with the values written into a hand-made run directory."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import ModelCard

from capo.export.card import hub_id, model_card
from capo.pipeline.rundir import RunDir
from capo.pipeline.score import META_KEY

SPEC = {"model": "stabilityai/stable-diffusion-xl-base-1.0", "family": "sdxl",
        "path": "stabilityai/stable-diffusion-xl-base-1.0", "options": {"resolution": 512}}
TRAIN = {"objective": "capo", "weighting": "sigmoid", "sigmoid_bias": 1.5, "normalize_weighting": True,
         "beta": 500.0, "lora": True,
         "lora_rank": 16, "lora_alpha": 8.0, "max_steps": 250, "batch_size": 8, "learning_rate": 1e-4,
         "seed": 3}
RESULTS = {"rewards": {"hpsv2": {"win_rate": 62.5, "ci_low": 40.0, "ci_high": 80.0, "mean_base": 0.25,
                                 "mean_tuned": 0.275}}}


def _run(tmp_path, evaluated: bool = True) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    run.model_dir.mkdir(parents=True)
    run.write_base_model(SPEC)
    run.save_config("generate", {"prompts": "prompts.txt", "num_prompts": 100, "samples_per_prompt": 16,
                                 "steps": 50, "guidance": 7.5, "seed": 0})
    run.save_config("calibrate", {"reward": ["hpsv2", "mps"]})
    run.save_config("select", {"rule": "best_worst", "reward": "mps", "weights": []})
    run.save_config("evaluate", {"prompts": "heldout.txt", "seeds": 4, "n_boot": 1000})
    run.rewards_dir.mkdir()
    for name, scale, better in (("hpsv2", 100.0, True), ("mps", 1.0, False)):
        meta = {"reward": name, "bt_scale": scale, "transform": "identity", "higher_is_better": better}
        pq.write_table(pa.table({"raw": [0.1]}).replace_schema_metadata({META_KEY: json.dumps(meta)}),
                       run.reward_path(name))
    (run.model_dir / "train_summary.json").write_text(json.dumps({"config": TRAIN, "weight_mean": 0.25}))
    if evaluated:
        run.eval_dir.mkdir()
        (run.eval_dir / "results.json").write_text(json.dumps(RESULTS))
    return run


def test_card_front_matter_and_body(tmp_path):
    run = _run(tmp_path)
    card = ModelCard(model_card(run, SPEC, run.model_dir, "lora", "diffusers", repo="me/sdxl-capo"))
    data = card.data.to_dict()
    assert data["base_model"] == SPEC["model"] and data["library_name"] == "diffusers"
    assert data["base_model_relation"] == "adapter" and data["pipeline_tag"] == "text-to-image"
    assert {"capo", "lora", "sdxl", "text-to-image"} <= set(data["tags"])
    text = card.text
    assert f'DiffusionPipeline.from_pretrained("{SPEC["model"]}")' in text
    assert 'pipe.load_lora_weights("me/sdxl-capo")' in text
    assert "| hpsv2 | 100.0 | identity | yes |" in text and "| mps | 1.0 | identity | no |" in text
    assert "mean over the 2 reward(s)" in text
    assert "Pair rule: `best_worst` (reward mps)." in text
    assert ("Objective: `capo`, beta = 500, weighting sigmoid (bias 1.5), divided by its mean E_t f = 0.25, "
            "250 steps of 8 pairs, "
            "learning rate "
            "0.0001, LoRA rank 16, alpha 8.0 (scale 0.5), seed 3.") in text
    assert "Prompt set: `prompts.txt`, a subset of 100 prompts; 16 samples per prompt" in text
    assert "`heldout.txt` prompts, 4 seed(s) each" in text
    assert "| tuned | 62.5 [40.0, 80.0] | 0.275 |" in text


def test_card_of_a_local_model_without_evaluation(tmp_path):
    run = _run(tmp_path, evaluated=False)
    local = {**SPEC, "model": "/ckpt/sdxl", "path": "/ckpt/sdxl"}
    assert hub_id(local) is None and hub_id({"model": "shapes-vp", "path": None}) is None
    card = ModelCard(model_card(run, local, run.model_dir, "merged", "diffusers", repo="/out"))
    assert "base_model" not in card.data.to_dict() and "merged" in card.data.to_dict()["tags"]
    assert 'DiffusionPipeline.from_pretrained("/out")' in card.text
    assert "No evaluation recorded" in card.text


def test_card_of_a_soup_names_its_members(tmp_path):
    run = _run(tmp_path)
    member = tmp_path / "cell" / "model"
    member.mkdir(parents=True)
    (member / "train_summary.json").write_text(json.dumps({"config": {**TRAIN, "objective": "dpo"}}))
    (run.model_dir / "soup.json").write_text(json.dumps({"method": "linear", "members": [str(member)]}))
    card = ModelCard(model_card(run, SPEC, run.model_dir, "merged", "diffusers", repo="me/soup"))
    assert card.data.to_dict()["base_model_relation"] == "merge"
    assert "`linear` merge of the task vectors of 1 fine-tunes" in card.text
    assert "  - `cell`: Pair rule: not recorded. Objective: `dpo`, beta = 500" in card.text
