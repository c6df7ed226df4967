"""VQAScore with CLIP-FlanT5 (the VQAScore paper's model, ``zhiqiulin/clip-flant5-xxl``), a port of
t2v_metrics' ``CLIPT5Model`` (``t2v_metrics/models/vqascore_models/clip_t5_model.py``) and its
``CLIPT5ForConditionalGeneration`` (``clip_t5/model/language_model/clip_t5.py``) onto transformers'
``T5ForConditionalGeneration`` and ``CLIPVisionModel``.

The model: a FlanT5 encoder-decoder whose encoder input is [embeddings of the tokens before the image
placeholder, the projected image features (CLIP ViT-L/14-336 hidden states of layer -2 without CLS,
through a Linear-GELU-Linear projector), embeddings of the tokens after it]. The prompt ('t5_chat'):
``SYSTEM_MSG + " USER: <image>\\n" + q + " ASSISTANT: "``, each chunk around the placeholder tokenised
with the T5 tokenizer (so each ends with ``</s>``, ``t5_tokenizer_image_token``); the decoder is
teacher-forced on the answer ``tokenizer("Yes")`` = "▁Yes", "</s>", and the score is exp(-mean CE)
over those tokens, the softmax over ``len(tokenizer)`` logits (t2v_metrics resizes the head to the
tokenizer). Images are padded to a square with the CLIP mean colour, then CLIP-preprocessed.

Why a port and not the ``t2v-metrics`` package as an optional extra: its requirements pin
``torch==2.5.1``, ``torchvision==0.20.1``, ``transformers==4.49.0``, ``apex``, ``deepspeed`` and more,
which cannot be installed beside capo's ``torch==2.13.0`` and transformers 5.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from capo.errors import CapoError
from capo.rewards.clip_common import freeze, hub_or_local_file, load_preprocess
from capo.rewards.hub import hub_kwargs
from capo.rewards.vqascore import (
    ANSWER,
    QUESTION_TEMPLATE,
    SYSTEM_MSG,
    AnswerLikelihoodReward,
    expand2square,
    pad_right,
)

CLIP_FLANT5_MODEL = "zhiqiulin/clip-flant5-xxl"
CLIP_FLANT5_TOKENIZER = "google/flan-t5-xxl"


def read_tensors(id_or_dir: str | os.PathLike, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors whose names start with ``prefixes`` from a (sharded) safetensors or torch checkpoint."""
    from safetensors.torch import load_file

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):  # fmt: skip
        try:
            files = sorted(
                set(json.loads(hub_or_local_file(id_or_dir, index).read_text())["weight_map"].values())
            )
        except CapoError:
            files = [single]
        try:
            paths = [hub_or_local_file(id_or_dir, f) for f in files]
        except CapoError:
            continue
        out: dict[str, torch.Tensor] = {}
        for path in paths:
            sd = (
                load_file(path)
                if path.suffix == ".safetensors"
                else torch.load(path, "cpu", weights_only=True)
            )
            out.update({k: v for k, v in sd.items() if k.startswith(prefixes)})
        return out
    raise CapoError(f"'{id_or_dir}': no model.safetensors or pytorch_model.bin (sharded or not)")


