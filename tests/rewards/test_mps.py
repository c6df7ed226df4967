"""MPS from a tiny random checkpoint in the reference format: a whole ``nn.Module`` of the MPS
repository's classes (``trainer.models.clip_model.CLIPModel`` around a transformers ``CLIPModel``
subclass and a ``Cross_model``), pickled with ``torch.save(model)``.

The classes below transcribe the official code of github.com/Kwai-Kolors/MPS (commit be9027f;
file and line numbers cited at each class, einops written out as reshapes/permutes, the fp16 casts
made a dtype argument); they are registered under the reference's module names only while the
checkpoint is saved, so loading it must not need them. Expected scores come from the README's
``infer_example`` (condition threshold 0.01, through ``CLIPModel.forward``) and from the evaluation
scripts' ``infer_one_sample`` (threshold 0.3, half precision), on one prompt at a time.
"""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_clip import (
    PROMPTS,
    fixed_images,
    save_tiny_clip,
    score_one_by_one,
    tiny_clip_model,
    transformers_reference,
)
from torch import einsum, nn
from transformers import CLIPModel as HFCLIPModel

from capo.errors import CapoError
from capo.rewards import load_reward
from capo.rewards.mps import MPS, MPS_CONDITION, CrossModel, PickledObject, condition_mask, read_checkpoint

IMAGES = fixed_images([(256, 256), (300, 200), (200, 300), (61, 37)])
CONDITION = "mat"  # hides prompt tokens at threshold 0.3 that 0.01 keeps (prompts 0 and 2)


# ---- trainer/models/cross_modeling.py (lucidrains' CoCa blocks, as MPS ships them) ----
class LayerNorm(nn.Module):  # cross_modeling.py lines 18-25
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class Residual(nn.Module):  # lines 30-36
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args, **kwargs):
        return self.fn(x, *args, **kwargs) + x


class RotaryEmbedding(nn.Module):  # lines 43-52
    def __init__(self, dim):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, max_seq_len, *, device):
        seq = torch.arange(max_seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = einsum("i , j -> i j", seq, self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)


def rotate_half(x):  # lines 55-58
    x = x.reshape(*x.shape[:-1], 2, -1)  # rearrange(x, "... (j d) -> ... j d", j=2)
    x1, x2 = x.unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(pos, t):  # lines 61-62
    return (t * pos.cos()) + (rotate_half(t) * pos.sin())


class SwiGLU(nn.Module):  # lines 69-72
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class ParallelTransformerBlock(nn.Module):  # cross_modeling.py lines 78-168
    def __init__(self, dim, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.norm = LayerNorm(dim)
        attn_inner_dim = dim_head * heads
        ff_inner_dim = dim * ff_mult
        self.fused_dims = (attn_inner_dim, dim_head, dim_head, (ff_inner_dim * 2))
        self.heads = heads
        self.scale = dim_head**-0.5
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner_dim, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_inner_dim, dim, bias=False))
        self.register_buffer("pos_emb", None, persistent=False)  # line 99

    def get_rotary_embedding(self, n, device):  # lines 102-108
        if self.pos_emb is not None and self.pos_emb.shape[-2] >= n:
            return self.pos_emb[:n]
        pos_emb = self.rotary_emb(n, device=device)
        self.register_buffer("pos_emb", pos_emb, persistent=False)
        return pos_emb

    def forward(self, x, attn_mask=None):  # lines 110-168: no causal mask; attn_mask is never passed
        n, device, h = x.shape[1], x.device, self.heads
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.reshape(q.shape[0], n, h, -1).permute(0, 2, 1, 3)  # "b n (h d) -> b h n d"
        positions = self.get_rotary_embedding(n, device)
        q, k = map(lambda t: apply_rotary_pos_emb(positions, t), (q, k))
        q = q * self.scale
        sim = einsum("b h i d, b j d -> b h i j", q, k)
        if attn_mask is not None:  # lines 152-154
            attn_mask = attn_mask.unsqueeze(1)  # "b i j -> b 1 i j"
            sim = sim.masked_fill(~attn_mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        out = einsum("b h i j, b j d -> b h i d", attn, v)
        out = out.permute(0, 2, 1, 3).reshape(out.shape[0], n, -1)  # "b h n d -> b n (h d)"
        return self.attn_out(out) + self.ff_out(ff)


class CrossAttention(nn.Module):  # lines 172-258 (norm_context=False)
    def __init__(self, dim, *, context_dim=None, dim_head=64, heads=8, parallel_ff=False, ff_mult=4):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        inner_dim = heads * dim_head
        context_dim = context_dim if context_dim is not None else dim
        self.norm = LayerNorm(dim)
        self.context_norm = nn.Identity()
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        ff_inner_dim = ff_mult * dim
        self.ff = (
            nn.Sequential(
                nn.Linear(dim, ff_inner_dim * 2, bias=False),
                SwiGLU(),
                nn.Linear(ff_inner_dim, dim, bias=False),
            )
            if parallel_ff
            else None
        )

    def forward(self, x, context, mask):
        x = self.norm(x)
        context = self.context_norm(context)
        q = self.to_q(x)
        q = q.reshape(q.shape[0], q.shape[1], self.heads, -1).permute(0, 2, 1, 3)
        q = q * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        sim = einsum("b h i d, b j d -> b h i j", q, k)
        mask = mask.unsqueeze(1).repeat(1, self.heads, 1, 1)
        sim = sim + mask
        sim = sim - sim.amax(dim=-1, keepdim=True)
        attn = sim.softmax(dim=-1)
        out = einsum("b h i j, b j d -> b h i d", attn, v)
        out = out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)
        out = self.to_out(out)
        if self.ff is not None:
            out = out + self.ff(x)
        return out


