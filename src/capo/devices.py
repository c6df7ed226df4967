"""Devices and dtypes: one table of dtype names and one "auto" convention (docs/design.md §7).

A dtype is named by its canonical name (float32, float16, bfloat16: what configs offer and what
Parquet files store) or an alias (fp32, fp16, bf16, torch.float32, ...). A device "auto" (or None,
the default of a loader's ``device`` option) is CUDA when available, else the CPU; under a
multi-process launcher the pipeline stages turn "auto" into this process's accelerate device
(``capo.pipeline.generate.resolve_device``).
"""

from __future__ import annotations

import torch

from capo.errors import CapoError

#: canonical dtype name -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
#: other accepted names -> canonical name
ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                           **{f"torch.{name}": name for name in DTYPES}}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from a dtype, a name or an alias; None: bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    name = ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise CapoError(f"unknown dtype '{dtype}' (known: {', '.join([*DTYPES, *ALIASES])})")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA when available, else the CPU; otherwise the named device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
