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


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One intra-op thread for every module here (tests/conftest.py): these models are tiny."""
    yield
