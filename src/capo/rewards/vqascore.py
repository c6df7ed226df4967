"""VQAScore (Lin et al., 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation")
as t2v_metrics (github.com/linzhiqiu/t2v_metrics) computes it, with a transformers vision-language model.

t2v_metrics asks q(c) = 'Does this figure show "{c}"? Please answer yes or no.' and scores the
answer "Yes" followed by the end-of-sequence token by teacher forcing:

    VQAScore(x, c) = exp(-mean_k CE_k) = (prod_{k=1}^{m} P(a_k | x, q(c), a_<k))^(1/m)

over the m answer tokens (m = 2 for LLaVA-1.5: "▁Yes", "</s>"), i.e. the geometric mean of
P(Yes) and P(</s> | Yes) (``t2v_metrics/models/vqascore_models/llava_model.py``, ``forward``).
capo reproduces its LLaVA-1.5 path (prompt and image handling): the text
``SYSTEM_MSG + " USER: <image>\\n" + q + " ASSISTANT: " + "Yes</s>"``, tokenised chunk by chunk
around the image placeholder as ``tokenizer_image_token`` does, the answer starting where the
tokenised question (less its trailing-space token) ends; images padded to a square with
the image processor's mean colour (``expand2square``) before the CLIP preprocessing; the softmax
over the original LLaVA-1.5 vocabulary (``tokenizer.vocab_size``; llava-hf's padded rows for
``<image>`` and alignment are excluded). Any transformers LLaVA-1.5-family checkpoint whose processor
expands the ``<image>`` placeholder into a fixed number of image tokens works (llava-hf 7B/13B,
ShareGPT4V in llava-hf layout); other VLMs have other prompt formats in t2v_metrics and are not
supported here.

The paper's model, CLIP-FlanT5-XXL, is the reward ``vqascore-clip-flant5`` (capo.rewards.vqascore_t5).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from capo.errors import CapoError
from capo.rewards.base import RewardModel
from capo.rewards.clip_common import freeze, resolve_device, resolve_dtype
from capo.rewards.hub import hub_kwargs

VQASCORE_MODEL = "llava-hf/llava-1.5-7b-hf"
QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER = "Yes"
#: t2v_metrics ``constants.py`` SYSTEM_MSG (LLaVA-1.5's conversation template ``vicuna_v1``).
SYSTEM_MSG = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def load_vlm(model: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(processor, frozen ``AutoModelForImageTextToText``) from a hub id or local directory."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(os.fspath(model), **hub_kwargs(model))
        vlm = AutoModelForImageTextToText.from_pretrained(os.fspath(model), dtype=dtype, **hub_kwargs(model))
    except (OSError, ValueError) as err:
        raise CapoError(f"cannot load vision-language model '{model}': {str(err).splitlines()[0]}") from None
    return processor, freeze(vlm, device, dtype)


def pad_right(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Stack 1-D tensors of different lengths L, right-padded with ``value``: [B, max L]."""
    out = rows[0].new_full((len(rows), max(len(r) for r in rows)), value)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """t2v_metrics / LLaVA ``expand2square``: paste centred (offset (long - short) // 2) on a square."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def tokens_with_image(text: str, tokenizer: Any, placeholder: str, image_ids: list[int]) -> list[int]:
    """t2v_metrics ``tokenizer_image_token``: tokenise each chunk between placeholders (with BOS),
    keep the first chunk's BOS only, and put ``image_ids`` (the expanded image tokens) between chunks."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in text.split(placeholder)]
    offset = int(bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id)
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        ids += (image_ids if i else []) + chunk[offset:]
    return ids