class ClipT5(torch.nn.Module):
    """CLIPT5ForConditionalGeneration's parts: ``t5``, ``vision`` (CLIPVisionModel), ``projector``."""

    def __init__(self, t5: Any, vision: Any, projector: torch.nn.Module, select_layer: int):
        super().__init__()
        self.t5, self.vision, self.projector, self.select_layer = t5, vision, projector, select_layer

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, N, D_t5]: projector(hidden_states[select_layer][:, 1:]) (``encode_images``, 'patch')."""
        hidden = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[self.select_layer]
        return self.projector(hidden[:, 1:])


def load_clip_t5(model: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> ClipT5:
    """The checkpoint's T5 (``config.json``, transformers T5 keys), CLIP vision tower and projector
    (keys ``vision_tower.vision_tower.*`` and ``mm_projector.{0,2}.*``; the tower's config from
    ``mm_vision_tower``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    config = json.loads(hub_or_local_file(model, "config.json").read_text())
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CapoError(
            f"'{model}': mm_projector_type {config.get('mm_projector_type')!r} (expected mlp2x_gelu)"
        )
    t5_config = T5Config(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    t5 = T5ForConditionalGeneration.from_pretrained(
        os.fspath(model), config=t5_config, dtype=dtype, **hub_kwargs(model)
    )
    tower = config["mm_vision_tower"]
    vision = CLIPVisionModel(CLIPVisionConfig.from_pretrained(tower, **hub_kwargs(tower)))
    hidden, width = int(config["mm_hidden_size"]), int(config["d_model"])
    projector = torch.nn.Sequential(
        torch.nn.Linear(hidden, width), torch.nn.GELU(), torch.nn.Linear(width, width)
    )
    extra = read_tensors(model, ("vision_tower.vision_tower.", "mm_projector."))
    vision_sd = {
        k.removeprefix("vision_tower.vision_tower."): v for k, v in extra.items() if k.startswith("vision")
    }
    projector.load_state_dict({k.removeprefix("mm_projector."): v for k, v in extra.items()
                               if k.startswith("mm_projector.")})  # fmt: skip
    if not any(k.startswith("vision_model.") for k in vision.state_dict()):  # transformers 5 layout
        vision_sd = {k.removeprefix("vision_model."): v for k, v in vision_sd.items()}
    if vision_sd:
        vision.load_state_dict(vision_sd)
    else:  # the tower is frozen in training: the checkpoint may leave it to mm_vision_tower's weights
        vision = CLIPVisionModel.from_pretrained(tower, **hub_kwargs(tower))
    parts = ClipT5(t5, vision, projector, int(config.get("mm_vision_select_layer", -2)))
    return freeze(parts, device, dtype)


class ClipFlanT5VQAScore(AnswerLikelihoodReward):
    """s(x, c) = exp(mean_k log P(a_k | x, q(c), a_<k)) with CLIP-FlanT5, t2v_metrics' default VQAScore.

    ``model``: hub id or directory of a CLIP-T5 checkpoint (default ``zhiqiulin/clip-flant5-xxl``);
    ``tokenizer``: its T5 tokenizer (default ``google/flan-t5-xxl``, as t2v_metrics). Bradley-Terry
    view as ``VQAScore`` (``AnswerLikelihoodReward``): two answer tokens.
    """

    name = "vqascore-clip-flant5"

    def __init__(
        self,
        model: str | os.PathLike = CLIP_FLANT5_MODEL,
        tokenizer: str | os.PathLike = CLIP_FLANT5_TOKENIZER,
        question_template: str = QUESTION_TEMPLATE,
        answer: str = ANSWER,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 4,
    ):
        from transformers import AutoTokenizer

        self.configure(question_template, answer, device, dtype, batch_size)
        self.model = load_clip_t5(model, self.device, self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer), **hub_kwargs(tokenizer))
        tower = json.loads(hub_or_local_file(model, "config.json").read_text())["mm_vision_tower"]
        self.preprocess = load_preprocess(tower, crop_rounding="floor")  # CLIPImageProcessor
        self.background = tuple(int(x * 255) for x in self.preprocess.mean)

    def encoder_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image (``t5_tokenizer_image_token``: each chunk ends in </s>)."""
        question = self.question_template.format(prompt)
        before, after = f"{SYSTEM_MSG} USER: ", f"\n{question} ASSISTANT: "  # format_question, 't5_chat'
        return self.tokenizer(before)["input_ids"], self.tokenizer(after)["input_ids"]

    @torch.no_grad()
    def answer_mean_log_prob(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """mean_k log softmax(decoder logits_k)[a_k] over the answer tokens, float32 [B]."""
        pixels = self.preprocess([expand2square(im.convert("RGB"), self.background) for im in images])
        features = self.model.encode_images(pixels.to(self.device, self.dtype))  # [B, N, D]
        embed = self.model.t5.get_input_embeddings()
        rows = []
        for b, prompt in enumerate(prompts):
            before, after = (torch.tensor(ids, device=self.device) for ids in self.encoder_ids(prompt))
            rows.append(torch.cat([embed(before), features[b], embed(after)]))
        lengths = [len(r) for r in rows]
        embeds = torch.zeros(
            len(rows), max(lengths), rows[0].shape[-1], dtype=rows[0].dtype, device=self.device
        )
        for b, row in enumerate(rows):
            embeds[b, : len(row)] = row
        mask = pad_right([torch.ones(n, dtype=torch.long) for n in lengths], 0).to(self.device)
        labels = torch.tensor([self.tokenizer(self.answer)["input_ids"]] * len(rows), device=self.device)
        logits = self.model.t5(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits
        log_probs = logits[..., : len(self.tokenizer)].float().log_softmax(dim=-1)  # [B, m, V]
        return log_probs.gather(-1, labels[..., None])[..., 0].mean(dim=-1)
