"""CLIP-FlanT5 VQAScore on a tiny random CLIP-T5 checkpoint in t2v_metrics' layout (config.json with
``model_type: clip_t5`` and ``mm_*`` fields; T5 weights, ``vision_tower.vision_tower.*`` and
``mm_projector.*`` in model.safetensors; the CLIP tower's config and preprocessor in its own
directory), against a transcription of github.com/linzhiqiu/t2v_metrics:
``clip_t5_model.py`` (``format_question`` 't5_chat' lines 13-20, ``forward`` lines 224-285),
``mm_utils.py`` (``t5_tokenizer_image_token`` lines 164-179, ``expand2square`` lines 128-139) and
``clip_t5/model/language_model/clip_t5.py`` (``prepare_inputs_labels_for_multimodal``,
``encode_images``), with the head cut to the tokenizer as ``load_pretrained_model``'s
``resize_token_embeddings(len(tokenizer))`` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_vqascore import ALPHABET, IGNORE_INDEX, IMAGE_TOKEN_INDEX, QUESTION, SYSTEM_MSG, expand2square
from tiny_clip import PROMPTS, fixed_images, score_one_by_one

from capo.rewards import load_reward
from capo.rewards.vqascore_t5 import ClipFlanT5VQAScore

IMAGES = fixed_images([(336, 336), (300, 200), (200, 300), (61, 37)])
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def t5_tokenizer():
    """A T5-like tokenizer: metaspace BPE, ``</s>`` appended (no BOS), pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=180, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=ALPHABET
    )
    tok.train_from_iterator([SYSTEM_MSG + " USER: " + QUESTION + " ASSISTANT: Yes No"] * 3 + PROMPTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def save_tiny_clip_t5(root) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=336,
            patch_size=28,
        )
    ).eval()
    vision.save_pretrained(root / "tower")
    CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    ).save_pretrained(root / "tower")
    config = T5Config(
        vocab_size=len(tokenizer) + 8,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    t5 = T5ForConditionalGeneration(config).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    tensors = {k: v.clone() for k, v in t5.state_dict().items()}
    prefix = "vision_tower.vision_tower.vision_model."  # transformers 4 names, as in t2v_metrics
    tensors |= {prefix + k.removeprefix("vision_model."): v.clone() for k, v in vision.state_dict().items()}
    tensors |= {f"mm_projector.{k}": v.clone() for k, v in projector.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    tensors = {
        k: torch.randn(v.shape, generator=gen) * (0.3 if v.ndim >= 2 else 0.05) + (v.ndim < 2)
        if v.is_floating_point() and "norm" not in k and "position_ids" not in k
        else v
        for k, v in tensors.items()
    }  # wider than the init: answers depend on image and prompt
    save_file(tensors, root / "model.safetensors")
    fields = {
        "model_type": "clip_t5",
        "mm_vision_tower": str(root / "tower"),
        "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
    }
    (root / "config.json").write_text(json.dumps({**config.to_dict(), **fields}))


# ---- t2v_metrics, transcribed (CLIP-T5 path) ----
def t5_tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):  # mm_utils.py 164-179
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):  # noqa: N803 (the reference's name)
        return [ele for sublist in zip(X, [sep] * len(X), strict=True) for ele in sublist][:-1]

    input_ids = []
    for x in insert_separator(prompt_chunks, [image_token_index]):
        input_ids.extend(x)
    return input_ids


def t2v_clip_t5_score(reward, image, text) -> float:
    """CLIPT5Model.forward for one pair, fp32, with the model's parts as CLIPT5ForConditionalGeneration."""
    qs = SYSTEM_MSG + " USER: " + "<image>" + "\n" + QUESTION.replace("a red cat", text) + " ASSISTANT: "
    input_ids = t5_tokenizer_image_token(qs, reward.tokenizer)
    labels = torch.tensor([t5_tokenizer_image_token("Yes", reward.tokenizer)])
    mean = reward.preprocess.mean
    pixels = reward.preprocess([expand2square(image.convert("RGB"), tuple(int(x * 255) for x in mean))])
    model = reward.model
    with torch.no_grad():
        hidden = model.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = model.projector(hidden)[0]  # encode_images
        at = input_ids.index(IMAGE_TOKEN_INDEX)
        embed = model.t5.get_input_embeddings()
        embeds = torch.cat(
            [embed(torch.tensor(input_ids[:at])), features, embed(torch.tensor(input_ids[at + 1 :]))]
        )
        logits = model.t5(
            inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds)), labels=labels
        ).logits
    logits = logits[0, :, : len(reward.tokenizer)]  # resize_token_embeddings(len(tokenizer))
    loss = torch.nn.CrossEntropyLoss(reduction="mean", ignore_index=IGNORE_INDEX)(logits, labels[0])
    return float((-loss).exp())


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-flant5")
    save_tiny_clip_t5(root)
    return load_reward(
        "vqascore-clip-flant5", model=root, tokenizer=root / "tokenizer", device="cpu", batch_size=3
    )


def test_declares_its_bradley_terry_view(reward):
    assert isinstance(reward, ClipFlanT5VQAScore)
    assert (reward.bt_scale, reward.transform, reward.needs_prompt) == (1.0, "logit_of_square", True)
    assert reward.model.t5.config.vocab_size > len(reward.tokenizer)


def test_scores_equal_t2v_metrics_clip_t5_vqascore(reward):
    scores = reward.score(IMAGES, PROMPTS)
    assert scores.dtype == np.float32 and np.all((scores > 0) & (scores < 1))
    expected = [t2v_clip_t5_score(reward, im, p) for im, p in zip(IMAGES, PROMPTS, strict=True)]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-8)
    assert np.ptp(np.log(scores)) > 1e-2


def test_prompt_chunks_end_with_eos_and_the_answer_is_yes_eos(reward):
    before, after = reward.encoder_ids("a red cat")
    assert before[-1] == after[-1] == 1 and 1 not in before[:-1]
    assert reward.tokenizer.convert_ids_to_tokens(reward.tokenizer("Yes")["input_ids"]) == ["▁Yes", "</s>"]


def test_deterministic_and_batch_invariant(reward):
    first = reward.score(IMAGES, PROMPTS)  # prompts of different lengths: right-padded encoder inputs
    np.testing.assert_array_equal(first, reward.score(IMAGES, PROMPTS))
    np.testing.assert_allclose(first, score_one_by_one(reward, IMAGES, PROMPTS), rtol=1e-5, atol=0)
