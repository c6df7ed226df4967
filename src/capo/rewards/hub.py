"""Hub revisions of the reward checkpoints: pinned, overridable, recorded.

Every hub repo a built-in reward loads by default is pinned to a commit in ``HUB_REVISIONS``, so an
upstream change cannot silently change a score. Each hash was read from public code that loads that
repo from a local Hugging Face cache snapshot (``models--OWNER--NAME/snapshots/<commit>``) or pins it
(docs/rewards.md lists them); none was invented. Repos without a verifiable public hash are not
pinned (their latest ``main`` is used) and say so in docs/rewards.md.

``load_reward(name, revisions={"owner/name": "<commit or branch>"})`` overrides pins for one reward
(``{"owner/name": "main"}`` follows upstream). While a reward is built, every hub access goes
through ``hub_kwargs`` / ``revision_for``, which note the repos used; ``load_reward`` then stores
the commit each resolved to (from the hub cache's ``refs``) in ``reward.hub_revisions``, and the
score stage writes it into the score file's metadata.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType

from capo.errors import CapoError

#: repo id -> commit. Source of each hash: docs/rewards.md, "Pinned hub revisions".
HUB_REVISIONS: dict[str, str] = {
    "yuvalkirstain/PickScore_v1": "a4e4367c6dfa7288a00c550414478f865b875800",
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": "1c2b8495b28150b8a4922ee1c8edee224c284c0c",
    "xswu/HPSv2": "697403c78157020a1ae59d23f111aa58ced35b0a",
    "openai/clip-vit-base-patch32": "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
    "openai/clip-vit-large-patch14": "32bd64288804d66eefd0ccbe215aa642df71cc41",
    "trl-lib/ddpo-aesthetic-predictor": "cf4bd10345610935a80a5d3be9a3133c50f121e4",
    "google-bert/bert-base-uncased": "86b5e0934494bd15c9632b12f734a8a67f723594",
    "llava-hf/llava-1.5-7b-hf": "b234b804b114d9e37bb655e11cbbb5f5e971b7a9",
    "google/flan-t5-xxl": "ae7c9136adc7555eeccc78cdd960dfd60fb346ce",
    "openai/clip-vit-large-patch14-336": "ce19dc912ca5cd21c8a653c79e251e808ccabcd1",
}
COMMIT = re.compile(r"[0-9a-f]{40}")
_OVERRIDES: ContextVar[Mapping[str, str]] = ContextVar("capo_hub_overrides", default=MappingProxyType({}))
_REQUESTED: ContextVar[dict[str, str] | None] = ContextVar("capo_hub_requested", default=None)


@contextmanager
def pinned_revisions(overrides: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Within the block, hub loads use ``overrides`` over ``HUB_REVISIONS``; yields {repo: revision
    requested} of the repos loaded from the hub."""
    overrides = dict(overrides or {})
    for repo, rev in overrides.items():
        if not isinstance(repo, str) or repo.count("/") != 1 or not isinstance(rev, str) or not rev:
            expected = "{'owner/name': 'commit or branch'}"
            raise CapoError(f"revisions: expected {expected}, got {repo!r}: {rev!r}")
    requested: dict[str, str] = {}
    tokens = _OVERRIDES.set(overrides), _REQUESTED.set(requested)
    try:
        yield requested
    finally:
        _OVERRIDES.reset(tokens[0])
        _REQUESTED.reset(tokens[1])


def revision_for(repo_id: str) -> str | None:
    """The revision to load ``repo_id`` at (override, else pin, else None = main); noted as used."""
    revision = _OVERRIDES.get().get(repo_id, HUB_REVISIONS.get(repo_id))
    requested = _REQUESTED.get()
    if requested is not None:
        requested[repo_id] = revision or "main"
    return revision


def hub_kwargs(id_or_dir: str | os.PathLike) -> dict[str, str]:
    """``from_pretrained`` keyword arguments: ``{"revision": ...}`` for a hub id, {} for a local path."""
    text = os.fspath(id_or_dir)
    if Path(text).expanduser().exists():
        return {}
    revision = revision_for(text)
    return {"revision": revision} if revision else {}


def resolved_commit(repo_id: str, revision: str) -> str:
    """The commit ``revision`` of ``repo_id`` resolved to: itself if a commit, else the hub cache's
    ``refs/<revision>`` (written by huggingface_hub at download); "unresolved:<revision>" if absent."""
    if COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else f"unresolved:{revision}"
