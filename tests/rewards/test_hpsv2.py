"""HPSv2 / HPSv2.1 from an open_clip-layout checkpoint {'state_dict': ...} of a tiny random CLIP,
and the open_clip -> transformers conversion and checkpoint loading of clip_common."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_clip import (
    PROMPTS,
    clip_to_open_clip,
    direct_features,
    fixed_images,
    hpsv2_tensor_reference,
    resize_max_size_reference,
    save_tiny_clip,
    score_one_by_one,
    tiny_clip_model,
)

from capo.errors import CapoError
from capo.rewards import load_reward
from capo.rewards.clip_common import load_state_dict_file, open_clip_to_transformers, resolve_file
from capo.rewards.hpsv2 import HPSv2, HPSv21

IMAGES = fixed_images([(256, 256), (300, 200), (200, 300), (61, 37)])


def _layer_norm(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def _open_clip_tower(x: torch.Tensor, sd: dict, prefix: str, heads: int, mask) -> torch.Tensor:
    """open_clip ``Transformer``: x += attn(ln_1(x)) with nn.MultiheadAttention; x += mlp(ln_2(x))."""
    width = x.shape[-1]
    i = 0
    while f"{prefix}.{i}.ln_1.weight" in sd:
        p = f"{prefix}.{i}."
        h = _layer_norm(x, sd, p + "ln_1").transpose(0, 1)  # LND, as open_clip
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"],
            None, None, False, 0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
            training=False, need_weights=False, attn_mask=mask,
        )  # fmt: skip
        x = x + attn.transpose(0, 1)
        h = _layer_norm(x, sd, p + "ln_2")
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    return x


def open_clip_features(sd: dict, pixels: torch.Tensor, text: torch.Tensor, heads: int = 4, patch: int = 32):
    """open_clip ``CLIP.encode_image`` / ``encode_text`` (normalised) written against the open_clip
    state dict: conv1 patches + class token + positions, ln_pre, blocks, ln_post(token 0) @ proj;
    token + positions, causal blocks, ln_final, token at argmax(text) (the EOT id) @ text_projection."""
    with torch.no_grad():
        x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
        cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
        x = _layer_norm(x, sd, "visual.ln_pre")
        x = _open_clip_tower(x, sd, "visual.transformer.resblocks", heads, None)
        image = _layer_norm(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]
        n = text.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)
        t = sd["token_embedding.weight"][text] + sd["positional_embedding"][:n]
        t = _layer_norm(_open_clip_tower(t, sd, "transformer.resblocks", heads, causal), sd, "ln_final")
        words = t[torch.arange(t.shape[0]), text.argmax(dim=-1)] @ sd["text_projection"]
    return F.normalize(image, dim=-1), F.normalize(words, dim=-1)


def open_clip_tokens(tokenizer, prompts: list[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's tokenize(): [SOT] + BPE ids + [EOT], zero-padded to the context length."""
    ids = tokenizer(prompts)["input_ids"]
    out = torch.zeros(len(ids), context_length, dtype=torch.long)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = torch.tensor(seq)
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """(config dir with tokenizer, checkpoint .pt, the CLIPModel the checkpoint holds)."""
    root = tmp_path_factory.mktemp("hpsv2")
    save_tiny_clip(root / "vit", seed=0)  # config + tokenizer; its own weights are not used
    model = tiny_clip_model(seed=1)
    checkpoint = root / "HPS_v2_compressed.pt"
    torch.save({"state_dict": collections.OrderedDict(clip_to_open_clip(model))}, checkpoint)
    return root / "vit", checkpoint, model


@pytest.fixture(scope="module")
def reward(repo):
    return load_reward("hpsv2", checkpoint=repo[1], config=repo[0], device="cpu", batch_size=3)


def test_conversion_round_trips_every_tensor():
    model = tiny_clip_model(seed=2)
    converted = open_clip_to_transformers({**clip_to_open_clip(model), "attn_mask": torch.zeros(77, 77)})
    original = model.state_dict()
    assert set(converted) == {k for k in original if not k.endswith("position_ids")}
    for key, value in converted.items():
        torch.testing.assert_close(value, original[key], atol=0, rtol=0, msg=key)


