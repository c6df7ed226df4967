"""The RewardModel interface (docs/design.md §4) and the reward table."""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from capo.errors import CapoError


class RewardModel(abc.ABC):
    """Scores images (optionally against prompts). Higher is better unless stated.

    Class attributes every reward states:
      name: registry name.
      needs_prompt: whether ``score`` uses the prompts.
      bt_scale, transform: the Bradley-Terry logit is ``bt_scale * transform(raw)`` (docs/design.md §2.6),
        transform in {"identity", "logit", "logit_of_square"} (``capo.calibration.TRANSFORMS``).
      higher_is_better: direction of the raw score.
    """

    name: str = "reward"
    needs_prompt: bool = True
    bt_scale: float = 1.0
    transform: str = "identity"
    higher_is_better: bool = True
    batch_size: int = 32
    #: {hub repo: commit} the reward's files were loaded at, set by ``load_reward`` (capo.rewards.hub).
    hub_revisions: Mapping[str, str] = MappingProxyType({})

    @abc.abstractmethod
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """Raw scores of one batch, float32 [B]."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str],
              labels: Sequence[str] | None = None, path: str | None = None) -> np.ndarray:
        """Raw scores float32 [M] in batches of ``batch_size``: the one scoring path of capo. A batch
        of the wrong size or a non-finite score is a CapoError naming the image (``labels[i]``,
        e.g. "prompt P sample 3"; default "item i") and the file ``path`` it came from."""
        who = f"reward '{self.name}'"
        if len(images) != len(prompts):
            raise CapoError(f"{who}: {len(images)} images but {len(prompts)} prompts", path=path)
        raw = np.empty(len(images), dtype=np.float32)
        for b in range(0, len(images), self.batch_size):
            rows = slice(b, min(b + self.batch_size, len(images)))
            out = np.asarray(self.score_batch(images[rows], prompts[rows]), dtype=np.float32).reshape(-1)
            if out.shape != (rows.stop - b,):
                raise CapoError(f"{who} returned {out.size} scores for {rows.stop - b} images", path=path)
            bad = np.flatnonzero(~np.isfinite(out))
            if bad.size:
                i = b + int(bad[0])
                where = labels[i] if labels is not None else f"item {i}"
                raise CapoError(f"{who} returned {out[bad[0]]} for {where}", path=path)
            raw[rows] = out
        return raw


RewardFactory = Callable[..., RewardModel]

#: name -> "module:attribute" of a factory, imported only when the reward is loaded.
REWARDS: dict[str, str] = {
    "shapes-alignment": "capo.rewards.shapes:ShapesAlignment",
    "shapes-aesthetic": "capo.rewards.shapes:ShapesAesthetic",
    "shapes-preference": "capo.rewards.shapes:ShapesPreference",
    "pickscore": "capo.rewards.pickscore:PickScore",
    "hpsv2": "capo.rewards.hpsv2:HPSv2",
    "hpsv2.1": "capo.rewards.hpsv2:HPSv21",
    "clipscore": "capo.rewards.clipscore:CLIPScore",
    "laion-aesthetic": "capo.rewards.laion_aesthetic:LaionAesthetic",
    "imagereward": "capo.rewards.imagereward:ImageReward",
    "mps": "capo.rewards.mps:MPS",
    "vqascore": "capo.rewards.vqascore:VQAScore",
    "vqascore-clip-flant5": "capo.rewards.vqascore_t5:ClipFlanT5VQAScore",
}

_REGISTERED: dict[str, RewardFactory] = {}


def register_reward(name: str, factory: RewardFactory) -> None:
    """Register a reward factory at run time (tests, notebooks, plugins)."""
    _REGISTERED[name] = factory


def _entry_point_rewards() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="capo.rewards")}


def available_rewards() -> list[str]:
    return sorted(set(REWARDS) | set(_REGISTERED) | set(_entry_point_rewards()))


def _resolve(name: str) -> RewardFactory:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in REWARDS:
        module, attr = REWARDS[name].split(":")
        return vars(importlib.import_module(module))[attr]
    eps = _entry_point_rewards()
    if name in eps:
        return eps[name].load()
    raise CapoError(f"unknown reward '{name}' (available: {', '.join(available_rewards())})")


def reward_options(name: str) -> set[str] | None:
    """Keyword options the factory of ``name`` accepts (None: any, it takes ``**kwargs``)."""
    params = inspect.signature(_resolve(name)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names | {"revisions"}  # every reward: hub revision overrides (capo.rewards.hub)


def load_reward(name: str, **kwargs: Any) -> RewardModel:
    """Build a reward model by registry name with the factory's keyword options (weights path,
    device, dtype, ...); an unknown name or option is a CapoError listing the known ones."""
    accepted = reward_options(name)
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise CapoError(f"reward '{name}': unknown option '{unknown[0]}' "
                        f"(accepted: {', '.join(sorted(accepted)) or 'none'})")
    from capo.rewards.hub import pinned_revisions, resolved_commit

    revisions = kwargs.pop("revisions", None) if accepted is not None else None
    with pinned_revisions(revisions) as requested:
        reward = _resolve(name)(**kwargs)
    reward.hub_revisions = {repo: resolved_commit(repo, rev) for repo, rev in requested.items()}
    return reward
