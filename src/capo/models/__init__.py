"""Model-family adapters behind one interface (docs/design.md §3), chosen from an explicit table."""

from capo.models.base import MODELS, DiffusionAdapter, SampleOutput, load_model

__all__ = ["MODELS", "DiffusionAdapter", "SampleOutput", "load_model"]
