"""Suite-wide pytest hooks.

The suite is written for the CPU (CI has no GPU). On a machine with CUDA, every test not marked
``gpu`` still runs on the CPU: CUDA is hidden from it (``torch.cuda.is_available`` is False and
``CUDA_VISIBLE_DEVICES`` is empty for subprocesses), so device defaults ("cuda when available")
resolve as in CI. Tests marked ``gpu`` see the GPU, and are skipped where there is none.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

_cuda_is_available = torch.cuda.is_available
_allow_cuda = {"on": False}
_visible = os.environ.get("CUDA_VISIBLE_DEVICES")


def pytest_collection_modifyitems(config, items):
    if _cuda_is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _hide_cuda():
    """torch.cuda.is_available() answers False outside tests marked ``gpu`` (module-scoped
    fixtures included, since they are set up after this session fixture)."""
    torch.cuda.is_available = lambda: _allow_cuda["on"] and _cuda_is_available()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # subprocesses (torchrun tests); this process has read it
    yield
    torch.cuda.is_available = _cuda_is_available
    os.environ.pop("CUDA_VISIBLE_DEVICES")
    if _visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = _visible


@pytest.fixture(autouse=True)
def _cuda_only_for_gpu_tests(request, monkeypatch):
    if "gpu" in request.keywords:
        from accelerate.state import AcceleratorState

        if _visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _visible)
        _allow_cuda["on"] = True
        AcceleratorState._reset_state(True)  # accelerate's singleton state may hold a CPU device
        yield
        AcceleratorState._reset_state(True)
        _allow_cuda["on"] = False
    else:
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and the machine is shared); restored afterwards.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pipelines():
    """The module tests/models/tiny_pipelines.py (tiny random-weight pipelines of every family:
    ``BUILDERS[family](root)``), imported once and shared by the test packages."""
    if "tiny_pipelines" not in sys.modules:
        path = Path(__file__).resolve().parent / "models" / "tiny_pipelines.py"
        spec = importlib.util.spec_from_file_location("tiny_pipelines", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["tiny_pipelines"] = module
    return sys.modules["tiny_pipelines"]
