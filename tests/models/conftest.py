"""Fixtures for the real-family adapter tests: tiny pipelines saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_pipelines


@pytest.fixture(scope="session")
def tiny_pipes():
    """The tiny_pipelines module (builders and shared checks)."""
    return tiny_pipelines


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-pipelines")


@pytest.fixture(scope="session")
def tiny_path(tiny_pipes, tiny_root):
    """name -> the directory of that tiny pipeline, built on first use and kept for the session:
    sd-epsilon, sd-v_prediction, sdxl, sd3, flux-dev, flux-schnell."""
    builders = {
        "sd-epsilon": lambda: tiny_pipes.build_sd(tiny_root, prediction_type="epsilon"),
        "sd-v_prediction": lambda: tiny_pipes.build_sd(tiny_root, prediction_type="v_prediction"),
        "sdxl": lambda: tiny_pipes.build_sdxl(tiny_root),
        "sd3": lambda: tiny_pipes.build_sd3(tiny_root),
        "flux-dev": lambda: tiny_pipes.build_flux(tiny_root, guidance_embeds=True),
        "flux-schnell": lambda: tiny_pipes.build_flux(tiny_root, guidance_embeds=False),
    }
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = builders[name]()
        return built[name]

    return get


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One intra-op thread for every module here (tests/conftest.py): these models are tiny."""
    yield
