"""Devices and dtypes: one table of names with aliases, one "auto" convention."""

import pytest
import torch

from capo.devices import DTYPES, resolve_device, resolve_dtype
from capo.errors import CapoError


@pytest.mark.parametrize("name", ["bfloat16", "bf16", "torch.bfloat16"])
def test_names_and_aliases(name):
    assert resolve_dtype(name) is torch.bfloat16


def test_defaults_and_errors():
    assert list(DTYPES) == ["float32", "float16", "bfloat16"]  # what configs offer and files store
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is torch.bfloat16
    with pytest.raises(CapoError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == auto
    assert resolve_device("cpu") == torch.device("cpu")
