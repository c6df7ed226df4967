"""VQAScore on a tiny random LLaVA saved like a llava-hf repo (config + safetensors, a Llama-like
BPE fast tokenizer trained here with ``tokenizers``, CLIPImageProcessor at 336 px, LlavaProcessor)
and loaded through AutoProcessor / AutoModelForImageTextToText, as a real one is.

The expected scores are t2v_metrics' LLaVA-1.5 VQAScore, transcribed from
github.com/linzhiqiu/t2v_metrics (``t2v_metrics/models/vqascore_models/llava_model.py``
``format_question`` / ``format_answer`` lines 13-37 and ``forward`` lines 223-302; ``mm_utils.py``
``expand2square`` lines 128-139 and ``tokenizer_image_token`` lines 142-161; ``constants.py``
SYSTEM_MSG, IGNORE_INDEX, IMAGE_TOKEN_INDEX), with the original model's
``prepare_inputs_labels_for_multimodal`` (the image placeholder replaced by the image features,
labelled IGNORE_INDEX) written as the llava-hf model's expanded ``<image>`` tokens, and the original
32000-row head as the first ``tokenizer.vocab_size`` rows of the padded llava-hf head.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_clip import PROMPTS, fixed_images, score_one_by_one

from capo.errors import CapoError
from capo.rewards import load_reward
from capo.rewards.vqascore import QUESTION_TEMPLATE, VQAScore

IMAGES = fixed_images([(336, 336), (300, 200), (200, 300), (61, 37)])
ALPHABET = list("\n▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:?\"'")
IGNORE_INDEX, IMAGE_TOKEN_INDEX = -100, -200  # t2v_metrics constants.py
SYSTEM_MSG = (  # t2v_metrics constants.py
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QUESTION = 'Does this figure show "a red cat"? Please answer yes or no.'
CORPUS = [SYSTEM_MSG + " USER: " + QUESTION + " ASSISTANT: Yes No"] * 3 + PROMPTS


#: llava-hf/llava-1.5-*-hf's chat template (without its assistant-turn branch); t2v_metrics does not
#: use it, and neither does capo's VQAScore since issue 11, but llava-hf repos ship it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_tokenizer():
    """A Llama-like BPE tokenizer (metaspace words, BOS prepended, ``</s>`` special in text), base
    vocabulary 200; ``<image>`` and ``<pad>`` added after it, as in llava-hf's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, initial_alphabet=ALPHABET)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    return out


