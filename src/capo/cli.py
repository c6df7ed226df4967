"""The ``capo`` command line: each subcommand parses flags, builds a config, calls one function."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from capo.errors import CapoError

#: subcommand -> "module:register" where register(subparsers) adds the parser and sets func
COMMANDS: dict[str, str] = {
    "generate": "capo.pipeline.commands:register_generate",
    "score": "capo.pipeline.commands:register_score",
    "calibrate": "capo.pipeline.commands:register_calibrate",
    "select": "capo.pipeline.commands:register_select",
    "train": "capo.pipeline.train:register",
    "evaluate": "capo.pipeline.commands:register_evaluate",
    "run": "capo.pipeline.run:register",
    "experiment": "capo.experiments.runner:register",
    "sweep": "capo.experiments.sweep:register",
    "report": "capo.report.html:register",
    "shapes": "capo.shapes.pretrain:register",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capo", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_attr in COMMANDS.values():
        module, attr = module_attr.split(":")
        vars(importlib.import_module(module))[attr](sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        args.func(args)
    except CapoError as e:
        print(f"capo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"capo {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
