"""User-facing errors: one line naming the file, row or key and the problem.

``user_error`` turns the environment's failures (a full disk, a read-only directory, a file that
is not UTF-8, a damaged Parquet or safetensors file, a CUDA device on a CPU build) into the same
one-line form; the CLI prints their traceback only under ``--debug``.
"""

from __future__ import annotations

import errno

#: longest error line (user text quoted in it is cut to config.QUOTE_CHARS before that)
MAX_CHARS = 600


class CapoError(Exception):
    """An error caused by bad input or configuration; the CLI prints it as one line, exit 2."""

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if row is not None:
                where += f", row {row}"
            where += ": "
        text = f"{where}{message}".replace("\n", " ")
        if len(text) > MAX_CHARS:  # never echo a whole file or prompt
            text = f"{text[:MAX_CHARS]}... ({len(text)} characters)"
        super().__init__(text)


#: errno -> what it means for a capo user
OS_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some and rerun the same command (it resumes)",
    errno.EDQUOT: "disk quota exceeded; free some and rerun the same command (it resumes)",
    errno.EROFS: "read-only file system; choose a writable --run directory",
    errno.EACCES: "permission denied",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOTDIR: "not a directory",
}

#: fragments of library messages (torch, safetensors, pyarrow) -> what they mean
MESSAGES = {
    "inline_container": "cannot write the file (is the disk full?); free space and rerun (it resumes)",
    "file write failed": "cannot write the file (is the disk full?); free space and rerun (it resumes)",
    "Torch not compiled with CUDA": "--device cuda, but this torch build has no CUDA; use --device cpu",
    "PytorchStreamReader": "a damaged torch file (truncated checkpoint?)",
    "magic bytes not found": "a damaged Parquet file (truncated?)",
}


def _library_message(e: BaseException) -> str | None:
    text = str(e)
    hit = next((m for frag, m in MESSAGES.items() if frag in text), None)
    if hit is not None:
        return hit
    module = type(e).__module__ or ""
    if module.startswith(("pyarrow", "safetensors")):
        return f"unreadable data ({type(e).__name__}: {text.splitlines()[0][:160] if text else ''})"
    return None


def user_error(e: BaseException) -> CapoError | None:
    """The one-line CapoError for an environment failure, or None for a bug (a real traceback)."""
    if isinstance(e, CapoError):
        return e
    if isinstance(e, OSError) and e.errno in OS_ERRORS:
        path = e.filename if e.filename is not None else None
        return CapoError(OS_ERRORS[e.errno], path=str(path) if path is not None else None)
    if isinstance(e, UnicodeDecodeError):
        return CapoError(f"a file is not UTF-8 text (byte {e.start}: {e.reason})")
    message = _library_message(e)
    return CapoError(message) if message is not None else None
