"""capo evaluate split into prompt chunks: two processes (torchrun) write the files of one, and a
rerun after an interruption scores only the chunks left."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml
from test_evaluate import REWARDS, config, make_run, models  # noqa: F401 - models is a fixture

import capo.pipeline.evalshard as E
from capo.pipeline.evaluate import Evaluation, evaluate, items_of
from capo.pipeline.prompts import load_prompts

FILES = ("results.json", "results.md", "scores.csv", "grid.png")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chunks_are_consecutive_prompts_with_all_their_seeds():
    prompts = load_prompts("shapes:heldout")[:5]
    cfg = dataclasses.replace(config("unused"), seeds=3, chunk_size=2)
    ev = Evaluation({"family": "shapes-vp"}, cfg, items_of(prompts, 3), REWARDS)
    parts = E.chunks(ev)
    assert [len(c.items) for c in parts] == [6, 6, 3]
    assert [i for c in parts for i in c.items] == ev.items
    assert {p.prompt_id for p, _ in parts[1].items} == {prompts[2].prompt_id, prompts[3].prompt_id}
    assert E.grid_items(ev) == {0, 3, 6}  # grid_prompts = 3: seed 0 of the first three prompts
    balanced = dataclasses.replace(ev, items=[(prompts[0], 0), (prompts[0], 1), (prompts[1], 0),
                                              (prompts[2], 0), (prompts[2], 1), (prompts[2], 2)])
    assert E.bounds(balanced) == [range(0, 3), range(3, 6)]  # prompts {0, 1}, {2}: all their seeds


class Stop(Exception):
    pass


def test_interrupted_evaluation_resumes_with_the_chunks_left(tmp_path, models, monkeypatch):  # noqa: F811
    base, _, other = models
    whole = make_run(tmp_path / "whole", base)
    evaluate(whole, config(other, chunk_size=2, out=str(whole.eval_dir)))
    cut = make_run(tmp_path / "cut", base)
    write = E.write_table_atomic

    def die_after_first_part(table, path):
        write(table, path)
        raise Stop

    monkeypatch.setattr(E, "write_table_atomic", die_after_first_part)
    with pytest.raises(Stop):
        evaluate(cut, config(other, chunk_size=2, out=str(cut.eval_dir)))
    monkeypatch.setattr(E, "write_table_atomic", write)
    (parts,) = cut.eval_dir.glob(".parts-*")
    assert [p.name for p in parts.iterdir()] == ["part-00000-00000.parquet"]
    sampled, sample = [], Evaluation.sample

    def logged(self, adapter, desc):
        sampled.append(desc)
        return sample(self, adapter, desc)

    monkeypatch.setattr(Evaluation, "sample", logged)
    evaluate(cut, config(other, chunk_size=2, out=str(cut.eval_dir)))
    assert sampled == [f"evaluate {g} [rank 0, chunk {c}]" for g in ("base", "tuned") for c in (1, 2)]
    assert not list(cut.eval_dir.glob(".parts-*"))  # merged, then removed
    for name in FILES:
        assert (cut.eval_dir / name).read_bytes() == (whole.eval_dir / name).read_bytes(), name


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(tmp_path, models):  # noqa: F811
    base, _, other = models
    runs = [make_run(tmp_path / name, base) for name in ("one", "two")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    procs = []
    for run, prefix in zip(runs, ([sys.executable], torchrun), strict=True):
        settings = dataclasses.asdict(config(other, chunk_size=2, device="cpu", out=str(run.eval_dir)))
        # 6 prompts in chunks of 2: chunks 0 and 2 on rank 0, chunk 1 on rank 1
        (run.root / "eval.yaml").write_text(yaml.safe_dump({"evaluate": settings}))
        args = [*prefix, "-m", "capo.cli", "evaluate", "--run-dir", str(run.root),
                "--config", str(run.root / "eval.yaml")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    logs = []
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read()[-3000:]
        logs.append(p.stderr.read())
    assert "evaluate tuned [rank 1, chunk 1]" in logs[1] and "rank 1, chunk 0" not in logs[1]
    for name in FILES:
        assert (runs[0].eval_dir / name).read_bytes() == (runs[1].eval_dir / name).read_bytes(), name
