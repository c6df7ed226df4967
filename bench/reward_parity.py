"""Reward parity: capo's rewards against the official packages, on identical random weights.

    python bench/reward_parity.py [--venv DIR] [--work DIR] [--only pickscore,mps,...]

1. Creates (once) a virtual environment outside the repository (default ``~/.cache/capo/venv-parity``;
   ``--venv``) with the official packages from PyPI: ``hpsv2``, ``image-reward``, ``t2v-metrics``,
   ``open-clip-torch``, OpenAI ``clip`` (``openai-clip``) and transformers 4.49 for PickScore's model
   card code, on ``torch==2.14.1`` + ``torchvision==0.29.1`` (``VENV_PACKAGES``).
2. Writes 16 images (several sizes and aspect ratios) and 16 prompts to the work directory.
3. Runs ``bench/reward_parity_official.py`` in that venv: each official model is built with random
   weights at a reduced width (offline, no hub), scores the images through the package's own code,
   and its weights are written in the format capo loads.
4. Here, in capo's environment: loads those weights through capo's reward loaders, scores the same
   images and prompts, and prints the max absolute difference per reward (fp32). MPS (not on PyPI)
   is compared with the transcription of its official code in tests/rewards/test_mps.py.

Not part of the test suite (minutes of CPU, a 6 GB venv). Figures: docs/rewards.md, "Parity".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capo.rewards import load_reward

ROOT = Path(__file__).resolve().parents[1]
#: what the venv gets (pip, in this order); ``--no-deps`` for the three official packages, whose
#: pinned requirements (t2v-metrics: torch==2.5.1, apex, deepspeed, ...) cannot be met together.
VENV_PACKAGES = [
    ["torch==2.14.1", "torchvision==0.29.1"],
    [
        "open-clip-torch==3.3.0",
        "transformers==4.49.0",
        "huggingface-hub>=0.26,<1.0",
        "timm",
        "ftfy",
        "regex",
        "einops",
        "fairscale",
        "sentencepiece",
        "protobuf",
        "accelerate",
        "safetensors",
        "clint",
        "openai-clip",
        "opencv-python-headless",
        "setuptools<80",
        "omegaconf",
        "iopath",
        "einops-exts",
        "datasets<4",
        "pandas",
        "diffusers==0.33.1",
        "openai",
        "tiktoken",
        "decord",
    ],
    ["--no-deps", "hpsv2==1.2.0", "image-reward==1.5", "t2v-metrics==3.0"],
]
SIZES = [
    (224, 224),
    (256, 256),
    (512, 512),
    (300, 200),
    (200, 300),
    (640, 360),
    (360, 640),
    (1024, 768),
    (77, 53),
    (512, 128),
    (128, 512),
    (333, 333),
    (225, 224),
    (223, 301),
    (400, 100),
    (61, 37),
]
PROMPTS = [
    "a red cat sitting on a blue mat",
    "two dogs playing in the snow",
    "a photo of a green apple",
    "an astronaut riding a horse on the moon",
    "a bowl of soup next to a spoon",
    "three yellow balloons",
    "a city street at night with neon lights",
    "a watercolor painting of a lighthouse",
    "a small wooden boat on a calm lake",
    "a plate with a slice of cake",
    "a close-up of a sunflower",
    "a cat and a dog sleeping together",
    "a blue car parked beside a tree",
    "a mountain covered in snow",
    "a cup of coffee on a wooden table",
    "an old man reading a newspaper",
]


def make_inputs(work: Path) -> tuple[list[Path], list[str]]:
    """16 deterministic RGB PNGs (gradients, noise and a disc; sizes ``SIZES``) and ``PROMPTS``."""
    (work / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack(
            [255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), 64 + 128 * ((xx + yy) % 7 == 0)], -1
        )
        disc = (xx - w * rng.uniform(0.3, 0.7)) ** 2 + (yy - h * rng.uniform(0.3, 0.7)) ** 2 < (
            min(w, h) / 4
        ) ** 2
        base[disc] = rng.uniform(0, 255, 3)
        array = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        paths.append(work / "images" / f"{i:02d}_{w}x{h}.png")
        Image.fromarray(array, "RGB").save(paths[-1])
    (work / "prompts.json").write_text(json.dumps(PROMPTS))
    return paths, PROMPTS


def ensure_venv(venv: Path) -> Path:
    """The venv's python, creating the venv and installing ``VENV_PACKAGES`` if it has none yet."""
    python = venv / "bin" / "python"
    if not (venv / ".capo-parity-ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for packages in VENV_PACKAGES:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
        fix_packages(python)
        (venv / ".capo-parity-ready").write_text("ok\n")
    return python


def fix_packages(python: Path) -> None:
    """Two packaging defects: the hpsv2 1.2.0 wheel lacks its BPE vocabulary file (open_clip's is the
    same file), and t2v_metrics/__init__.py refuses to import without an ``ffmpeg`` binary on PATH (its
    image path never calls it): a stub in the venv's bin answers its ``ffmpeg -version`` check."""
    code = (
        "import shutil, pathlib, open_clip, importlib.util as u; "
        "src = pathlib.Path(open_clip.__file__).parent / 'bpe_simple_vocab_16e6.txt.gz'; "
        "dst = pathlib.Path(u.find_spec('hpsv2').submodule_search_locations[0]) / 'src/open_clip'; "
        "shutil.copy(src, dst / src.name)"
    )
    subprocess.run([str(python), "-c", code], check=True)
    stub = python.parent / "ffmpeg"
    stub.write_text('#!/bin/sh\necho "ffmpeg stub (capo reward_parity venv; t2v_metrics imports check it)"\n')
    stub.chmod(0o755)


def hf_clip_dir(work: Path, name: str) -> Path:
    """WORK/NAME's OpenAI-layout ``openai_clip.pt`` as a transformers CLIP repo (capo's converter)."""
    from transformers import CLIPConfig

    from capo.rewards.clip_common import clip_from_open_clip

    src, out = work / name, work / f"{name}-hf"
    model = clip_from_open_clip(
        CLIPConfig.from_pretrained(src),
        torch.load(src / "openai_clip.pt", weights_only=True),
        torch.device("cpu"),
        torch.float32,
    )
    model.save_pretrained(out)
    for file in ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"):
        (out / file).write_bytes((src / file).read_bytes())
    return out


def llava_hf_dir(work: Path) -> Path:
    """t2v_metrics' LLaVA-1.5 weights in llava-hf's layout (as llava-hf converted the real ones): the
    head and embeddings padded by 64 rows past the 400-token vocabulary for ``<image>``, ``<pad>``."""
    from safetensors.torch import load_file
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    src, out = work / "vqascore-llava", work / "vqascore-llava-hf"
    tokenizer = AutoTokenizer.from_pretrained(src / "fast-tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # 400, as llava-hf's 32000
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # 401
    image_processor = CLIPImageProcessorPil.from_pretrained(src / "vision-tower")
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=28,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    original = json.loads((src / "config.json").read_text())
    text = LlamaConfig(
        **{
            k: original[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
                "rms_norm_eps",
                "bos_token_id",
                "eos_token_id",
            )
        },
        vocab_size=464,
        pad_token_id=401,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(src / "vision-tower"),
        text_config=text,
        image_token_id=400,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    sd = model.state_dict()
    renames = [
        ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
        ("model.", "model.language_model."),
    ]
    for key, value in load_file(src / "llava-original.safetensors").items():
        new = next((key.replace(a, b, 1) for a, b in renames if key.startswith(a)), key)
        sd[new][: value.shape[0]] = value  # the padded rows of embed_tokens / lm_head stay random
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(out)
    return out


def mps_reference(work: Path, images: list[Image.Image], prompts: list[str]) -> tuple[dict, list[float]]:
    """MPS (not on PyPI): the transcription of its official code in tests/rewards/test_mps.py (cited
    lines), a reduced CLIP + Cross_model (dim 32, 4 layers, 4 heads of 16) pickled as the reference
    checkpoint is; scores from the evaluation scripts' ``infer_one_sample`` (threshold 0.3)."""
    sys.path[:0] = [str(ROOT / "tests" / "rewards"), str(ROOT / "bench")]
    import test_mps as ref
    from transformers import AutoTokenizer, CLIPConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from capo.rewards.mps import MPS_CONDITION
    from reward_parity_official import hf_clip_config, widen

    out = work / "mps"
    out.mkdir(exist_ok=True)
    for file in ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"):
        (out / file).write_bytes((work / "clip-tokenizer" / file).read_bytes())
    config = CLIPConfig(**hf_clip_config("gelu"))
    config.save_pretrained(out)
    torch.manual_seed(0)
    model = ref.CLIPModel(ref.XCLIPModel(config), ref.Cross_model(dim=32, layer_num=4, dim_head=16, heads=4))
    widen(model, 0.1)
    model.eval()
    ref.save_reference_checkpoint(model, out / "MPS_overall_checkpoint.pth")
    tokenizer, processor = AutoTokenizer.from_pretrained(out), CLIPImageProcessorPil.from_pretrained(out)
    scores = [
        float(ref.infer_one_sample(model, tokenizer, processor, im, p, MPS_CONDITION))
        for im, p in zip(images, prompts, strict=True)
    ]
    return {"checkpoint": out / "MPS_overall_checkpoint.pth", "config": out, "dtype": "float32"}, scores


def capo_options(work: Path) -> dict[str, dict]:
    """capo loader options for the weights the official side wrote."""
    vit = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    return {
        "pickscore": lambda: {"model": work / "pickscore", "processor": work / "pickscore"},
        "hpsv2": lambda: {"checkpoint": work / "hpsv2-v2" / "HPS_checkpoint.pt", "config": work / "hpsv2-v2"},
        "hpsv2.1": lambda: {
            "checkpoint": work / "hpsv2-v2.1" / "HPS_checkpoint.pt",
            "config": work / "hpsv2-v2.1",
        },
        "imagereward": lambda: {"model": work / "imagereward", "tokenizer": work / "imagereward", "vit": vit},
        "clipscore": lambda: {"model": hf_clip_dir(work, "clipscore")},
        "laion-aesthetic": lambda: {
            "model": hf_clip_dir(work, "laion-aesthetic"),
            "head": work / "laion-aesthetic" / "aesthetic-head.pth",
        },
        "vqascore": lambda: {"model": llava_hf_dir(work)},
        "vqascore-clip-flant5": lambda: {
            "model": work / "vqascore-clip-t5",
            "tokenizer": work / "vqascore-clip-t5" / "fast-tokenizer",
        },
    }


def compare(name: str, ours: np.ndarray, official: np.ndarray) -> dict:
    diff = np.abs(ours.astype(np.float64) - official)
    scale = np.abs(official).max()
    return {
        "reward": name,
        "n": len(diff),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / scale) if scale else 0.0,
        "official_range": [float(official.min()), float(official.max())],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "capo" / "venv-parity")
    parser.add_argument("--work", type=Path, default=Path("/tmp/capo-reward-parity"))
    parser.add_argument("--only", default="", help="comma-separated rewards (default: all)")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    names = [
        "pickscore",
        "hpsv2",
        "hpsv2.1",
        "imagereward",
        "clipscore",
        "laion-aesthetic",
        "vqascore",
        "vqascore-clip-flant5",
        "mps",
    ]
    names = [n for n in names if not args.only or n in args.only.split(",")]
    paths, prompts = make_inputs(args.work)
    images = [Image.open(p).convert("RGB") for p in paths]
    python = ensure_venv(args.venv)
    env = {**os.environ, "PATH": f"{python.parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    official_names = ",".join(n for n in names if n != "mps") or "-"
    script = str(ROOT / "bench" / "reward_parity_official.py")
    subprocess.run([str(python), script, str(args.work), official_names], check=True, env=env, cwd=args.work)
    official = json.loads((args.work / "official.json").read_text())
    rows, options = [], capo_options(args.work)
    for name in names:
        if name == "mps":
            opts, expected = mps_reference(args.work, images, prompts)
        else:
            opts, expected = options[name](), official[name]
        reward = load_reward(name, device="cpu", **opts)
        rows.append(compare(name, reward.score(images, prompts), np.asarray(expected, np.float64)))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, time.perf_counter() - start)


def print_table(rows: list[dict], seconds: float) -> None:
    print("\n| reward | images | max abs diff | max rel diff | official score range |")
    print("|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["official_range"]
        diffs = f"{r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e}"
        print(f"| `{r['reward']}` | {r['n']} | {diffs} | {lo:.4g} … {hi:.4g} |")
    print(f"\nwall time {seconds:.0f} s (venv already built: excludes the one-time install)")


if __name__ == "__main__":
    main()
