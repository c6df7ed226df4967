"""Hub revisions (capo.rewards.hub): pins are commits, overrides win, loads pass them to the hub
client, and the commits used end up in the reward (and the score file's metadata)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_clip import save_tiny_clip

from capo.errors import CapoError
from capo.pipeline.score import reward_meta
from capo.rewards import hub, load_reward
from capo.rewards.clip_common import resolve_file
from capo.rewards.hub import HUB_REVISIONS, hub_kwargs, pinned_revisions, resolved_commit, revision_for


def test_every_pin_is_a_full_commit_hash_of_a_default_repo():
    from capo.rewards import clipscore, hpsv2, imagereward, laion_aesthetic, pickscore, vqascore, vqascore_t5

    defaults = {
        pickscore.PICKSCORE_MODEL, pickscore.PICKSCORE_PROCESSOR, hpsv2.VIT_H_14, clipscore.CLIPSCORE_MODEL,
        laion_aesthetic.LAION_CLIP, imagereward.BERT_TOKENIZER, vqascore.VQASCORE_MODEL, "xswu/HPSv2",
        "trl-lib/ddpo-aesthetic-predictor", vqascore_t5.CLIP_FLANT5_TOKENIZER,
        "openai/clip-vit-large-patch14-336",  # clip-flant5-xxl's mm_vision_tower
    }  # fmt: skip
    assert set(HUB_REVISIONS) <= defaults
    assert all(hub.COMMIT.fullmatch(commit) for commit in HUB_REVISIONS.values())


def test_overrides_win_and_every_repo_used_is_noted():
    with pinned_revisions({"xswu/HPSv2": "main"}) as requested:
        assert revision_for("xswu/HPSv2") == "main"
        pin = HUB_REVISIONS["openai/clip-vit-base-patch32"]
        assert hub_kwargs("openai/clip-vit-base-patch32") == {"revision": pin}
        assert hub_kwargs("someone/unpinned") == {}
    expected = {"xswu/HPSv2": "main", "openai/clip-vit-base-patch32": pin, "someone/unpinned": "main"}
    assert requested == expected
    assert revision_for("xswu/HPSv2") == HUB_REVISIONS["xswu/HPSv2"]  # outside: the pin again


def test_local_paths_take_no_revision(tmp_path):
    with pinned_revisions() as requested:
        assert hub_kwargs(tmp_path) == {}
    assert requested == {}


def test_hub_downloads_pass_the_pinned_revision(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    (tmp_path / "f.pt").write_bytes(b"")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, revision=None: calls.append(
        (repo, name, revision)) or str(tmp_path / "f.pt"))  # fmt: skip
    with pinned_revisions():
        resolve_file("hf://xswu/HPSv2/HPS_v2_compressed.pt")
    with pinned_revisions({"xswu/HPSv2": "0" * 40}):
        resolve_file("hf://xswu/HPSv2/HPS_v2.1_compressed.pt")
    assert calls == [("xswu/HPSv2", "HPS_v2_compressed.pt", HUB_REVISIONS["xswu/HPSv2"]),
                     ("xswu/HPSv2", "HPS_v2.1_compressed.pt", "0" * 40)]  # fmt: skip


def test_resolved_commit_reads_the_hub_cache_refs(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--someone--repo" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("1" * 40 + "\n")
    assert resolved_commit("someone/repo", "main") == "1" * 40
    assert resolved_commit("someone/repo", "2" * 40) == "2" * 40
    assert resolved_commit("someone/other", "main") == "unresolved:main"


def test_load_reward_records_revisions_and_rejects_bad_ones(tmp_path):
    save_tiny_clip(tmp_path / "clip")
    reward = load_reward("clipscore", model=tmp_path / "clip", device="cpu", revisions={"a/b": "main"})
    assert reward.hub_revisions == {}  # all local: nothing from the hub
    assert reward_meta(reward)["hub_revisions"] == {}
    assert np.isfinite(reward.score([], [])).all()
    with pytest.raises(CapoError, match="revisions: expected"):
        load_reward("clipscore", model=tmp_path / "clip", device="cpu", revisions={"not-a-repo": "main"})
