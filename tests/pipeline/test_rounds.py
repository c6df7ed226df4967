"""``capo run --rounds K`` (capo.pipeline.rounds): online rounds on a tiny shapes model, each
calibrated against the base round; a run killed in any round resumes to the same result as an
uninterrupted one; train's init_model / reference options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from capo.cli import main
from capo.errors import CapoError
from capo.pipeline import generate as generate_module
from capo.pipeline import rounds as rounds_module
from capo.pipeline import train as train_module
from capo.pipeline.calibrate import calibrated_arrays
from capo.pipeline.run import resolve
from capo.pipeline.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def online_config(tmp_path_factory) -> str:
    from capo.models.shapes import build_shapes_model

    root = tmp_path_factory.mktemp("cfg")
    torch.manual_seed(0)
    build_shapes_model("vp", size="tiny").save_pretrained(str(root / "tiny"))
    config = {
        "run": str(root / "unused"), "rounds": 2, "prompts_per_round": 4, "samples_per_round": 3,
        "steps_per_round": 2,
        "generate": {"model": str(root / "tiny"), "prompts": "shapes:train", "num_prompts": 6,
                     "samples_per_prompt": 4, "steps": 2, "chunk_size": 3},
        "score": {"reward": ["shapes-alignment", "shapes-aesthetic"]},
        "select": {"rule": "frs"},
        "train": {"max_steps": 5, "batch_size": 2, "checkpoint_every": 1, "log_with": "none",
                  "loader_workers": 0},
        "evaluate": {"num_prompts": 3, "seeds": 1, "n_boot": 20, "grid_prompts": 1},
        "round_evaluate": {"prompts": "shapes:val"},
    }
    path = root / "online.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def outputs(run) -> dict[str, object]:
    """What a finished run produced: every round's model, pairs, the curve and the final results."""
    out: dict[str, object] = {"curve": json.loads((run / "rounds" / "curve.json").read_text()),
                              "eval": json.loads((run / "eval" / "results.json").read_text())}
    for r, root in ((0, run), (1, run / "rounds" / "r1")):
        weights = load_file(root / "model" / "adapter_model.safetensors")
        out[f"model{r}"] = {k: v.numpy() for k, v in weights.items()}
        out[f"pairs{r}"] = RunDir.at(root).read_pairs().to_pylist()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a["curve"] == b["curve"] and a["eval"] == b["eval"]
    for key in ("model0", "model1"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            np.testing.assert_array_equal(a[key][name], b[key][name])
    assert a["pairs0"] == b["pairs0"] and a["pairs1"] == b["pairs1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, online_config):
    run = tmp_path_factory.mktemp("full") / "run"
    assert main(["run", "--config", online_config, "--run", str(run)]) == 0
    return run


def test_rounds_layout_and_curve(uninterrupted):
    run = uninterrupted
    r1 = RunDir.at(run / "rounds" / "r1")
    assert len(r1.read_prompts()) == 4 and len(r1.read_samples(["sample_idx"])) == 4 * 3
    saved = yaml.safe_load((r1.root / "config.yaml").read_text())
    assert saved["generate"]["tuned"] == str(run / "model") and saved["calibrate"]["bank"] == str(run)
    assert saved["train"]["init_model"] == str(run / "model") and saved["train"]["max_steps"] == 2
    assert json.loads((run / "model" / "train_summary.json").read_text())["steps"] == 2  # steps_per_round
    curve = json.loads((run / "rounds" / "curve.json").read_text())
    assert [row["round"] for row in curve] == [0, 1] and [row["samples"] for row in curve] == [24, 12]
    assert set(curve[1]["rewards"]) == {"shapes-alignment", "shapes-aesthetic"} and "gold" in curve[1]
    for r in (0, 1):
        val = json.loads((run / "rounds" / f"r{r}" / "eval-val" / "results.json").read_text())
        wins = {k: v["win_rate"] for k, v in val["rewards"].items()}
        assert {k: v["win_rate"] for k, v in curve[r]["rewards"].items()} == wins
    tuned = yaml.safe_load((run / "config.yaml").read_text())["evaluate"]["tuned"]
    assert tuned == str(r1.model_dir)  # the final evaluation is of the last round's model


def test_report_shows_round_curves(uninterrupted, tmp_path):
    from capo.report.html import build_report

    page = build_report(uninterrupted, tmp_path / "report")
    text = page.read_text()
    assert "Online rounds" in text and 'src="rounds.png"' in text
    assert (tmp_path / "report" / "rounds.png").read_bytes()[:4] == b"\x89PNG"


def test_round_calibrated_against_base_bank(uninterrupted):
    """Round 1's R_ca is each sample's mean win-rate over the base round's samples of its prompt."""
    from capo.calibration import sigmoid
    from capo.pipeline.calibrate import reward_logits, sample_table

    run, r1 = RunDir.at(uninterrupted), RunDir.at(uninterrupted / "rounds" / "r1")
    ids, names, R_ca, mask = calibrated_arrays(r1)
    t1, t0 = sample_table(r1), sample_table(run)
    R1, R0 = reward_logits(r1, names[0], t1), reward_logits(run, names[0], t0)
    p0 = t0.prompt_ids.index(ids[0])
    expected = [sigmoid(R1[0, n] - R0[p0]).mean() for n in range(3)]
    np.testing.assert_allclose(R_ca[0, :3, 0], expected, rtol=1e-12)
    assert not np.allclose(R_ca[..., 0][mask].mean(), 0.5)  # not centred like Eq. 7 within a round


def test_rerun_is_up_to_date(uninterrupted, online_config, capsys):
    before = outputs(uninterrupted)
    assert main(["run", "--config", online_config, "--run", str(uninterrupted)]) == 0
    out = capsys.readouterr().out
    assert "[capo run] round 1 train: up to date" in out and "[capo run] evaluate: up to date" in out
    assert_same(outputs(uninterrupted), before)


class Killed(Exception):
    pass


def test_killed_in_every_round_resumes_to_the_same_run(tmp_path, online_config, uninterrupted, monkeypatch):
    run = tmp_path / "run"
    argv = ["run", "--config", online_config, "--run", str(run)]
    real_write, real_step, real_eval = (generate_module.write_table_atomic, train_module.optimizer_step,
                                        rounds_module.evaluate)

    def kill_in_round1_generate(table, path):  # after round 1's first chunk
        real_write(table, path)
        if "rounds" in str(path) and "samples" in str(path):
            raise Killed

    def kill_at_second_step(tr, step, batch=None):  # round 0 and 1: after the checkpoint of step 1
        if step == 1:
            raise Killed
        return real_step(tr, step, batch)

    def kill_round1_eval(run_dir, cfg):
        if "rounds" in str(run_dir.root):
            raise Killed
        return real_eval(run_dir, cfg)

    kills = [(train_module, "optimizer_step", kill_at_second_step),  # round 0's train
             (generate_module, "write_table_atomic", kill_in_round1_generate),
             (train_module, "optimizer_step", kill_at_second_step),  # round 1's train
             (rounds_module, "evaluate", kill_round1_eval)]
    for module, name, fn in kills:
        with monkeypatch.context() as m:
            m.setattr(module, name, fn)
            with pytest.raises(Killed):
                main(argv)
    assert main(argv) == 0
    summary = json.loads((run / "rounds" / "r1" / "model" / "train_summary.json").read_text())
    assert summary["resumed_from"] == 1
    assert_same(outputs(run), outputs(uninterrupted))


def test_reference_previous_differs_and_reruns_rounds_only(tmp_path, online_config, uninterrupted):
    run = tmp_path / "run"
    assert main(["run", "--config", online_config, "--run", str(run), "--set", "reference=previous"]) == 0
    prev, base = outputs(run), outputs(uninterrupted)
    for name in prev["model0"]:
        np.testing.assert_array_equal(prev["model0"][name], base["model0"][name])  # round 0: the same
    assert any(not np.array_equal(prev["model1"][k], base["model1"][k]) for k in prev["model1"])


def test_start_from_init_model_and_reference(uninterrupted):
    """init_model loads the previous round's LoRA; reference base = adapters off, init = that model."""
    from capo.pipeline.train import TrainConfig, setup

    r1 = uninterrupted / "rounds" / "r1"
    common = {"run": str(r1), "lora": True, "log_with": "none", "init_model": str(uninterrupted / "model")}
    saved = load_file(uninterrupted / "model" / "adapter_model.safetensors")
    for reference in ("base", "init"):
        tr = setup(TrainConfig(**common, reference=reference))
        policy = tr.accelerator.unwrap_model(tr.policy)
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(policy)
        for k, v in saved.items():
            torch.testing.assert_close(state[k], v)
        with tr.reference.active() as ref:
            assert (ref is policy) == (reference == "base")


def test_round_options_validated(online_config):
    with pytest.raises(CapoError, match="reference"):
        resolve(online_config, None, ["reference=latest"])
    with pytest.raises(CapoError, match="round_evaluate"):
        resolve(online_config, None, ["round_evaluate={bogus: 1}"])
    with pytest.raises(CapoError, match="rounds"):
        resolve(online_config, None, ["rounds=0"])
