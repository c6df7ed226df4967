"""The adapter contract every diffusers family keeps (docs/design.md §3), on tiny random-weight
pipelines saved to disk: embeddings, a deterministic denoiser, the pipeline's own sampler equal
to sampling from ``denoise``, batch-invariant sampling, a denoiser-only load, LoRA on and off.
Family-specific behaviour is tested in test_sd.py, test_sdxl.py, test_sd3.py and test_flux.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from capo.errors import CapoError
from capo.models.base import load_model
from capo.schedules import add_noise, to_epsilon

L_T5 = 32  # tiny T5 length (SD3's default is 256, FLUX's 512)


@dataclass(frozen=True)
class Case:
    """One family on its tiny pipeline (``tiny_path`` name) with what differs between families."""

    family: str
    tiny: str
    embeddings: dict[str, tuple[int, ...]]  # name -> shape for the two test prompts
    reference: str  # tiny_pipelines' sampler from ``denoise`` that the pipeline must match
    steps: int  # pipeline steps of that comparison
    tol: float
    guidance: float | None = 1.0  # of that comparison: 1 has no CFG pass (None: the family's default)
    options: dict[str, Any] = field(default_factory=dict)  # load_model options of every load
    sampler: dict[str, Any] = field(default_factory=dict)  # load_model options of the comparison
    lora: dict[str, Any] = field(default_factory=dict)  # load_model options of the LoRA round trip


CASES = [
    Case("sd", "sd-epsilon", {"encoder_hidden_states": (2, 77, 32)}, "ddim_first_step", 1, 1e-4),
    Case("sd", "sd-v_prediction", {"encoder_hidden_states": (2, 77, 32)}, "ddim_first_step", 1, 1e-4),
    Case("sdxl", "sdxl", {"encoder_hidden_states": (2, 77, 64), "pooled": (2, 32)}, "ddim_first_step", 1,
         1e-4, lora={"enable_gradient_checkpointing": True}),
    # SD3: CLIP 16 + 16 padded to T5's 32, then 77 CLIP tokens followed by L_T5 T5 tokens
    Case("sd3", "sd3", {"encoder_hidden_states": (2, 77 + L_T5, 32), "pooled": (2, 32)}, "flow_euler_steps",
         2, 1e-5, 1.0, {"max_sequence_length": L_T5}, {"scheduler": "flow-euler"}, {"lora_ff": True}),
    # FLUX.1 [dev]: the guidance 3.5 is embedded (no CFG pass), dynamic shift
    Case("flux", "flux-dev", {"encoder_hidden_states": (2, L_T5, 32), "pooled": (2, 32)}, "flow_euler_steps",
         2, 1e-5, None, {"max_sequence_length": L_T5}, {}, {"lora_ff": True}),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.tiny)
def case(request) -> Case:
    return request.param


@pytest.fixture(scope="module")
def loaded(case, tiny_path) -> Callable[..., Any]:
    """load_model(case.family, its tiny pipeline, case.options + options)."""
    return lambda **options: load_model(case.family, str(tiny_path(case.tiny)), **case.options, **options)


@pytest.fixture(scope="module")
def adapter(loaded):
    return loaded()


def _inputs(adapter, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *adapter.latent_shape(), generator=g)
    t = torch.tensor([0.3, 0.7])
    return add_noise(x, torch.randn(x.shape, generator=g), t, adapter.schedule), t


def test_encode_and_denoise(case, adapter, tiny_pipes):
    emb = adapter.encode_prompts(tiny_pipes.PROMPTS)
    assert {k: tuple(v.shape) for k, v in emb.items()} == case.embeddings
    assert adapter.latent_shape() == (4, 16, 16)
    x_t, t = _inputs(adapter)
    with torch.no_grad():
        out = adapter.denoise(x_t, t, emb)
        assert out.shape == x_t.shape and torch.isfinite(out).all()
        torch.testing.assert_close(adapter.denoise(x_t, t, emb), out, rtol=0, atol=0)
        assert not torch.allclose(adapter.denoise(x_t, t.flip(0), emb), out)
        eps_hat = to_epsilon(out, x_t, t, adapter.prediction_type, adapter.schedule)
    assert eps_hat.shape == x_t.shape and torch.isfinite(eps_hat).all()


def test_pipeline_sampler_matches_denoise(case, loaded, tiny_pipes):
    """The diffusers pipeline's own steps = the same sampler written from ``denoise``
    (tiny_pipelines.ddim_first_step / flow_euler_steps give the formulas)."""
    sampler = loaded(**case.sampler)
    emb = sampler.encode_prompts(tiny_pipes.PROMPTS)
    out = sampler.sample(tiny_pipes.PROMPTS, [1, 2], steps=case.steps, guidance=case.guidance, emb=emb)
    expected = vars(tiny_pipes)[case.reference](sampler, [1, 2], emb)
    torch.testing.assert_close(out.latents, expected, rtol=case.tol, atol=case.tol)


def test_sample_batch_invariant(adapter, tiny_pipes):
    both = adapter.sample(tiny_pipes.PROMPTS, [11, 12], steps=2)
    assert both.latents.shape == (2, 4, 16, 16) and [im.size for im in both.images] == [(32, 32)] * 2
    second = adapter.sample(tiny_pipes.PROMPTS[1:], [12], steps=2)
    torch.testing.assert_close(second.latents[0], both.latents[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both.latents[0], both.latents[1])


def test_denoiser_only_load(adapter, loaded, tiny_pipes):
    """Training loads the denoiser alone and reads cached embeddings: same outputs."""
    emb = adapter.encode_prompts(tiny_pipes.PROMPTS)
    bare = loaded(load_text_encoders=False, load_vae=False)
    assert bare.pipe.vae is None
    x_t, t = _inputs(adapter)
    with torch.no_grad():
        torch.testing.assert_close(bare.denoise(x_t, t, emb), adapter.denoise(x_t, t, emb), rtol=0, atol=0)
    with pytest.raises(CapoError, match="embeddings must come from the cache"):
        bare.encode_prompts(tiny_pipes.PROMPTS)


def test_lora_enable_disable(case, loaded, tiny_pipes):
    lora = loaded(**case.lora)
    if case.lora.get("enable_gradient_checkpointing"):
        lora.denoiser.train()  # checkpointing is active in training mode only
    x_t, t = _inputs(lora)
    tiny_pipes.lora_roundtrip(lora, x_t, t, lora.encode_prompts(tiny_pipes.PROMPTS))