class Cross_model(nn.Module):  # noqa: N801 (the reference's name); lines 261-292
    def __init__(self, dim=512, layer_num=4, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.layers = nn.ModuleList([])
        for _ in range(layer_num):
            self.layers.append(
                nn.ModuleList(
                    [
                        Residual(
                            CrossAttention(
                                dim=dim, dim_head=dim_head, heads=heads, parallel_ff=True, ff_mult=ff_mult
                            )
                        ),
                        Residual(
                            ParallelTransformerBlock(dim=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult)
                        ),
                    ]
                )
            )

    def forward(self, query_tokens, context_tokens, mask):
        for cross_attn, self_attn_ff in self.layers:
            query_tokens = cross_attn(query_tokens, context_tokens, mask)
            query_tokens = self_attn_ff(query_tokens)
        return query_tokens


# ---- trainer/models/clip_model.py ----
class XCLIPModel(HFCLIPModel):  # clip_model.py lines 17-88
    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None):
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        text_features = self.text_projection(text_outputs[0])
        text_features_EOS = self.text_projection(text_outputs[1])  # noqa: N806
        return text_features, text_features_EOS

    def get_image_features(self, pixel_values=None):
        vision_outputs = self.vision_model(pixel_values=pixel_values)
        return self.visual_projection(vision_outputs[0])


class CLIPModel(nn.Module):  # clip_model.py lines 98-136 (the training / README forward)
    def __init__(
        self, clip, cross_model
    ):  # the reference: from_pretrained(ckpt), Cross_model(1024, 4, 16 heads)
        super().__init__()
        self.model = clip
        self.cross_model = cross_model

    def forward(self, text_inputs=None, image_inputs=None, condition_inputs=None):
        outputs = ()
        text_f, text_EOS = self.model.get_text_features(text_inputs)  # noqa: N806
        outputs += (text_EOS,)
        image_f = self.model.get_image_features(image_inputs.to(self.model.dtype))  # line 116: .half()
        condition_f, _ = self.model.get_text_features(condition_inputs)
        sim_text_condition = einsum("b i d, b j d -> b j i", text_f, condition_f)
        sim_text_condition = torch.max(sim_text_condition, dim=1, keepdim=True)[0]
        sim_text_condition = sim_text_condition / sim_text_condition.max()
        mask = torch.where(sim_text_condition > 0.01, 0, float("-inf"))  # line 122
        mask = mask.repeat(1, image_f.shape[1], 1)
        bc = int(image_f.shape[0] / 2)
        sim0 = self.cross_model(image_f[:bc, :, :], text_f, mask.to(self.model.dtype))  # line 127: .half()
        sim1 = self.cross_model(image_f[bc:, :, :], text_f, mask.to(self.model.dtype))
        outputs += (sim0[:, 0, :],)
        outputs += (sim1[:, 0, :],)
        return outputs

    @property
    def logit_scale(self):
        return self.model.logit_scale


REFERENCE_MODULES = {
    "trainer.models.cross_modeling": [LayerNorm, Residual, RotaryEmbedding, SwiGLU, ParallelTransformerBlock,
                                      CrossAttention, Cross_model],
    "trainer.models.clip_model": [XCLIPModel, CLIPModel],
}  # fmt: skip


