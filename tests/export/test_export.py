"""``capo export`` of the shapes world (read back by ``capo evaluate --tuned`` and the shapes
sampler), of a soup (a full denoiser), bad run directories (one line, nothing written), the
output directory rules and ``--push-to-hub`` (the huggingface_hub calls mocked)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import DiffusionPipeline
from export_runs import write_run
from test_families import capo_latents, diffusers_latents

from capo.cli import main
from capo.config import from_dict
from capo.errors import CapoError
from capo.experiments.runner import write_soup
from capo.export import ExportConfig, export
from capo.models.base import detect_family, load_model
from capo.pipeline.generate import load_base
from capo.pipeline.integrity import write_manifest
from capo.pipeline.prompts import load_prompts
from capo.pipeline.rundir import RunDir
from capo.pipeline.train import LORA_FILE, apply_trained

SHAPES_PROMPTS = [p.prompt for p in load_prompts("shapes:heldout")[:2]]
SEEDS = [5, 6]


def shapes_latents(adapter) -> torch.Tensor:
    return adapter.sample(SHAPES_PROMPTS, SEEDS, steps=3).latents


def shapes_tuned(spec, model_dir) -> torch.Tensor:
    """capo's shapes sampler on the base with ``model_dir`` applied (what ``capo evaluate --tuned`` does)."""
    return shapes_latents(apply_trained(load_base(spec, torch.device("cpu")), model_dir))


def _export(run, out, *flags) -> int:
    return main(["export", "--run", str(run.root), "--out", str(out), *flags])


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("shapes") / "run", "shapes-vp")


def test_shapes_exports_read_back(shapes_run, tmp_path):
    spec = shapes_run.read_base_model()
    tuned = shapes_tuned(spec, shapes_run.model_dir)
    assert (tuned - shapes_latents(load_base(spec, torch.device("cpu")))).abs().max() > 1e-3
    for fmt in ("lora", "merged"):
        assert _export(shapes_run, tmp_path / fmt, "--format", fmt) == 0
        torch.testing.assert_close(shapes_tuned(spec, tmp_path / fmt), tuned, rtol=0, atol=1e-4)
    assert (tmp_path / "lora" / LORA_FILE).is_file()
    family, path = detect_family(str(tmp_path / "merged"))  # `capo generate --model OUT`
    assert family == "shapes-vp"
    sampler = load_model(family, path, device="cpu")
    torch.testing.assert_close(shapes_latents(sampler), tuned, rtol=0, atol=1e-4)

    assert main(["evaluate", "--run", str(shapes_run.root), "--tuned", str(tmp_path / "merged"),
                 "--prompts", "shapes:heldout", "--num-prompts", "2", "--seeds", "1", "--steps", "2",
                 "--n-boot", "20", "--grid-prompts", "1", "--reward", "shapes-aesthetic",
                 "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0 <= results["rewards"]["shapes-aesthetic"]["win_rate"] <= 100


def test_soup_exports_merged(tiny_models, tmp_path):
    """A soup written by capo experiment's write_soup (slerp of two LoRA runs' task vectors, a full
    denoiser.safetensors + soup.json): auto -> merged, equal to capo's sampler; lora refused."""
    members = [write_run(tmp_path / f"member{i}", str(tiny_models["sd"]), seed=i) for i in range(2)]
    run = RunDir.at(tmp_path / "soup")
    run.root.mkdir()
    run.write_base_model(members[0].read_base_model())
    write_soup(run, [m.model_dir for m in members], "slerp")
    assert _export(run, tmp_path / "lora", "--format", "lora") == 2
    assert not (tmp_path / "lora").exists()
    report = export(ExportConfig(run=str(run.root), out=str(tmp_path / "out")))
    assert report.format == "merged"
    tuned, adapter = capo_latents(run.read_base_model(), run.model_dir)
    assert (tuned - capo_latents(run.read_base_model())[0]).abs().max() > 1e-3
    merged = DiffusionPipeline.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(diffusers_latents(merged, adapter), tuned, rtol=0, atol=1e-4)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: diffusers" in card and "merged" in card.split("---")[1]
    assert "`slerp` merge of the task vectors of 2 fine-tunes" in card
    assert card.count("Pair rule: `frs`. Objective: `capo`") == 2 and card.count("LoRA rank 4, alpha 8") == 2


def _corrupt(run):
    (run.model_dir / LORA_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")


def _corrupt_without_manifest(run):  # a model/ written before capo kept manifests
    (run.model_dir / "manifest.json").unlink()
    _corrupt(run)


def _mismatched(run):
    path = run.model_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 2}))
    write_manifest(run.model_dir)  # consistent files, but r does not match the weights


def _no_model(run):
    for p in run.model_dir.iterdir():
        p.unlink()
    run.model_dir.rmdir()


def _no_weights(run):
    (run.model_dir / LORA_FILE).unlink()


def _no_base_model(run):
    run.base_model_path.unlink()


@pytest.mark.parametrize("damage", [_corrupt, _corrupt_without_manifest, _mismatched, _no_model, _no_weights,
                                    _no_base_model])
def test_bad_run_is_one_line_and_writes_nothing(damage, tmp_path, capsys):
    run = write_run(tmp_path / "run", "shapes-vp")
    damage(run)
    capsys.readouterr()
    out = tmp_path / "exports" / "out"
    assert _export(run, out, "--format", "merged") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("capo export: error: ") and "\n" not in err, err
    assert not (tmp_path / "exports").exists()


def test_out_rules(shapes_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _export(shapes_run, out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert _export(shapes_run, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / LORA_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left
    with pytest.raises(CapoError, match="format"):
        from_dict(ExportConfig, {"run": "r", "out": "o", "format": "ckpt"})


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls, uploads nothing."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kw["repo_id"], files))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/1"})()


def test_push_to_hub_is_one_upload_of_the_export(shapes_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    assert _export(shapes_run, tmp_path / "out", "--push-to-hub", "me/shapes-capo") == 0
    assert "pushed to https://huggingface.co/me/shapes-capo/commit/1" in capsys.readouterr().out
    created = {"repo_type": "model", "private": False, "exist_ok": True}
    uploaded = ["README.md", "adapter_config.json", LORA_FILE]
    assert FakeHub.calls == [("create_repo", "me/shapes-capo", created),
                             ("upload_folder", "me/shapes-capo", uploaded)]
    assert "me/shapes-capo" in (tmp_path / "out" / "README.md").read_text()  # the card's usage names the repo

    def offline(self, **kw):
        raise OSError("no network")

    monkeypatch.setattr(FakeHub, "upload_folder", offline)
    assert _export(shapes_run, tmp_path / "out2", "--push-to-hub", "me/x") == 2
    assert "push to the hub repo 'me/x' failed" in capsys.readouterr().err
    assert (tmp_path / "out2" / LORA_FILE).is_file()  # the export itself stays
