"""Integrity of what a run writes: file manifests, Parquet checks, lock files, leftover clean-up.

Weight and checkpoint directories carry a manifest (file -> size and SHA-256) written before the
directory is renamed into place, so a directory that exists is complete and can be verified.
Parquet files carry their row count in the footer and a CRC per page (``write_page_checksum``):
a truncated file has no footer, a flipped byte fails its page checksum. See docs/failures.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capo.errors import CapoError

MANIFEST = "manifest.json"
LOCK = ".capo.lock"
#: name patterns of the leftovers of an interrupted atomic write (never a finished file)
LEFTOVERS = (".*.tmp-*", ".*.tmp", ".tmp-step-*")


def digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of one file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def manifest(directory: Path, skip: Iterable[str] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """relative file name -> digest, for every file under ``directory`` (sorted)."""
    skipped = set(skip)
    return {str(p.relative_to(directory)): digest(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in skipped}


def write_manifest(directory: Path) -> None:
    """directory/manifest.json: the digest of every other file (written last, before the rename)."""
    (directory / MANIFEST).write_text(json.dumps(manifest(directory), indent=1) + "\n")


def damage(directory: Path, files: dict[str, dict[str, Any]] | None = None, full: bool = True) -> str | None:
    """The first problem ('FILE: missing' / 'FILE: N bytes, expected M' / 'FILE: checksum differs')
    of a directory against its manifest (``files``, default: its manifest.json); None if intact or
    if it has no manifest (written before manifests existed). ``full=False`` checks sizes only."""
    if files is None:
        path = directory / MANIFEST
        if not path.is_file():
            return None
        try:
            files = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return f"{MANIFEST}: not readable JSON"
    for name, want in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name}: missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name}: {size} bytes, expected {want['bytes']}"
        if full and digest(p)["sha256"] != want["sha256"]:
            return f"{name}: checksum differs"
    return None


def parquet_damage(path: Path, full: bool = False) -> str | None:
    """Why a Parquet file is unreadable (None if fine): the footer (cheap: truncation), and with
    ``full`` every page against its CRC."""
    try:
        meta = pq.read_metadata(path)
        if full:
            pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        return f"damaged Parquet file ({str(e).splitlines()[0][:120]})"
    return None if meta.num_rows >= 0 else "no rows"


def check_parquet(path: Path) -> None:
    """Raise a one-line CapoError naming ``path`` if its footer cannot be read."""
    problem = parquet_damage(path)
    if problem is not None:
        raise CapoError(f"{problem}; remove it and rerun the stage that writes it", path=str(path))


def clean_leftovers(root: Path) -> list[Path]:
    """Remove the temporary files and directories of interrupted writes under ``root``."""
    removed = []
    if not root.is_dir():
        return removed
    found = [p for pattern in LEFTOVERS for p in root.rglob(pattern)]
    # score's NAME.parts/ is work in progress, unless NAME.parquet exists (killed after the merge)
    found += [p for p in root.glob("rewards/*.parts") if p.with_suffix(".parquet").is_file()]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote a lock still runs (a lock of another host counts as alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """RUN/.capo.lock (pid, host, time): one process writes a run at a time; a lock whose process
    is gone (same host) is stale and taken over. Re-entrant within one process."""

    def __init__(self, root: Path, stage: str):
        self.path, self.stage, self.mine = Path(root) / LOCK, stage, False

    def __enter__(self) -> RunLock:
        self.created = not self.path.parent.exists()  # removed again if the command wrote nothing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage, "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if holder and holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                    return self  # this process holds it already (capo run -> train)
                if holder and _alive(holder):
                    who = f"{holder.get('stage', 'capo')} (pid {holder.get('pid')} on {holder.get('host')})"
                    raise CapoError(f"in use by {who}; wait for it to finish", path=str(self.path)) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.mine = True
            clean_leftovers(self.path.parent)  # no other capo process writes this run now
            return self
        raise CapoError("could not take the lock", path=str(self.path))

    def __exit__(self, *exc: Any) -> None:
        if self.mine:
            self.path.unlink(missing_ok=True)
            if self.created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()