def save_reference_checkpoint(model: nn.Module, path) -> None:
    """torch.save(model) with the classes living in the reference's modules, then unregister them."""
    names = ["trainer", "trainer.models", *REFERENCE_MODULES]
    saved_modules = {c: c.__module__ for classes in REFERENCE_MODULES.values() for c in classes}
    try:
        for name in names:
            sys.modules[name] = types.ModuleType(name)
        for name, classes in REFERENCE_MODULES.items():
            for cls in classes:
                cls.__module__ = name
                setattr(sys.modules[name], cls.__name__, cls)
        torch.save(model, path)
    finally:
        for cls, module in saved_modules.items():
            cls.__module__ = module
        for name in names:
            sys.modules.pop(name, None)


def infer_example(model, tokenizer, image_processor, images, prompt, condition):
    """The reference README's ``infer_example`` (README.md lines 37-73; two images, one prompt): the
    two scores (the logits of its final softmax)."""

    def _tokenize(caption):
        n = tokenizer.model_max_length
        tokens = tokenizer(caption, max_length=n, padding="max_length", truncation=True, return_tensors="pt")
        return tokens.input_ids

    image_inputs = torch.cat(
        [image_processor(im.convert("RGB"), return_tensors="pt")["pixel_values"] for im in images]
    )
    with torch.no_grad():
        text_features, image_0_features, image_1_features = model(
            _tokenize(prompt), image_inputs, _tokenize(condition)
        )
        image_0_features = image_0_features / image_0_features.norm(dim=-1, keepdim=True)
        image_1_features = image_1_features / image_1_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        image_0_scores = model.logit_scale.exp() * torch.diag(
            einsum("bd,cd->bc", text_features, image_0_features)
        )
        image_1_scores = model.logit_scale.exp() * torch.diag(
            einsum("bd,cd->bc", text_features, image_1_features)
        )
    return torch.stack([image_0_scores, image_1_scores], dim=-1)[0]


def infer_one_sample(model, tokenizer, image_processor, image, prompt, condition):
    """``infer_one_sample`` of eval_overall_mps_on_hpdv2.py lines 33-78 (identical in
    eval_overall_mps_on_imagereward.py lines 34-78): the script behind the published accuracies,
    threshold 0.3 (line 70), ``.half()`` casts (lines 64, 72) made casts to the model's dtype."""

    def _tokenize(caption):
        n = tokenizer.model_max_length
        ids = tokenizer(caption, max_length=n, padding="max_length", truncation=True, return_tensors="pt")
        return ids.input_ids

    image_input = image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    text_input = _tokenize(prompt)
    condition_batch = _tokenize(condition).repeat(text_input.shape[0], 1)
    clip_model, dtype = model, model.model.dtype
    with torch.no_grad():
        text_f, text_features = clip_model.model.get_text_features(text_input)
        image_f = clip_model.model.get_image_features(image_input.to(dtype))
        condition_f, _ = clip_model.model.get_text_features(condition_batch)
        sim_text_condition = einsum("b i d, b j d -> b j i", text_f, condition_f)
        sim_text_condition = torch.max(sim_text_condition, dim=1, keepdim=True)[0]
        sim_text_condition = sim_text_condition / sim_text_condition.max()
        mask = torch.where(sim_text_condition > 0.3, 0, float("-inf"))
        mask = mask.repeat(1, image_f.shape[1], 1)
        image_features = clip_model.cross_model(image_f, text_f, mask.to(dtype))[:, 0, :]
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        image_score = clip_model.logit_scale.exp() * text_features @ image_features.T
    return image_score[0, 0]


