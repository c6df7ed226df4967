"""The training store (RUN/trainset/, memory-mapped Arrow IPC) and the DataLoader over steps."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import make_run, tensors

from capo.errors import CapoError
from capo.models.base import detect_family, load_model
from capo.pipeline import pairstore
from capo.pipeline.rundir import PAIRS_SCHEMA, embeddings_table, samples_table, shard_name, write_table_atomic
from capo.pipeline.trainset import PairSet, StepBatches, pair_loader

pytestmark = pytest.mark.usefixtures("one_thread")


def sample_t(run):
    return load_model(*detect_family(run.read_base_model()["path"]), device="cpu").schedule.sample_t


def test_store_holds_exactly_the_pairs_latents_and_is_built_once(tmp_path, base_model):
    run = make_run(tmp_path / "run", base_model, n_prompts=3)
    data = PairSet.from_run(run)
    store = run.root / pairstore.STORE_DIR
    latents, built = run.read_latents(), {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    assert sorted(built) == [pairstore.EMBEDDINGS_FILE, pairstore.LATENTS_FILE]
    assert isinstance(data.latents, pairstore.TensorColumn) and data.latents.shape[0] == 2 * 3  # {0, 1, 3}
    for p, pid in enumerate(data.prompt_ids):
        for side, idx in ((data.positives, [0, 1]), (data.negatives, [3])):
            got = [data.latents[side.at(p, i)[0]] for i in range(side.size(p))]
            assert all(torch.equal(g, latents[(pid, k)]) for g, k in zip(got, idx, strict=True))
    embeddings = run.read_embeddings(data.prompt_ids)
    for name, column in data.emb.items():
        assert torch.equal(column[data.emb_rows], torch.stack([embeddings[p][name] for p in data.prompt_ids]))
    PairSet.from_run(run)
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == built  # reused, not rewritten
    table = run.read_pairs().to_pydict()
    table["positives"][0], table["pos_rca"][0] = [2], [0.5]  # another selection: rebuilt
    write_table_atomic(pa.table(table, schema=PAIRS_SCHEMA), run.pairs_path)
    again = PairSet.from_run(run)
    assert torch.equal(again.latents[again.positives.at(0, 0)[0]], latents[(again.prompt_ids[0], 2)])


def test_store_reads_across_shards(tmp_path, base_model):
    run = make_run(tmp_path / "shards", base_model, n_prompts=5)
    cached = run.read_embeddings()  # + a second key: safetensors blobs list their keys in any order
    pids = list(cached)
    emb = {"encoder_hidden_states": torch.stack([cached[p]["encoder_hidden_states"] for p in pids]),
           "pooled": torch.randn(len(pids), 3)}
    write_table_atomic(embeddings_table(pids, emb), run.embeddings_dir / shard_name(0, 0))
    for directory in (run.samples_dir, run.embeddings_dir):  # two chunks: rows split 3 + rest
        table = pq.read_table(directory / shard_name(0, 0))
        cut = 3 * (table.num_rows // 5)
        write_table_atomic(table.slice(0, cut), directory / shard_name(0, 0))
        write_table_atomic(table.slice(cut), directory / shard_name(1, 1))
    data, latents, embeddings = PairSet.from_run(run), run.read_latents(), run.read_embeddings()
    for p, pid in enumerate(data.prompt_ids):
        row, _ = data.negatives.at(p, 0)
        assert torch.equal(data.latents[row], latents[(pid, 3)])
        assert sorted(data.emb) == ["encoder_hidden_states", "pooled"]
        for name, column in data.emb.items():
            assert torch.equal(column[int(data.emb_rows[p])], embeddings[pid][name])


def test_bfloat16_latents_round_trip_and_rows_index_like_a_tensor(tmp_path, base_model):
    run = make_run(tmp_path / "bf16", base_model, n_prompts=2)
    lat = torch.randn(8, 4, 3, 5).to(torch.bfloat16)
    pids = [p for p in run.read_pairs().column("prompt_id").to_pylist() for _ in range(4)]
    write_table_atomic(samples_table(pids, [0, 1, 2, 3] * 2, list(range(8)), [b""] * 8, lat),
                       run.samples_dir / shard_name(0, 0))
    column = PairSet.from_run(run).latents
    assert column.shape == torch.Size([3, 4, 3, 5]) and column[0].dtype == torch.bfloat16
    stacked = torch.stack([lat[i] for i in (0, 1, 3)])  # the one usable prompt's X+ {0, 1}, X- {3}
    assert torch.equal(column[[0, 1, 2]], stacked) and torch.equal(column[2], lat[3])
    with pytest.raises(IndexError):
        column[[3]]


def test_missing_latent_is_a_one_line_error(tmp_path, base_model):
    run = make_run(tmp_path / "missing", base_model, n_prompts=2)
    table = run.read_pairs().to_pydict()
    table["negatives"][0] = [9]
    write_table_atomic(pa.table(table, schema=PAIRS_SCHEMA), run.pairs_path)
    with pytest.raises(CapoError, match=r"samples: 1 latent\(s\) named in pairs.parquet are missing"):
        PairSet.from_run(run)
    assert not (run.root / pairstore.STORE_DIR / pairstore.LATENTS_FILE).exists()


def test_loader_with_workers_yields_the_pair_stream(tmp_path, base_model):
    run = make_run(tmp_path / "loader", base_model, n_prompts=4)
    data = PairSet.from_run(run)
    batches = StepBatches(data, 3, 4, 1, 2, sample_t(run))
    state = torch.get_rng_state()
    got = list(pair_loader(batches, range(2, 6), workers=2, prefetch=2, pin_memory=False))
    assert torch.equal(torch.get_rng_state(), state)  # the loader draws from its own generator
    for step, batch in zip(range(2, 6), got, strict=True):
        expected = data.batch(3, step, 4, 1, 2, sample_t(run))
        assert all(torch.equal(v, tensors(batch)[k]) for k, v in tensors(expected).items())