def save_tiny_llava(directory, seed: int = 0) -> None:
    """A llava-1.5-like repo: CLIP vision tower (336 px, patch 28, 2 layers), 2-layer Llama whose head
    has 4 padded rows past the tokenizer (as llava-hf's 32064 for 32000 + <image> + <pad>), processor."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    tokenizer = tiny_tokenizer()
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=28,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(directory)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=336,
        patch_size=28, projection_dim=16,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # wider than the 0.02 init, so that answers depend clearly on image and prompt
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.25 if "embed" not in name else 1.0)
    model.save_pretrained(directory)


# ---- t2v_metrics, transcribed ----
def expand2square(pil_img, background_color):  # mm_utils.py lines 128-139
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


# mm_utils.py lines 142-161
def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):  # noqa: N803 (the reference's name)
        return [ele for sublist in zip(X, [sep] * len(X), strict=True) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def t2v_llava_score(model, processor, image, text) -> float:
    """llava_model.py ``LLaVAModel.forward`` (lines 223-302) for one (image, text) pair, in fp32."""
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    question = QUESTION_TEMPLATE.format(text)
    qs = SYSTEM_MSG + " USER: " + "<image>" + "\n" + question + " ASSISTANT: "  # format_question, 'chat'
    ans = "Yes" + "</s>"  # format_answer, 'chat'
    image = expand2square(image.convert("RGB"), tuple(int(x * 255) for x in image_processor.image_mean))
    pixel_values = image_processor(image, return_tensors="pt")["pixel_values"]
    input_ids = tokenizer_image_token(qs + ans, tokenizer)
    labels = copy.deepcopy(input_ids)
    tokenized_len = len(tokenizer_image_token(qs, tokenizer))
    if qs[-1] == " ":
        tokenized_len -= 1  # because white space
    labels[:tokenized_len] = [IGNORE_INDEX] * tokenized_len
    # prepare_inputs_labels_for_multimodal: the placeholder becomes the image features, labels IGNORE
    expanded = processor(images=[image], text=["<image>"], return_tensors="pt")["input_ids"]
    n_image = (expanded == model.config.image_token_id).sum()
    at = input_ids.index(IMAGE_TOKEN_INDEX)
    input_ids = input_ids[:at] + [model.config.image_token_id] * int(n_image) + input_ids[at + 1 :]
    labels = labels[:at] + [IGNORE_INDEX] * int(n_image) + labels[at + 1 :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids]), pixel_values=pixel_values).logits[0]
    logits = logits[:, : tokenizer.vocab_size]  # the original LLaVA-1.5 head: the unpadded vocabulary
    shift_logits, shift_labels = logits[:-1, :], torch.tensor(labels[1:])
    loss = torch.nn.CrossEntropyLoss(reduction="mean")(shift_logits, shift_labels)
    return float((-loss).exp())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqascore") / "llava"
    save_tiny_llava(root)
    return root


@pytest.fixture(scope="module")
def reward(repo):
    return load_reward("vqascore", model=repo, device="cpu", batch_size=3)


def test_declares_its_bradley_terry_view(reward):
    assert isinstance(reward, VQAScore)
    assert (reward.name, reward.bt_scale, reward.transform, reward.needs_prompt) == (
        "vqascore",
        1.0,
        "logit_of_square",
        True,
    )
    assert reward.model.dtype == torch.float32 and not reward.model.training
    assert QUESTION_TEMPLATE == 'Does this figure show "{}"? Please answer yes or no.'


def test_scores_equal_t2v_metrics_llava_vqascore(reward):
    """exp(-mean CE) over "Yes", "</s>" after t2v_metrics' prompt, on pad-to-square images. Fails on
    capo before issue 11 (P("Yes") alone, llava-hf chat template, centre crop)."""
    scores = reward.score(IMAGES, PROMPTS)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert np.all((scores > 0) & (scores < 1))
    expected = [
        t2v_llava_score(reward.model, reward.processor, im, p) for im, p in zip(IMAGES, PROMPTS, strict=True)
    ]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    assert np.ptp(np.log(scores)) > 1e-2


def test_prompt_answer_tokens_and_vocabulary(reward):
    ids, start = reward.sequence("a red cat")
    tokenizer = reward.processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(ids[start:]) == ["▁Yes", "</s>"]
    text = tokenizer.decode([t for t in ids[:start] if t != reward.model.config.image_token_id])
    assert text.startswith("<s> " + SYSTEM_MSG + " USER:") and text.endswith(QUESTION + " ASSISTANT:")
    assert len(reward.image_ids) == 144  # (336 / 28)^2 patches, CLS dropped
    assert reward.vocab == tokenizer.vocab_size == 200 < reward.model.config.text_config.vocab_size


def test_images_are_padded_to_a_square_with_the_mean_colour(reward):
    processor = reward.processor.image_processor
    mean = tuple(int(x * 255) for x in processor.image_mean)
    expected = processor([expand2square(im.convert("RGB"), mean) for im in IMAGES], return_tensors="pt")
    np.testing.assert_allclose(reward.pixels(IMAGES).numpy(), expected["pixel_values"].numpy(), atol=1e-6)
    cropped = processor(IMAGES[1:2], return_tensors="pt")["pixel_values"].numpy()
    assert np.abs(reward.pixels(IMAGES[1:2]).numpy() - cropped).max() > 0.1


def test_deterministic_and_batch_invariant(reward):
    first = reward.score(IMAGES, PROMPTS)  # prompts of 1 to 6 words: ragged, right-padded
    np.testing.assert_array_equal(first, reward.score(IMAGES, PROMPTS))
    np.testing.assert_allclose(first, score_one_by_one(reward, IMAGES, PROMPTS), rtol=1e-5, atol=0)


def test_bad_options_are_errors(repo, tmp_path):
    with pytest.raises(CapoError, match="exactly once"):
        VQAScore(repo, question_template="Is this {}? Or {}?", device="cpu")
    with pytest.raises(CapoError, match="must not be empty"):
        VQAScore(repo, answer="", device="cpu")
    with pytest.raises(CapoError, match="cannot load vision-language model"):
        VQAScore(tmp_path / "missing", device="cpu")