def reference_model(seed: int = 1) -> CLIPModel:
    torch.manual_seed(seed)
    tiny = tiny_clip_model(seed=seed)
    clip = XCLIPModel(tiny.config)
    clip.load_state_dict(tiny.state_dict())
    cross = Cross_model(dim=tiny.config.projection_dim, layer_num=2, dim_head=8, heads=2, ff_mult=4)
    with torch.no_grad():
        for p in cross.parameters():
            p.normal_(0.0, 0.3) if p.ndim >= 2 else p.add_(torch.randn_like(p) * 0.1)
    return CLIPModel(clip, cross).eval()

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """(config dir with tokenizer and preprocessor config, checkpoint .pth, the reference model)."""
    root = tmp_path_factory.mktemp("mps")
    save_tiny_clip(root / "vit", seed=0)  # config, tokenizer, processor; its weights are not used
    model = reference_model(seed=1)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pixels = CLIPImageProcessorPil.from_pretrained(root / "vit")(IMAGES[:2], return_tensors="pt")[
        "pixel_values"
    ]
    with (
        torch.no_grad()
    ):  # fill the blocks' cached mask / rotary tensors, as in a checkpoint saved after training
        model(torch.zeros(1, 77, dtype=torch.long), pixels, torch.zeros(1, 77, dtype=torch.long))
    save_reference_checkpoint(model, root / "MPS_overall_checkpoint.pth")
    return root / "vit", root / "MPS_overall_checkpoint.pth", model


@pytest.fixture(scope="module")
def reward(repo):
    """Default threshold (0.3), in float32."""
    return load_reward(
        "mps", checkpoint=repo[1], config=repo[0], condition=CONDITION, device="cpu", batch_size=3,
        dtype="float32",
    )  # fmt: skip


@pytest.fixture(scope="module")
def processor(repo):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(repo[0])


def test_declares_its_bradley_terry_view(reward):
    assert isinstance(reward, MPS)
    assert (reward.name, reward.bt_scale, reward.transform, reward.needs_prompt) == (
        "mps",
        1.0,
        "identity",
        True,
    )
    assert reward.clip.dtype == torch.float32 and not reward.clip.training and not reward.cross.training
    assert MPS_CONDITION.startswith("light, color, clarity") and MPS_CONDITION.count(",") == 21


def test_checkpoint_is_a_pickled_module_that_plain_weights_only_loading_refuses(repo):
    with pytest.raises(Exception, match="trainer.models.clip_model.CLIPModel"):
        torch.load(repo[1], weights_only=True)
    assert "trainer" not in sys.modules


def test_reads_every_persistent_tensor_of_the_pickled_module(repo):
    tensors = read_checkpoint(repo[1])
    expected = {k: v for k, v in repo[2].state_dict().items() if not k.endswith("position_ids")}
    assert set(tensors) - {k for k in tensors if k.endswith("position_ids")} == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(tensors[key], value, atol=0, rtol=0, msg=key)


def test_preprocessing_matches_clip_image_processor(reward, repo):
    ours = reward.preprocess(IMAGES).numpy()
    np.testing.assert_allclose(ours, transformers_reference(IMAGES, repo[0]), atol=1e-5, rtol=0)


def test_scores_equal_the_evaluation_scripts_inference(repo, reward, processor):
    """Threshold 0.3, fp32: the official ``infer_one_sample``, one image at a time. Fails with a causal
    mask in the self-attention blocks (capo before issue 11)."""
    expected = [
        infer_one_sample(repo[2], reward.tokenizer, processor, im, p, CONDITION)
        for im, p in zip(IMAGES, PROMPTS, strict=True)
    ]
    scores = reward.score(IMAGES, PROMPTS)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    np.testing.assert_allclose(scores, torch.stack(expected).numpy(), atol=1e-4, rtol=1e-5)
    assert np.ptp(scores) > 1e-2


def test_threshold_option_gives_the_readme_inference(repo, reward, processor):
    """Threshold 0.01: the README's ``infer_example`` through ``CLIPModel.forward``; the threshold matters."""
    readme = MPS(repo[1], repo[0], CONDITION, threshold=0.01, device="cpu", dtype="float32", batch_size=3)
    expected = [
        infer_example(
            repo[2], readme.tokenizer, processor, [IMAGES[i], IMAGES[(i + 1) % 4]], PROMPTS[i], CONDITION
        )[0]
        for i in range(4)
    ]
    scores = readme.score(IMAGES, PROMPTS)
    np.testing.assert_allclose(scores, torch.stack(expected).numpy(), atol=1e-4, rtol=1e-5)
    assert np.abs(scores - reward.score(IMAGES, PROMPTS)).max() > 1e-3


