"""The official side of bench/reward_parity.py. Runs in the parity venv (torch 2.14.1, torchvision,
transformers 4.49, open_clip, hpsv2, image-reward, t2v-metrics, OpenAI clip), never in capo's
environment, and never imports capo.

For each reward it builds the official model with random weights (reduced width: CPU time on the
shared machine, see docs/rewards.md), scores WORK/images/*.png with WORK/prompts.json through the
official package's own scoring code, and writes the weights in the format capo loads plus
WORK/official.json {reward: [scores]}. Usage: python bench/reward_parity_official.py WORK
"""

from __future__ import annotations

import gzip
import html  # noqa: F401 (open_clip's tokenizer needs it importable)
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
SEED = 0


def widen(module: torch.nn.Module, std: float) -> None:
    """Random weights spread wider than the default init, so scores differ clearly between inputs."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2 and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# ---- the CLIP BPE tokenizer files, from open_clip's bpe_simple_vocab_16e6.txt.gz ----
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP / GPT-2 byte -> printable unicode map (open_clip tokenizer.py)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(n) for n in cs], strict=True))


def write_clip_tokenizer(directory: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json equal to openai/clip-vit-*'s (49408 tokens)."""
    import open_clip

    gz = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "pad_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def write_preprocessor(directory: Path, size: int = 224) -> None:
    config = {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": size,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config))


def hf_clip_config(
    act: str, embed: int = 32, width: int = 64, heads: int = 2, layers: int = 2, vision_heads: int = 2
) -> dict:
    """transformers CLIPConfig fields of the reduced CLIP used for every CLIP-based reward (OpenAI's
    ``clip.model.CLIP`` has width // 64 vision heads: ``vision_heads=1`` for it)."""
    common = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=act,
        layer_norm_eps=1e-5,
    )
    text = dict(
        common,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(common, image_size=224, patch_size=32, num_attention_heads=vision_heads)
    return dict(text_config=text, vision_config=vision, projection_dim=embed, logit_scale_init_value=2.6592)


# ---- PickScore: the model card's code on a transformers CLIPModel ----
def pickscore(work: Path, images, prompts) -> list[float]:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = work / "pickscore"
    write_clip_tokenizer(out)
    write_preprocessor(out)
    torch.manual_seed(SEED)
    model = CLIPModel(CLIPConfig(**hf_clip_config("gelu"))).eval()
    widen(model, 0.1)
    model.save_pretrained(out)
    processor = CLIPProcessor(CLIPImageProcessor.from_pretrained(out), CLIPTokenizer.from_pretrained(out))
    scores = []
    for image, prompt in zip(images, prompts, strict=True):  # huggingface.co/yuvalkirstain/PickScore_v1
        image_inputs = processor(
            images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        text_inputs = processor(
            text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append(float((model.logit_scale.exp() * (text_embs @ image_embs.T)[0])[0]))
    return scores


# ---- HPSv2 / HPSv2.1: the hpsv2 package's open_clip, preprocess_val, tokenizer and score code ----
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def hpsv2(work: Path, images, prompts, version: str) -> list[float]:
    from hpsv2.src.open_clip import create_model_and_transforms, factory, get_tokenizer

    factory._MODEL_CONFIGS["capo-tiny-ViT"] = TINY_OPEN_CLIP  # reduced ViT-H-14 (GELU, as ViT-H-14)
    torch.manual_seed(SEED + (version == "v2.1"))
    model, _, preprocess_val = create_model_and_transforms(
        "capo-tiny-ViT",
        None,
        precision="fp32",
        device="cpu",
        jit=False,
        force_quick_gelu=False,
        force_custom_text=False,
        force_patch_dropout=False,
        force_image_size=None,
        pretrained_image=False,
        image_mean=None,
        image_std=None,
        light_augmentation=True,
        aug_cfg={},
        output_dict=True,
        with_score_predictor=False,
        with_region_predictor=False,
    )  # (img_score.py lines 20-36, model name aside)
    widen(model, 0.1)
    model.eval()
    out = work / f"hpsv2-{version}"
    write_clip_tokenizer(out)
    write_preprocessor(out)
    (out / "config.json").write_text(json.dumps({**hf_clip_config("gelu"), "model_type": "clip"}))
    torch.save({"state_dict": model.state_dict()}, out / "HPS_checkpoint.pt")
    tokenizer = get_tokenizer("ViT-H-14")
    scores = []
    for image, prompt in zip(images, prompts, strict=True):  # img_score.py lines 100-112 (a PIL image)
        with torch.no_grad():
            image = preprocess_val(image).unsqueeze(0)
            text = tokenizer([prompt])
            outputs = model(image, text)
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            logits_per_image = image_features @ text_features.T
            scores.append(float(torch.diagonal(logits_per_image).cpu().numpy()[0]))
    return scores


# ---- ImageReward: the image-reward package's ImageReward class and .score ----
def word_vocab(prompts) -> list[str]:
    words = {w for p in prompts for w in "".join(c if c.isalnum() else " " for c in p.lower()).split()}
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words), *".,:;!?'\"-"]


def imagereward(work: Path, images, prompts) -> list[float]:
    import ImageReward  # noqa: F401 (its __init__ re-exports the class under the submodule's name)
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    out = work / "imagereward"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(word_vocab(prompts)) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(out)

    def init_tokenizer():  # blip.py lines 16-21, from the local vocabulary (bert-base-uncased is on the hub)
        tokenizer = BertTokenizer.from_pretrained(str(out))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        """blip.py lines 24-38 at a reduced width (64, 2 blocks, 4 heads; ViT-L/16 is 1024, 24, 16)."""
        encoder = VisionTransformer(
            img_size=image_size,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=4,
            use_grad_checkpointing=use_grad_checkpointing,
            ckpt_layer=ckpt_layer,
            drop_path_rate=0,
        )
        return encoder, 64

    ir_module = sys.modules["ImageReward.ImageReward"]
    blip_pretrain.init_tokenizer, blip_pretrain.create_vit = init_tokenizer, create_vit
    vocab = len(init_tokenizer())
    med = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab,
        "encoder_width": 64,
        "add_cross_attention": True,
    }
    (out / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(SEED)
    model = ir_module.ImageReward(med_config=str(out / "med_config.json"), device="cpu")
    model.mlp = ir_module.MLP(64)  # ImageReward.py line 78 builds MLP(768) for BERT-base's width
    widen(model, 0.1)
    model.eval()
    torch.save(model.state_dict(), out / "ImageReward.pt")
    return [float(model.score(p, im)) for im, p in zip(images, prompts, strict=True)]


# ---- OpenAI clip models (CLIPScore, LAION aesthetic) ----
def openai_clip(work: Path, name: str, seed: int):
    """A reduced OpenAI ``clip.model.CLIP`` (QuickGELU, as OpenAI's), its weights and a transformers
    repo layout (tokenizer, preprocessor, config) written to WORK/NAME for capo."""
    from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=32,
        image_resolution=224,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=2,
        transformer_layers=2,
    ).eval()
    widen(model, 0.1)
    out = work / name
    write_clip_tokenizer(out)
    write_preprocessor(out)
    (out / "config.json").write_text(
        json.dumps({**hf_clip_config("quick_gelu", vision_heads=1), "model_type": "clip"})
    )
    torch.save(model.state_dict(), out / "openai_clip.pt")
    return model


