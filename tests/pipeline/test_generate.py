"""Stage generate with a tiny random shapes model: layout, seeds, determinism, resume after
kill -9, and 2-process (torchrun) generation equal to 1 process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capo.errors import CapoError
from capo.pipeline.generate import GenerateConfig, generate, sample_seed
from capo.pipeline.rundir import RunDir, shard_name

N_PROMPTS, N_SAMPLES, STEPS = 6, 4, 2

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

@pytest.fixture(scope="module")
def prompts(prompt_file) -> str:
    return prompt_file(N_PROMPTS)  # tests/pipeline/conftest.py


def cli_args(model: str, prompts: str, run: Path, chunk: int = 2) -> list[str]:
    return ["generate", "--run-dir", str(run), "--model", model, "--prompts", prompts,
            "--samples-per-prompt", str(N_SAMPLES), "--steps", str(STEPS), "--chunk-size", str(chunk)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def rows(run: Path) -> list[tuple]:
    t = RunDir.at(run).read_samples().to_pydict()
    images = [i["bytes"] for i in t["image"]]
    return sorted(zip(t["prompt_id"], t["sample_idx"], t["seed"], images, t["latent"], strict=True))


def embeddings(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return RunDir.at(run).read_embeddings()


def test_generate_layout_seeds_and_rerun(tmp_path, base_model, prompts):
    run = RunDir.at(tmp_path / "run")
    cfg = GenerateConfig(model=base_model, prompts=prompts, samples_per_prompt=N_SAMPLES, steps=STEPS,
                         chunk_size=4, batch_size=5)
    report = generate(run, cfg)
    assert (report.prompts, report.chunks, report.written, report.samples_written) == (6, 2, 2, 24)
    assert sorted(p.name for p in run.samples_dir.iterdir()) == [shard_name(0, 0), shard_name(0, 1)]
    t = run.read_samples().to_pydict()
    ids = run.read_prompts().column("prompt_id").to_pylist()
    assert t["prompt_id"] == [i for i in ids for _ in range(N_SAMPLES)]
    assert t["seed"] == [sample_seed(0, i, s) for i, s in zip(t["prompt_id"], t["sample_idx"], strict=True)]
    assert len(set(t["seed"])) == 24
    lat = run.read_latents()
    assert lat[(ids[0], 0)].shape == (3, 32, 32) and not torch.equal(lat[(ids[0], 0)], lat[(ids[0], 1)])
    emb = run.read_embeddings()
    assert sorted(emb) == sorted(ids)
    assert run.read_base_model()["family"] == "shapes-vp"
    assert run.load_config()["generate"]["samples_per_prompt"] == N_SAMPLES
    # a rerun skips every chunk; a fresh run dir with another batch size reproduces the samples
    assert generate(run, cfg).skipped == 2
    generate(RunDir.at(tmp_path / "again"), GenerateConfig(**{**cfg.__dict__, "batch_size": 5}))
    assert rows(tmp_path / "again") == rows(run.root)


def test_datasets_reads_images(tmp_path, base_model, prompts):
    datasets = pytest.importorskip("datasets")
    run = RunDir.at(tmp_path / "run")
    generate(run, GenerateConfig(model=base_model, prompts=prompts, samples_per_prompt=2, steps=1))
    ds = datasets.load_dataset("parquet", data_files=str(run.samples_dir / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 12 and isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (32, 32)


def test_incompatible_rerun_names_key(tmp_path, base_model, prompts):
    run = RunDir.at(tmp_path / "run")
    cfg = GenerateConfig(model=base_model, prompts=prompts, samples_per_prompt=2, steps=1, chunk_size=6)
    generate(run, cfg)
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    with pytest.raises(CapoError, match="config key 'samples_per_prompt' is 3 but this run's samples used 2"):
        generate(run, GenerateConfig(**{**cfg.__dict__, "samples_per_prompt": 3}))
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, base_model, prompts) -> Path:
    """An uninterrupted 1-process run (chunks of 1 prompt, one thread)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run([sys.executable, "-m", "capo.cli", *cli_args(base_model, prompts, run, chunk=1)],
                   check=True, env=env(), capture_output=True)
    return run


@pytest.mark.slow
def test_kill9_then_rerun_equals_uninterrupted(tmp_path, base_model, prompts, reference_run):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "capo.cli", *cli_args(base_model, prompts, run, chunk=1)]
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((run / "samples").glob("part-*.parquet")) and time.time() < deadline:
        assert proc.poll() is None, "generate finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((run / "samples").glob("part-*.parquet")))
    assert 1 <= done < N_PROMPTS
    subprocess.run(args, check=True, env=env(), capture_output=True)
    assert rows(run) == rows(reference_run)
    ref_emb, emb = embeddings(reference_run), embeddings(run)
    assert sorted(emb) == sorted(ref_emb)
    assert all(torch.equal(emb[p][k], ref_emb[p][k]) for p in emb for k in emb[p])


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, base_model, prompts, reference_run):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    run = tmp_path / "run"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "capo.cli",
           *cli_args(base_model, prompts, run, chunk=1)]
    subprocess.run(cmd, check=True, env=env(), capture_output=True, timeout=300)
    names = sorted(p.name for p in (run / "samples").iterdir())
    assert names == sorted(shard_name(c % 2, c) for c in range(N_PROMPTS))  # each rank its own chunks
    assert rows(run) == rows(reference_run)
    assert pq.read_table(run / "prompts.parquet").num_rows == N_PROMPTS
