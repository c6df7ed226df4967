"""``capo export``: a tuned model in the form diffusers (or the shapes sampler) loads, with a model card."""

from capo.export.export import ExportConfig, export, register

__all__ = ["ExportConfig", "export", "register"]
