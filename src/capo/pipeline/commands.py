"""CLI subcommands of the pipeline stages: ``capo generate | score | calibrate | select | train | evaluate``.

Each is derived from the stage's record (``capo.pipeline.run.PIPELINE``): it takes ``--run DIR``
(the run directory), ``--config FILE`` (a YAML file whose section named after the stage sets
defaults, e.g. the shipped ``capo/configs/shapes.yaml``) and one flag per field of the stage's
config dataclass; flags override the file. ``capo train`` has its own (its config carries the run
directory), in ``capo.pipeline.train``; ``capo run`` is in ``capo.pipeline.run``.
"""

from __future__ import annotations

import argparse
from typing import Any

from capo.config import add_arguments, build
from capo.pipeline.run import PIPELINE, Stage
from capo.pipeline.rundir import RunDir


def register(sub: Any) -> None:
    """Every stage's subcommand, in pipeline order."""
    for stage in PIPELINE:
        if stage.cli is not None:
            stage.cli(sub)
        else:
            register_stage(sub, stage)


def register_stage(sub: Any, stage: Stage) -> argparse.ArgumentParser:
    """``capo NAME --run DIR [--config FILE] [--FIELD VALUE ...]``: runs the stage, prints its summary."""
    cls = stage.config()
    p = sub.add_parser(stage.name, help=stage.help, description=stage.description)
    p.add_argument("--run", "--run-dir", dest="run", required=True, metavar="DIR",
                   help="run directory (created if missing); under torchrun spell it --run-dir, since "
                   "torchrun reads --run as an abbreviation of its own --run-path")
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"YAML file whose '{stage.name}' section sets the defaults")
    add_arguments(p, cls)

    def run(args: argparse.Namespace) -> None:
        cfg = build(cls, args, args.config, section=stage.name)
        print(stage.summary(stage.step(RunDir.at(args.run), cfg)))

    p.set_defaults(func=run)
    return p