def clipscore(work: Path, image_paths, prompts) -> list[float]:
    """jmhessel/clipscore clipscore.py (commit 1036465) lines 66-158: CLIPCapDataset, CLIPImageDataset,
    extract_all_*, get_clip_score, written out without the DataLoader."""
    import clip
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

    model = openai_clip(work, "clipscore", SEED)
    prefix = "A photo depicts "  # lines 67-71
    preprocess = Compose(
        [
            Resize(224, interpolation=Image.BICUBIC),
            CenterCrop(224),
            lambda image: image.convert("RGB"),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )  # (lines 88-95)
    with torch.no_grad():
        images = np.vstack([model.encode_image(preprocess(Image.open(p))[None]).numpy() for p in image_paths])
        texts = np.vstack(
            [model.encode_text(clip.tokenize(prefix + c, truncate=True)).numpy() for c in prompts]
        )
    images = images / np.sqrt(np.sum(images**2, axis=1, keepdims=True))  # lines 155-156 (numpy >= 1.21)
    texts = texts / np.sqrt(np.sum(texts**2, axis=1, keepdims=True))
    return [float(s) for s in 2.5 * np.clip(np.sum(images * texts, axis=1), 0, None)]


def laion_aesthetic(work: Path, image_paths) -> list[float]:
    """christophschuhmann/improved-aesthetic-predictor simple_inference.py (commit 6934dd8): MLP lines
    40-64 (as an nn.Module: its LightningModule parts are training only), normalized lines 84-89,
    inference lines 96-117 with clip.load's preprocessing (``clip.clip._transform``)."""
    from clip.clip import _transform
    from PIL import Image
    from torch import nn

    class MLP(nn.Module):
        def __init__(self, input_size):
            super().__init__()
            self.input_size = input_size
            self.layers = nn.Sequential(
                nn.Linear(self.input_size, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    def normalized(a, axis=-1, order=2):
        l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
        l2[l2 == 0] = 1
        return a / np.expand_dims(l2, axis)

    model2 = openai_clip(work, "laion-aesthetic", SEED + 1)
    torch.manual_seed(SEED)
    model = MLP(32).eval()  # 768 for ViT-L/14; 32 is the reduced CLIP's embedding
    widen(model, 0.2)
    torch.save(model.state_dict(), work / "laion-aesthetic" / "aesthetic-head.pth")
    preprocess = _transform(224)
    scores = []
    for path in image_paths:
        image = preprocess(Image.open(path)).unsqueeze(0)
        with torch.no_grad():
            image_features = model2.encode_image(image)
        im_emb_arr = normalized(image_features.cpu().detach().numpy())
        scores.append(float(model(torch.from_numpy(im_emb_arr).type(torch.FloatTensor))[0, 0]))
    return scores


# ---- VQAScore, LLaVA-1.5: t2v_metrics' LLaVAModel on a reduced LLaVA-1.5 ----
def import_t2v_llava():
    """t2v_metrics' llava_model module, from the installed package's files. The package __init__
    (and vqascore_models/__init__) import every model family, and the LLaVA-OneVision one needs the
    ``llava`` package of LLaVA-NeXT's git repository, which is not on PyPI: the three package
    modules are registered with their real paths without running their __init__ files."""
    if "t2v_metrics" not in sys.modules:
        root = Path(importlib.util.find_spec("t2v_metrics").submodule_search_locations[0])
        for name, sub in [
            ("t2v_metrics", ""),
            ("t2v_metrics.models", "models"),
            ("t2v_metrics.models.vqascore_models", "models/vqascore_models"),
        ]:
            module = types.ModuleType(name)
            module.__path__ = [str(root / sub)]
            sys.modules[name] = module
    from t2v_metrics.models.vqascore_models import llava_model

    return llava_model


def llama_tokenizer(directory: Path, prompts) -> None:
    """A sentencepiece BPE model with Llama's settings (byte fallback, identity normalisation, extra
    whitespace kept, dummy prefix; UNK 0, BOS 1, EOS 2) trained on the prompt text, saved as the slow
    LlamaTokenizer LLaVA-1.5 uses (``use_fast=False``; ``legacy=False`` as vicuna-7b-v1.5's config)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    llava_model = import_t2v_llava()
    text = [
        llava_model.format_question(llava_model.default_question_template.format(p)) + "Yes No"
        for p in prompts
    ]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(text * 4 + list(prompts)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        add_dummy_prefix=True,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    tokenizer = LlamaTokenizer(
        str(directory / "tokenizer.model"), legacy=False, model_max_length=2048, padding_side="right"
    )
    tokenizer.save_pretrained(directory)


def vqascore_llava(work: Path, image_paths, prompts) -> list[float]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    llava_model = import_t2v_llava()
    from t2v_metrics.models.vqascore_models.llava.model import LlavaConfig, LlavaLlamaForCausalLM

    out, tower = work / "vqascore-llava", work / "vqascore-llava" / "vision-tower"
    tower.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)  # reduced openai/clip-vit-large-patch14-336: width 64, 3 layers, patch 28
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=336,
            patch_size=28,
            hidden_act="quick_gelu",
            projection_dim=32,
        )
    )
    widen(vision, 0.1)
    vision.save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(
        tower
    )
    llama_tokenizer(out, prompts)
    config = LlavaConfig(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        mm_vision_tower=str(tower),
        mm_hidden_size=64,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
    )
    llava = LlavaLlamaForCausalLM(config)
    widen(llava, 0.25)
    llava.save_pretrained(out)
    # llava_model.py lines 53-62 point at the hub; the same entry, pointed at the local model:
    llava_model.LLAVA_MODELS["llava-v1.5-7b"] = {
        "tokenizer": {"path": str(out)},
        "model": {"path": str(out), "conversation": "chat", "image_aspect_ratio": "pad"},
    }
    scorer = llava_model.LLaVAModel("llava-v1.5-7b", device="cpu", cache_dir=str(work / "hf-cache"))
    # load_pretrained_model casts the model to bfloat16 (mm_utils.py line 228), RoPE's inv_freq buffer
    # included: back to float32 for the fp32 comparison, inv_freq recomputed in float32 (the weights
    # keep their bfloat16 rounding, and capo gets those same weights)
    scorer.model.float()
    for module in scorer.model.modules():
        if hasattr(module, "rope_init_fn"):
            module.inv_freq, _ = module.rope_init_fn(module.config, "cpu")
            module.original_inv_freq = module.inv_freq
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in scorer.model.state_dict().items()}, out / "llava-original.safetensors"
    )
    from transformers import LlamaTokenizerFast

    fast = LlamaTokenizerFast.from_pretrained(out, from_slow=True, legacy=False)
    fast.save_pretrained(out / "fast-tokenizer")
    scores = []
    for path, prompt in zip(image_paths, prompts, strict=True):
        scores.append(float(scorer.forward([str(path)], [prompt])[0]))
    return scores


# ---- VQAScore, CLIP-FlanT5: t2v_metrics' CLIPT5Model on a reduced CLIP-T5 ----
def t5_tokenizer(directory: Path, prompts) -> None:
    """A sentencepiece unigram model with T5's ids (pad 0, eos 1, unk 2, no BOS; default
    normalisation, as T5's), saved as the slow T5Tokenizer (100 extra ids, as flan-t5-xxl's)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    llava_model = import_t2v_llava()
    text = [
        llava_model.format_question(llava_model.default_question_template.format(p)) + "Yes No"
        for p in prompts
    ]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(text * 4 + list(prompts)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "spiece"),
        vocab_size=140,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    T5Tokenizer(str(directory / "spiece.model"), model_max_length=2048).save_pretrained(directory)


def vqascore_clip_t5(work: Path, image_paths, prompts) -> list[float]:
    from safetensors.torch import save_file
    from transformers import T5TokenizerFast

    llava_model = import_t2v_llava()  # registers the t2v_metrics packages without their __init__
    from t2v_metrics.models.vqascore_models import clip_t5_model
    from t2v_metrics.models.vqascore_models.clip_t5.model import CLIPT5ForConditionalGeneration
    from t2v_metrics.models.vqascore_models.clip_t5.model.language_model.clip_t5 import CLIPT5Config

    del llava_model
    out = work / "vqascore-clip-t5"
    tower = work / "vqascore-llava" / "vision-tower"  # the reduced CLIP ViT-L/14-336 of the LLaVA case
    out.mkdir(parents=True, exist_ok=True)
    t5_tokenizer(out, prompts)
    n_tok = len(T5Tokenizer_len(out))
    config = CLIPT5Config(
        vocab_size=n_tok + 28,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        mm_vision_tower=str(tower),
        mm_hidden_size=64,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
    )
    torch.manual_seed(SEED)
    model = CLIPT5ForConditionalGeneration(config)
    widen(model, 0.3)
    model.save_pretrained(out / "official", safe_serialization=False)  # embed_tokens aliases shared
    clip_t5_model.CLIP_T5_MODELS[
        "clip-flant5-xxl"
    ] = {  # clip_t5_model.py lines 30-40, pointed at the local model
        "tokenizer": {"path": str(out), "model_max_length": 2048},
        "model": {"path": str(out / "official"), "conversation": "t5_chat", "image_aspect_ratio": "pad"},
    }
    scorer = clip_t5_model.CLIPT5Model("clip-flant5-xxl", device="cpu", cache_dir=str(work / "hf-cache"))
    scorer.model.float()  # load_pretrained_model casts to bfloat16; T5 has no RoPE buffer to recompute
    gen = torch.Generator().manual_seed(SEED)
    tensors = {}
    for key, value in scorer.model.state_dict().items():  # head cut to the tokenizer by t2v: pad it back
        rows = n_tok + 28 - value.shape[0] if key in ("shared.weight", "lm_head.weight") else 0
        extra = torch.randn((rows, *value.shape[1:]), generator=gen) * 0.3
        tensors[key] = torch.cat([value, extra]).contiguous() if rows else value.contiguous().clone()
    tensors.pop("encoder.embed_tokens.weight", None)
    tensors.pop("decoder.embed_tokens.weight", None)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "vocab_size": n_tok + 28}))
    T5TokenizerFast.from_pretrained(out, from_slow=True).save_pretrained(out / "fast-tokenizer")
    return [float(scorer.forward([str(p)], [q])[0]) for p, q in zip(image_paths, prompts, strict=True)]


