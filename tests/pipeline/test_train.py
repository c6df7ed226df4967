"""capo train: the pair stream, LoRA / full fine-tuning, saved model, objectives, CLI.

``make_run`` (also used by test_train_resume / test_train_ddp) writes a synthetic run directory:
a tiny random shapes model, cached embeddings of real shapes prompts, random latents and pairs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from capo.cli import main
from capo.config import from_dict
from capo.errors import CapoError
from capo.models.base import detect_family, load_model
from capo.pipeline.generate import model_spec
from capo.pipeline.rundir import (
    PAIRS_SCHEMA,
    RunDir,
    embeddings_table,
    samples_table,
    shard_name,
    write_table_atomic,
)
from capo.pipeline.train import (
    TrainConfig,
    apply_trained,
    optimizer_step,
    save_model,
    setup,
    train,
    trained_state_dict,
)
from capo.pipeline.trainset import NOISE, PairSet, stream_seed
from capo.weighting import mean_weight, sigmoid

N_PROMPTS, N_SAMPLES = 5, 4
#: per prompt: X+ = samples {0, 1} (R_ca 0.9, 0.7), X- = {3} (R_ca 0.2); the last prompt has no X+
POS, NEG, POS_RCA, NEG_RCA = [0, 1], [3], [0.9, 0.7], [0.2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_run(root: Path, model_dir: str, n_prompts: int = N_PROMPTS, n_samples: int = N_SAMPLES) -> RunDir:
    """A run directory as generate + select leave it (random latents; the pairs are made up)."""
    from capo.shapes.world import make_prompts

    run = RunDir.at(root)
    run.write_base_model(model_spec(model_dir, None))
    adapter = load_model(*detect_family(model_dir), device="cpu")
    specs = make_prompts("train")[:n_prompts]
    pids = [s.prompt_id for s in specs]
    write_table_atomic(embeddings_table(pids, adapter.encode_prompts([s.text for s in specs])),
                       run.embeddings_dir / shard_name(0, 0))
    rows = [(pid, i) for pid in pids for i in range(n_samples)]
    g = torch.Generator().manual_seed(0)
    latents = torch.rand(len(rows), *adapter.latent_shape(), generator=g) * 2 - 1
    write_table_atomic(samples_table([r[0] for r in rows], [r[1] for r in rows], list(range(len(rows))),
                                     [b""] * len(rows), latents), run.samples_dir / shard_name(0, 0))
    usable = [True] * (n_prompts - 1) + [False]
    pairs = {"prompt_id": pids, "positives": [POS if u else [] for u in usable],
             "negatives": [NEG] * n_prompts, "pos_rca": [POS_RCA if u else [] for u in usable],
             "neg_rca": [NEG_RCA] * n_prompts, "rule": ["frs"] * n_prompts}
    write_table_atomic(pa.table(pairs, schema=PAIRS_SCHEMA), run.pairs_path)
    return run


def config(run: RunDir, **kw) -> TrainConfig:
    base = {"run": str(run.root), "max_steps": 2, "batch_size": 2, "checkpoint_every": 0, "log_with": "none",
            "learning_rate": 1e-3}
    return from_dict(TrainConfig, {**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory, base_model) -> RunDir:
    return make_run(tmp_path_factory.mktemp("run"), base_model)


def tensors(batch) -> dict[str, torch.Tensor]:
    """Every tensor of a PairBatch by name (embeddings as emb.KEY)."""
    out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name != "emb"}
    return out | {f"emb.{k}": v for k, v in batch.emb.items()}


# --- the pair stream -------------------------------------------------------------------------
def test_stream_is_a_pure_function_of_seed_and_step_for_any_world_size(run):
    data = PairSet.from_run(run)
    assert len(data) == N_PROMPTS - 1  # the prompt without X+ is skipped
    sample_t = load_model(*detect_family(run.read_base_model()["path"]), device="cpu").schedule.sample_t
    whole = data.batch(7, 3, 4, 0, 1, sample_t)
    halves = [data.batch(7, 3, 4, r, 2, sample_t) for r in range(2)]
    again = PairSet.from_run(run).batch(7, 3, 4, 0, 1, sample_t)
    for name, value in tensors(whole).items():
        assert torch.equal(value, torch.cat([tensors(h)[name] for h in halves])), name
        assert torch.equal(value, tensors(again)[name]), name
    other = data.batch(7, 4, 4, 0, 1, sample_t)
    assert not torch.equal(whole.eps_pos, other.eps_pos) and not torch.equal(whole.t, other.t)
    assert not torch.equal(whole.eps_pos, whole.eps_neg)
    shared = data.batch(7, 3, 4, 0, 1, sample_t, share_noise=True)
    assert torch.equal(shared.eps_pos, shared.eps_neg) and torch.equal(shared.x_pos, whole.x_pos)


def test_one_draw_stream_is_the_per_pair_generator_and_k_draws_extend_it(run):
    """K = 1: pair i of step s has t, eps+, eps- drawn in that order from a generator seeded by
    (seed, NOISE, s, i) (the stream resume and DDP rely on); K draws continue that generator, so
    draw 0 of every K is the K = 1 draw."""
    data = PairSet.from_run(run)
    sample_t = load_model(*detect_family(run.read_base_model()["path"]), device="cpu").schedule.sample_t
    one = data.batch(7, 3, 4, 0, 1, sample_t)
    assert one.t.shape == (4, 1) and one.eps_pos.shape == (4, 1, *data.latents.shape[1:])
    for i in range(4):
        gen = torch.Generator().manual_seed(stream_seed(7, NOISE, 3, i))
        t = sample_t(1, generator=gen)
        eps_pos, eps_neg = (torch.randn(data.latents.shape[1:], generator=gen) for _ in range(2))
        assert torch.equal(one.t[i], t) and torch.equal(one.eps_pos[i, 0], eps_pos)
        assert torch.equal(one.eps_neg[i, 0], eps_neg)
    three = data.batch(7, 3, 4, 0, 1, sample_t, draws=3)
    assert three.t.shape == (4, 3) and three.eps_neg.shape == (4, 3, *data.latents.shape[1:])
    for name in ("t", "eps_pos", "eps_neg"):
        assert torch.equal(getattr(three, name)[:, :1], getattr(one, name)), name
    assert len(set(three.t.flatten().tolist())) > 4
    assert not torch.equal(three.eps_pos[:, 1], three.eps_pos[:, 2])
    assert torch.equal(three.x_pos, one.x_pos) and torch.equal(three.delta_rca, one.delta_rca)
    shared = data.batch(7, 3, 4, 0, 1, sample_t, share_noise=True, draws=3)
    assert torch.equal(shared.eps_pos, shared.eps_neg) and torch.equal(shared.t[:, 0], one.t[:, 0])


def test_each_visit_draws_from_x_plus_and_x_minus_and_an_epoch_visits_every_prompt(run):
    data = PairSet.from_run(run)
    latents = run.read_latents()
    seen = []
    for position in range(3 * len(data)):
        p, i, j, drca = data.pick(11, position)
        pid = data.prompt_ids[p]
        drawn = [n for n, k in enumerate(POS) if torch.equal(data.latents[i], latents[(pid, k)])]
        assert len(drawn) == 1 and torch.equal(data.latents[j], latents[(pid, NEG[0])])
        assert drca == pytest.approx(POS_RCA[drawn[0]] - NEG_RCA[0], abs=1e-6)  # ΔR_ca of the drawn pair
        seen.append(p)
    for epoch in range(3):
        assert sorted(seen[epoch * len(data):(epoch + 1) * len(data)]) == list(range(len(data)))
    assert len({data.pick(11, k)[1] for k in range(40)}) == 2 * len(data)  # both positives get drawn


def test_bad_pairs_are_one_line_errors(tmp_path, base_model):
    run = make_run(tmp_path / "bad", base_model, n_prompts=2)
    table = run.read_pairs().to_pydict()
    table["pos_rca"][0] = [0.5]
    write_table_atomic(pa.table(table, schema=PAIRS_SCHEMA), run.pairs_path)
    with pytest.raises(CapoError, match=r"pairs.parquet, row 0: 'positives' and 'pos_rca' differ"):
        PairSet.from_run(run)
    table["pos_rca"][0], table["positives"][0] = [], []
    write_table_atomic(pa.table(table, schema=PAIRS_SCHEMA), run.pairs_path)
    with pytest.raises(CapoError, match="no prompt has both a positive and a negative"):
        PairSet.from_run(run)


# --- the recipe --------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["dpo", "ipo", "capo"])
def test_objectives_at_lora_init_hand_check(run, objective):
    """LoRA B = 0 at step 0: Δ_θ = 0 exactly, so ℓ_CaPO = mean ΔR_ca², ℓ_IPO = 1, ℓ_DPO = log 2."""
    tr = setup(config(run, objective=objective, batch_size=4))
    batch = tr.data.batch(0, 0, 4, 0, 1, tr.adapter.schedule.sample_t)
    m = optimizer_step(tr, 0)
    expected = {"dpo": math.log(2.0), "ipo": 1.0, "capo": (batch.delta_rca ** 2).mean().item()}[objective]
    assert m["loss"] == pytest.approx(expected, rel=1e-6)
    assert m["delta_theta"] == 0.0 and m["implicit_acc"] == 0.0 and m["err_policy"] == m["err_ref"]
    assert m["delta_rca"] == pytest.approx(batch.delta_rca.mean().item())
    assert m["lr"] == 1e-3 and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    m = optimizer_step(tr, 1)
    assert m["delta_theta"] != 0.0 and math.isfinite(m["loss"])


def test_lora_moves_only_the_adapters_and_the_reference_stays_the_base(tmp_path, run):
    tr = setup(config(run))
    den = tr.adapter.denoiser
    base_before = {k: v.clone() for k, v in den.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in den.state_dict().items() if "lora_" in k}
    probe = tr.data.batch(5, 0, 2, 0, 1, tr.adapter.schedule.sample_t)
    x, t, emb = probe.x_pos, probe.t[:, 0], probe.emb

    def outputs():
        with torch.no_grad():
            policy = tr.adapter.denoise(x, t, emb)
            with tr.reference.active():
                return policy, tr.adapter.denoise(x, t, emb)

    policy0, ref0 = outputs()
    assert torch.equal(policy0, ref0)
    for step in range(3):
        optimizer_step(tr, step)
    policy1, ref1 = outputs()
    after = den.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())
    assert all(not torch.equal(v, after[k]) for k, v in lora_before.items() if "lora_B" in k)
    assert torch.equal(ref1, ref0) and not torch.allclose(policy1, policy0)
    save_model(tr, {"steps": 3})
    saved = trained_state_dict(run.model_dir)
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    assert (run.model_dir / "adapter_config.json").is_file()
    fresh = load_model(*detect_family(run.read_base_model()["path"]), device="cpu", load_text_encoders=False)
    with torch.no_grad():
        assert torch.equal(apply_trained(fresh, run.model_dir).denoise(x, t, emb), policy1)
    assert run.load_config()["train"]["objective"] == "capo"


def test_full_finetuning_writes_the_denoiser_and_logs_to_tensorboard(tmp_path, base_model):
    run = make_run(tmp_path / "full", base_model, n_prompts=2)
    summary = train(config(run, lora=False, log_with="tensorboard", max_steps=1))
    assert summary["steps"] == 1 and set(summary["last_metrics"]) >= {
        "loss", "delta_theta", "implicit_acc", "err_policy", "err_ref", "delta_rca", "grad_norm", "lr"}
    tuned = trained_state_dict(run.model_dir)
    base = load_model(*detect_family(base_model), device="cpu", load_text_encoders=False)
    assert set(tuned) == set(base.denoiser.state_dict())
    assert any(not torch.equal(v, tuned[k]) for k, v in base.denoiser.state_dict().items())
    apply_trained(base, run.model_dir)
    assert all(torch.equal(v, tuned[k]) for k, v in base.denoiser.state_dict().items())
    assert list((run.root / "logs").rglob("events.out.tfevents.*"))
    assert (run.model_dir / "train_summary.json").is_file()
    # sigmoid b = 1.5 on the shapes VP (SDXL) schedule: E_t f = 6.869 over the 1000 timesteps
    assert summary["normalize_weighting"] is True and summary["weight_mean"] == pytest.approx(6.869, abs=1e-3)


def test_weighting_is_built_once_and_normalised_unless_asked_not_to(run):
    t = torch.tensor([0.1, 0.5, 0.9])
    norm, paper = setup(config(run)), setup(config(run, normalize_weighting=False))
    sched = norm.adapter.schedule
    assert norm.weight_mean == paper.weight_mean == pytest.approx(mean_weight(sigmoid(1.5), sched))
    torch.testing.assert_close(paper.weighting(sched, t), sigmoid(1.5)(sched, t))
    torch.testing.assert_close(norm.weighting(sched, t), sigmoid(1.5)(sched, t) / norm.weight_mean)
    const = setup(config(run, weighting="constant"))
    assert const.weight_mean == pytest.approx(1.0, abs=1e-12)
    assert const.weighting(sched, t).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


def test_cli_reads_the_yaml_section_and_flags(tmp_path, base_model):
    run = make_run(tmp_path / "cli", base_model, n_prompts=2)
    cfg = tmp_path / "capo.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"objective": "ipo", "max_steps": 1, "batch_size": 2,
                                             "log_with": "none", "checkpoint_every": 1}}))
    assert main(["train", "--config", str(cfg), "--run", str(run.root), "--share-noise"]) == 0
    saved = run.load_config()["train"]
    assert saved["objective"] == "ipo" and saved["share_noise"] is True and saved["max_steps"] == 1
    assert (run.checkpoints_dir / "step-1" / "position.json").is_file()
    assert main(["train", "--run", str(run.root), "--objective", "nope"]) == 2
    assert main(["train", "--config", str(cfg), "--run", str(run.root), "--batch-size", "3",
                 "--grad-accum", "2"]) == 2


def test_k_draws_and_shared_noise_train_and_bad_draws_are_refused(run):
    one = optimizer_step(setup(config(run, batch_size=4)), 0)
    for extra in ({"draws": 3}, {"share_noise": True}, {"draws": 2, "share_noise": True}):
        m = optimizer_step(setup(config(run, batch_size=4, **extra)), 0)
        assert m.keys() == one.keys() and all(math.isfinite(v) for v in m.values())
        assert m["loss"] == pytest.approx(one["loss"], rel=1e-6)  # Δ_θ = 0 at LoRA init for every K
        assert m["grad_norm"] != one["grad_norm"]  # other draws, other gradient
    assert {"beta_delta_theta", "beta_delta_theta_std", "near_target", "loss_at_start", "clipped"} <= set(one)
    with pytest.raises(CapoError, match="draws"):
        config(run, draws=0)


def test_gradient_checkpointing_and_accumulation_give_the_same_step(run):
    """Recomputing activations changes nothing; 2 micro-batches of 2 = one batch of 4 (to rounding)."""
    plain = optimizer_step(setup(config(run, batch_size=4)), 0)
    for extra in ({"gradient_checkpointing": True}, {"grad_accum": 2}):
        m = optimizer_step(setup(config(run, batch_size=4, **extra)), 0)
        assert m.keys() == plain.keys()
        for k, v in plain.items():
            assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (extra, k)
