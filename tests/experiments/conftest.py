"""Fixtures of the experiment tests (capo experiment, capo sweep)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny shapes model (vp) saved with save_pretrained; the torch thread count restored after."""
    from capo.models.shapes import build_shapes_model

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("tiny")
    build_shapes_model("vp", size="tiny", seed=0).save_pretrained(str(root / "vp"))
    yield str(root / "vp")
    torch.set_num_threads(threads)
