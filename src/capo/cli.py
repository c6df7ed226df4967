"""The ``capo`` command line: each subcommand parses flags, builds a config, calls one function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from capo.errors import user_error

#: subcommands -> "module:register" where register(subparsers) adds their parsers and sets func
COMMANDS: dict[str, str] = {
    "generate score calibrate select train evaluate": "capo.pipeline.commands:register",
    "run": "capo.pipeline.run:register",
    "verify": "capo.pipeline.verify:register",
    "experiment": "capo.experiments.runner:register",
    "sweep": "capo.experiments.sweep:register",
    "report": "capo.report.html:register",
    "shapes": "capo.recipes.pretrain_shapes:register",
    "export": "capo.export:register",
    "fit-bt": "capo.rewards.fit_bt:register",
}

#: commands that write RUN and so hold its lock while they run
LOCKED = ("generate", "score", "calibrate", "select", "train", "evaluate", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capo", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (default: one line, exit 2)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_attr in COMMANDS.values():
        module, attr = module_attr.split(":")
        vars(importlib.import_module(module))[attr](sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args([a for a in argv if a != "--debug"])  # --debug anywhere on the line
    args.debug = "--debug" in argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        with run_lock(args):
            args.func(args)
    except KeyboardInterrupt:
        print(f"capo {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a user or environment failure is one line; a bug keeps its traceback
        error = user_error(e)
        if error is None or args.debug:
            raise
        close_progress_bars()  # the error starts its own line, not the end of a bar's
        print(f"capo {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def close_progress_bars() -> None:
    """Close the tqdm bars an exception left open (each ends its line)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_lock(args: argparse.Namespace) -> Any:
    """RUN/.capo.lock for a command that writes a run (only rank 0 of a multi-process launch
    takes it); the leftovers of interrupted writes are removed once the lock is held."""
    run = getattr(args, "run", None)
    if not run or os.environ.get("RANK", "0") != "0" or args.command not in LOCKED:
        return nullcontext()
    from capo.pipeline.integrity import RunLock

    return RunLock(Path(run), args.command)


if __name__ == "__main__":
    raise SystemExit(main())
