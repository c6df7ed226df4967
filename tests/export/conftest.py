"""Fixtures of the export tests: tiny pipelines saved on first use (helpers: export_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_pipelines) -> dict[str, Path]:
    """family -> a tiny random-weight pipeline saved with save_pretrained (built on first use)."""
    root, built = tmp_path_factory.mktemp("tiny"), {}

    class Lazy(dict):
        def __missing__(self, family: str) -> Path:
            built[family] = tiny_pipelines.BUILDERS[family](root)
            self[family] = built[family]
            return built[family]

    return Lazy()
