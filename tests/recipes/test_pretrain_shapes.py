"""``capo shapes pretrain``: the CLI end to end (tiny), the loss, LR schedule, EMA and config."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from capo.cli import main
from capo.config import from_dict
from capo.models.shapes import build_shapes_model, load_shapes_flow
from capo.recipes.pretrain_shapes import (
    EMA,
    PretrainConfig,
    command_of,
    denoising_loss,
    logit_normal_t,
    lr_factor,
    min_snr_weight,
)
from capo.schedules import FlowSchedule, target_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_cli_trains_two_steps_and_saves_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "flow"
    argv = ["shapes", "pretrain", "--kind", "flow", "--size", "tiny", "--out", str(out),
            "--steps", "2", "--batch-size", "4", "--pool-size", "8", "--default-steps", "3"]
    assert main(argv) == 0
    assert '"steps_done": 2' in capsys.readouterr().out
    readme = (out / "README.txt").read_text()
    assert "command: capo shapes pretrain --kind flow --out" in readme and "--steps 2" in readme
    model = load_shapes_flow(out)
    assert model.default_steps == 3
    sample = model.sample(["a red circle"], [0])
    assert sample.latents.shape == (1, 3, 32, 32) and torch.isfinite(sample.latents).all()


def test_cli_bad_config_is_one_line_error(tmp_path, capsys):
    assert main(["shapes", "pretrain", "--kind", "ddpm", "--out", str(tmp_path)]) == 2
    assert "unknown shapes model kind 'ddpm'" in capsys.readouterr().err
    assert main(["shapes", "pretrain", "--kind", "vp"]) == 2
    assert "'out'" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("pretrain:\n  kind: flow\n  colour: red\n")
    assert main(["shapes", "pretrain", "--config", str(config), "--out", str(tmp_path)]) == 2
    assert "unknown config key 'colour'" in capsys.readouterr().err


def test_command_of_reproduces_the_config():
    cfg = from_dict(PretrainConfig, {"kind": "flow", "out": "w/flow", "steps": 10, "minutes": 5})
    assert command_of(cfg) == "capo shapes pretrain --kind flow --out w/flow --steps 10 --minutes 5.0"


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 10, 110) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110) == pytest.approx(1.0)  # cos(0)
    assert lr_factor(60, 10, 110) == pytest.approx(0.5)  # ½(1 + cos(π/2))
    assert lr_factor(110, 10, 110) == pytest.approx(0.0, abs=1e-12)


def test_ema_update_rule():
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # d = min(0.9, 1/10) = 0.1: 0.1·0 + 0.9·1
    assert ema.shadow[0].item() == pytest.approx(0.9)
    ema.update()  # d = min(0.9, 2/11)
    d = 2 / 11
    assert ema.shadow[0].item() == pytest.approx(d * 0.9 + (1 - d) * 1.0)
    ema.copy_to_params()
    assert p.item() == pytest.approx(ema.shadow[0].item())


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_denoising_loss_is_zero_for_the_perfect_prediction(kind):
    """L = mean ‖out − target‖²: 0 when out is the exact target, mean target² when out = 0."""
    model = build_shapes_model(kind, "tiny")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    schedule = model.schedule

    def perfect(x_t, t, emb):
        alpha, sigma, _, _ = schedule(t)
        eps = (x_t - alpha.view(-1, 1, 1, 1) * x) / sigma.view(-1, 1, 1, 1)
        return target_of(x, eps, t, model.prediction_type, schedule)

    fake = SimpleNamespace(schedule=schedule, prediction_type=model.prediction_type,
                           tokenizer=model.tokenizer, text_encoder=model.text_encoder, denoise=perfect)
    loss = denoising_loss(fake, x, ["a red circle"] * 4, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    fake.denoise = lambda x_t, t, emb: torch.zeros_like(x_t)
    gen = torch.Generator().manual_seed(0)
    t = schedule.sample_t(4, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    expected = target_of(x, eps, t, model.prediction_type, schedule).float().pow(2).mean()
    loss = denoising_loss(fake, x, [""] * 4, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not math.isnan(loss.item())


def test_min_snr_weight_hand_values():
    """w = min(SNR, γ) / SNR; flow with shift 1: SNR = ((1 − u) / u)²."""
    schedule = FlowSchedule(shift=1.0)
    t = torch.tensor([0.5, 0.25, 0.1])  # SNR = 1, 9, 81
    torch.testing.assert_close(min_snr_weight(schedule, t, 5.0), torch.tensor([1.0, 5 / 9, 5 / 81]))
    torch.testing.assert_close(min_snr_weight(schedule, t, 0.0), torch.ones(3))


def test_logit_normal_t_is_inside_the_schedule_range():
    schedule = FlowSchedule(shift=1.0, t_min=0.2, t_max=0.7)
    t = logit_normal_t(schedule, 2000, torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.7
    assert abs(float(torch.logit(logit_normal_t(FlowSchedule(), 20000,
                                                torch.Generator().manual_seed(1))).mean())) < 0.05
