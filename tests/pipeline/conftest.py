"""Shared fixtures of the pipeline tests: the tiny base model and held-out prompt files, built
once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from capo.shapes.world import make_prompts


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> str:
    """A tiny random-weight shapes-vp model (seed 0) saved with save_pretrained: the base model."""
    from capo.models.shapes import build_shapes_model

    path = tmp_path_factory.mktemp("base") / "shapes-vp-tiny"
    build_shapes_model("vp", size="tiny", seed=0).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Callable[[int], str]:
    """n -> a text file of the first n held-out shapes prompts, one per line."""
    root = tmp_path_factory.mktemp("prompts")

    def make(n: int) -> str:
        path = Path(root / f"heldout-{n}.txt")
        if not path.is_file():
            path.write_text("\n".join(p.text for p in make_prompts("heldout")[:n]) + "\n")
        return str(path)

    return make