def T5Tokenizer_len(directory: Path):  # noqa: N802
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(directory)


def main() -> None:
    work = Path(sys.argv[1])
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None  # "-": none
    from PIL import Image

    image_paths = sorted((work / "images").glob("*.png"))
    images = [Image.open(p).convert("RGB") for p in image_paths]
    prompts = json.loads((work / "prompts.json").read_text())
    jobs = {
        "pickscore": lambda: pickscore(work, images, prompts),
        "hpsv2": lambda: hpsv2(work, images, prompts, "v2"),
        "hpsv2.1": lambda: hpsv2(work, images, prompts, "v2.1"),
        "imagereward": lambda: imagereward(work, images, prompts),
        "clipscore": lambda: clipscore(work, image_paths, prompts),
        "laion-aesthetic": lambda: laion_aesthetic(work, image_paths),
        "vqascore": lambda: vqascore_llava(work, image_paths, prompts),
        "vqascore-clip-flant5": lambda: vqascore_clip_t5(work, image_paths, prompts),
    }
    write_clip_tokenizer(work / "clip-tokenizer")
    write_preprocessor(work / "clip-tokenizer")
    results_path = work / "official.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, job in jobs.items():
        if only is None or name in only:
            results[name] = job()
            print(f"official {name}: done", flush=True)
            results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