def test_defaults_are_the_published_setup_half_precision(repo, reward, processor):
    """Default threshold 0.3 and float16, as the evaluation scripts ran: equal to the official
    inference on the half-precision model up to fp16 rounding."""
    half = MPS(repo[1], repo[0], CONDITION, device="cpu", batch_size=3)
    dtypes = (half.clip.dtype, next(half.cross.parameters()).dtype)
    assert half.threshold == 0.3 and dtypes == (torch.float16, torch.float16)
    model = copy.deepcopy(repo[2]).half()
    expected = [
        infer_one_sample(model, half.tokenizer, processor, im, p, CONDITION)
        for im, p in zip(IMAGES, PROMPTS, strict=True)
    ]
    scores = half.score(IMAGES, PROMPTS)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, torch.stack(expected).float().numpy(), atol=3e-2, rtol=0)
    np.testing.assert_allclose(scores, reward.score(IMAGES, PROMPTS), atol=3e-2, rtol=0)


def test_image_token_0_sees_every_image_token():
    """The issue's check: with no causal mask, the scored token 0 depends on the other image tokens."""
    torch.manual_seed(0)
    cross = CrossModel(dim=16, layers=2, dim_head=8, heads=2, ff_mult=4).eval()
    with torch.no_grad():
        for p in cross.parameters():
            p.normal_(0.0, 0.3) if p.ndim >= 2 else None
        image, text = torch.randn(1, 10, 16), torch.randn(1, 5, 16)
        mask = torch.zeros(1, 10, 5)
        other = torch.cat([image[:, :1], torch.randn(1, 9, 16)], dim=1)
        change = (cross(image, text, mask)[:, 0] - cross(other, text, mask)[:, 0]).abs().max()
    assert change > 1e-3


def test_condition_mask_hides_tokens_unlike_the_condition():
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.005, 0.0]], [[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]]])
    condition = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    # sample 0: S = [1, 0, 0.005] / 1; sample 1: S = [2, -0.5, 0] / 2 -> visible iff S > 0.01
    expected = torch.tensor([[[0.0, -np.inf, -np.inf]], [[0.0, -np.inf, -np.inf]]])
    torch.testing.assert_close(condition_mask(text, condition, 0.01), expected)
    # threshold 0.3 (the default): S = [1, 0.6, 0.2] -> the third token is hidden only at 0.3
    text = torch.tensor([[[1.0, 0.0], [0.6, 0.0], [0.2, 0.0]]])
    torch.testing.assert_close(condition_mask(text, condition, 0.01), torch.zeros(1, 1, 3))
    torch.testing.assert_close(condition_mask(text, condition), torch.tensor([[[0.0, 0.0, -np.inf]]]))


def test_deterministic_and_batch_invariant(reward):
    first = reward.score(IMAGES, PROMPTS)
    np.testing.assert_array_equal(first, reward.score(IMAGES, PROMPTS))
    np.testing.assert_allclose(first, score_one_by_one(reward, IMAGES, PROMPTS), atol=1e-5, rtol=0)
    other = reward.score(IMAGES, PROMPTS[::-1])
    assert np.abs(other - first).max() > 1e-3  # the prompt matters


def test_state_dict_files_load_the_same_model(repo, reward, tmp_path):
    sd = {k: v.contiguous() for k, v in repo[2].state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "mps.pt")
    save_file(sd, tmp_path / "mps.safetensors")
    expected = reward.score(IMAGES, PROMPTS)
    for name in ("mps.pt", "mps.safetensors"):
        other = MPS(tmp_path / name, repo[0], CONDITION, device="cpu", dtype="float32", batch_size=3)
        np.testing.assert_allclose(other.score(IMAGES, PROMPTS), expected, atol=1e-5, rtol=0)


class Unrelated:
    """A pickled object that is not a module."""


def test_bad_checkpoints_are_errors(repo, tmp_path):
    torch.save({"weights": Unrelated()}, tmp_path / "odd.pt")
    with pytest.raises(CapoError, match="neither a state dict nor a pickled module"):
        read_checkpoint(tmp_path / "odd.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CapoError, match="weights_only=True"):
        read_checkpoint(tmp_path / "junk.pt")
    sd = dict(repo[2].state_dict())
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CapoError, match="unsupported tensor 'extra.weight'"):
        MPS(tmp_path / "extra.pt", repo[0], device="cpu")
    del sd["cross_model.layers.1.1.fn.attn_out.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(CapoError, match="cross model.*missing.*attn_out"):
        MPS(tmp_path / "missing.pt", repo[0], device="cpu")


def test_stand_ins_run_no_code():
    stub = type("Popen", (PickledObject,), {"pickled_name": "subprocess.Popen"})
    obj = stub("rm", "-rf")
    obj.__setstate__({"x": 1})
    assert obj.args == ("rm", "-rf") and obj.state == {"x": 1}