class AnswerLikelihoodReward(RewardModel):
    """s(x, c) = exp(mean_k log P(a_k | x, q(c), a_<k)) in (0, 1): a VQAScore over a vision-language
    model that subclasses load and teacher-force in ``answer_mean_log_prob``.

    Bradley-Terry view (docs/design.md §2.6, paper Eq. 2): for the default two-token answer, s² = P(Yes) ·
    P(</s> | Yes) is the probability that the model answers exactly "Yes"; its log-odds is the
    natural BT logit: sigma(logit s² - logit s'²) is the probability that x is judged to show c and
    x' not, given that exactly one of them is. ``transform = "logit_of_square"``, ``bt_scale = 1``.
    """

    needs_prompt = True
    bt_scale = 1.0
    transform = "logit_of_square"
    higher_is_better = True

    def configure(
        self, question_template: str, answer: str, device: str | torch.device | None,
        dtype: str | torch.dtype, batch_size: int,
    ) -> None:  # fmt: skip
        """Check ``question_template`` (one ``{}``); set question, answer, device, dtype, batch size."""
        if question_template.count("{}") != 1:
            raise CapoError(f"question_template must contain '{{}}' exactly once: {question_template!r}")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.question_template, self.answer, self.batch_size = question_template, answer, batch_size

    @abc.abstractmethod
    def answer_mean_log_prob(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """mean_k log P(a_k | x, q(c), a_<k) over the answer tokens a_k, float32 [B]."""

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """float32 [B]: exp(mean log P(answer tokens)) in (0, 1)."""
        return self.answer_mean_log_prob(images, prompts).exp().cpu().numpy().astype(np.float32)


class VQAScore(AnswerLikelihoodReward):
    """s(x, c) = exp(mean_k log P(a_k | x, q(c), a_<k)) in (0, 1), t2v_metrics' VQAScore.

    ``model``: hub id or local directory of a transformers image-text-to-text model with its
    processor (default ``llava-hf/llava-1.5-7b-hf``). ``question_template``: one ``{}`` (default the
    paper's). ``answer``: default "Yes"; the eos token is appended, as t2v_metrics does. Bradley-Terry
    view: ``AnswerLikelihoodReward``.
    """

    name = "vqascore"

    def __init__(
        self,
        model: str | os.PathLike = VQASCORE_MODEL,
        question_template: str = QUESTION_TEMPLATE,
        answer: str = ANSWER,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 8,
    ):
        self.configure(question_template, answer, device, dtype, batch_size)
        if not answer:
            raise CapoError("answer must not be empty")
        self.processor, self.model = load_vlm(model, self.device, self.dtype)
        tokenizer = self.processor.tokenizer
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id) if t is not None), 0)
        self.pad_id = int(pad)
        self.vocab = int(tokenizer.vocab_size)
        self.image_ids = self.expanded_image_tokens()
        self.background = tuple(int(x * 255) for x in self.processor.image_processor.image_mean)

    def expanded_image_tokens(self) -> list[int]:
        """The processor's expansion of one image placeholder (llava-hf: 576 ``<image>`` ids)."""
        placeholder = self.processor.image_token
        out = self.processor(images=[Image.new("RGB", (64, 64))], text=[placeholder], return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        image_id = self.processor.tokenizer.convert_tokens_to_ids(placeholder)
        return [t for t in ids if t == image_id]

    def question(self, prompt: str) -> str:
        """t2v_metrics ``format_question`` (conversation style 'chat'): system message, USER turn with
        the image placeholder, the question, then " ASSISTANT: " (trailing space included)."""
        question = self.question_template.format(prompt)
        return f"{SYSTEM_MSG} USER: {self.processor.image_token}\n{question} ASSISTANT: "

    def sequence(self, prompt: str) -> tuple[list[int], int]:
        """(token ids of question + answer, index of the first answer token)."""
        question, answer = self.question(prompt), self.answer + self.processor.tokenizer.eos_token
        tok, placeholder = self.processor.tokenizer, self.processor.image_token
        q_ids = tokens_with_image(question, tok, placeholder, self.image_ids)
        full = tokens_with_image(question + answer, tok, placeholder, self.image_ids)
        start = len(q_ids) - int(question.endswith(" "))  # t2v_metrics: "because white space"
        if start >= len(full) or full[:start] != q_ids[:start]:
            raise CapoError(f"answer {self.answer!r} does not tokenise as a continuation of the question")
        return full, start

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B, 3, S, S]: RGB, padded to a square with the mean colour, then the model's processor."""
        rgb = [expand2square(im.convert("RGB"), self.background) for im in images]
        return self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def answer_mean_log_prob(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """mean_k log softmax(z_{t_k - 1})[a_k] over the answer tokens a_k at positions t_k, float32 [B]."""
        seqs = [self.sequence(p) for p in prompts]
        ids = pad_right([torch.tensor(s) for s, _ in seqs], self.pad_id)
        mask = pad_right([torch.ones(len(s), dtype=torch.long) for s, _ in seqs], 0)
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            pixel_values=self.pixels(images).to(self.device, self.dtype), use_cache=False,
        ).logits[..., : self.vocab].float()  # fmt: skip
        log_probs = logits.log_softmax(dim=-1)  # [B, L, V]
        out = []
        for b, (seq, start) in enumerate(seqs):
            t = torch.arange(start, len(seq), device=self.device)
            out.append(log_probs[b, t - 1, ids[b, start : len(seq)].to(self.device)].mean())
        return torch.stack(out)
