"""The CaPO pipeline stages over a run directory (docs/design.md §1): generate, score, calibrate, select,
train, evaluate, and ``run`` (all of them). Each is a library function and a CLI subcommand."""

from capo.pipeline.rundir import RunDir

__all__ = ["RunDir"]