def test_conversion_rejects_unknown_tensors():
    with pytest.raises(CapoError, match="visual.attnpool.k_proj.weight"):
        open_clip_to_transformers({"visual.attnpool.k_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(CapoError, match="ls_1.gamma"):
        open_clip_to_transformers({"transformer.resblocks.0.ls_1.gamma": torch.zeros(2)})


def test_declares_its_bradley_terry_view(reward):
    assert isinstance(reward, HPSv2) and not isinstance(reward, HPSv21)
    view = (reward.name, reward.bt_scale, reward.transform, reward.needs_prompt)
    assert view == ("hpsv2", 100.0, "identity", True)
    assert HPSv2.default_checkpoint == "hf://xswu/HPSv2/HPS_v2_compressed.pt"
    assert HPSv21.default_checkpoint == "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"
    assert reward.encoder.model.dtype == torch.float32 and not reward.encoder.model.training


def test_preprocessing_is_hpsv2s_tensor_pipeline(reward):
    """ToTensor first, then the antialiased bicubic resize of the float tensor, pad, normalise; the
    PIL-first order (resize the uint8 image, capo before issue 11) differs by uint8 rounding."""
    ours = reward.encoder.preprocess(IMAGES).numpy()
    expected = np.stack([hpsv2_tensor_reference(im) for im in IMAGES])
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    pil_first = np.stack([resize_max_size_reference(im) for im in IMAGES])
    assert np.abs(ours - pil_first).max() > 1e-3


def test_antialias_option(repo):
    plain = HPSv2(repo[1], repo[0], device="cpu", antialias=False)
    expected = np.stack([hpsv2_tensor_reference(im, antialias=False) for im in IMAGES])
    np.testing.assert_allclose(plain.encoder.preprocess(IMAGES).numpy(), expected, atol=1e-5, rtol=0)


def test_scores_equal_cosine_of_the_checkpoint_model(repo, reward):
    tokens = reward.encoder.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    pixels = torch.from_numpy(np.stack([hpsv2_tensor_reference(im) for im in IMAGES])).float()
    e_img, e_txt = direct_features(repo[2], pixels, tokens["input_ids"], tokens["attention_mask"])
    scores = reward.score(IMAGES, PROMPTS)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    np.testing.assert_allclose(scores, (e_img * e_txt).sum(-1).numpy(), atol=1e-5, rtol=0)
    assert np.ptp(scores) > 1e-3


def test_scores_equal_an_open_clip_forward_of_the_checkpoint(repo, reward):
    """Architecture check: transformers' CLIPModel with converted weights == open_clip's maths."""
    sd = {k: v.float() for k, v in torch.load(repo[1], weights_only=True)["state_dict"].items()}
    pixels = torch.from_numpy(np.stack([hpsv2_tensor_reference(im) for im in IMAGES])).float()
    e_img, e_txt = open_clip_features(sd, pixels, open_clip_tokens(reward.encoder.tokenizer, PROMPTS))
    expected = (e_img * e_txt).sum(-1).numpy()
    np.testing.assert_allclose(reward.score(IMAGES, PROMPTS), expected, atol=1e-5, rtol=0)


def test_deterministic_and_batch_invariant(reward):
    first = reward.score(IMAGES, PROMPTS)
    np.testing.assert_array_equal(first, reward.score(IMAGES, PROMPTS))
    one_by_one = score_one_by_one(reward, IMAGES, PROMPTS)
    np.testing.assert_allclose(first, one_by_one, atol=1e-5, rtol=0)


def test_hpsv21_fp16_and_safetensors_checkpoints_load_the_same_model(repo, reward, tmp_path):
    half = {k: v.half() for k, v in clip_to_open_clip(repo[2]).items()}
    torch.save({"state_dict": half, "epoch": 3}, tmp_path / "HPS_v2.1_compressed.pt")
    save_file({k: v.float().contiguous() for k, v in half.items()}, tmp_path / "hps.safetensors")
    v21 = load_reward("hpsv2.1", checkpoint=tmp_path / "HPS_v2.1_compressed.pt", config=repo[0], device="cpu")
    flat = HPSv2(checkpoint=tmp_path / "hps.safetensors", config=repo[0], device="cpu")
    assert isinstance(v21, HPSv21) and v21.name == "hpsv2.1"
    assert v21.encoder.model.dtype == torch.float32
    np.testing.assert_array_equal(v21.score(IMAGES, PROMPTS), flat.score(IMAGES, PROMPTS))
    np.testing.assert_allclose(v21.score(IMAGES, PROMPTS), reward.score(IMAGES, PROMPTS), atol=2e-2)


def test_checkpoint_of_another_architecture_is_an_error(repo, tmp_path):
    torch.save({"state_dict": clip_to_open_clip(tiny_clip_model(projection_dim=8))}, tmp_path / "other.pt")
    with pytest.raises(CapoError, match="does not fit the CLIP config"):
        HPSv2(checkpoint=tmp_path / "other.pt", config=repo[0], device="cpu")


class TrainingArgs:
    """An arbitrary pickled object, which torch.load(weights_only=True) must refuse to build."""


def test_checkpoint_loading_rules(tmp_path):
    torch.save({"module.logit_scale": torch.ones(())}, tmp_path / "ddp.pt")
    assert list(load_state_dict_file(tmp_path / "ddp.pt")) == ["logit_scale"]
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": TrainingArgs()}, tmp_path / "pickled.pt")
    with pytest.raises(CapoError, match="weights_only=True"):
        load_state_dict_file(tmp_path / "pickled.pt")
    torch.save({"state_dict": {"w": [1, 2]}}, tmp_path / "lists.pt")
    with pytest.raises(CapoError, match="state dict of tensors"):
        load_state_dict_file(tmp_path / "lists.pt")
    with pytest.raises(CapoError, match="not found"):
        resolve_file(tmp_path / "missing.pt")
    with pytest.raises(CapoError, match="hf://OWNER/REPO"):
        resolve_file("hf://xswu/HPSv2")


def test_unreachable_hub_file_is_a_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    with pytest.raises(CapoError, match="cannot fetch 'HPS_v2.1_compressed.pt' from hub repo 'xswu/HPSv2'"):
        resolve_file(HPSv21.default_checkpoint)
