"""The training pair stream over a run directory (docs/design.md §1.1, §2.5).

Nothing per sample is preloaded: the pairs' cached latents and the prompts' text embeddings are
read per batch from the run's training store (memory-mapped Arrow IPC, ``capo.pipeline.pairstore``;
the denoiser is the only model training needs), and a ``torch.utils.data.DataLoader`` over steps
(``StepBatches``, ``pair_loader``) assembles batches ahead in worker processes.

The stream is a pure function of (seed, step): global pair position g = step * G + i (G pairs per
optimizer step) visits prompt ``perm_epoch[g mod P]`` of epoch ``g // P``; that visit draws
x+ ~ U(X+) and x- ~ U(X-) from a generator seeded by (seed, epoch, prompt index), and the pair's
K draws of (t, noises) come from a generator seeded by (seed, step, i), draw after draw (so draw 0
is the same for every K). Rank r of W takes pairs
[r G/W, (r+1) G/W), so the union over ranks is the same for any W (exact resume, 1 = 2 processes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from capo.errors import CapoError
from capo.pipeline import pairstore
from capo.pipeline.pairstore import TensorColumn
from capo.pipeline.rundir import RunDir

#: stream tags keeping the prompt order, the X+/X- picks and the noise independent
ORDER, PICK, NOISE = 0, 1, 2


def stream_seed(*key: int) -> int:
    """A 63-bit seed for a torch.Generator, a hash of the integer key (numpy SeedSequence)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class PairBatch:
    """B preference pairs with K (t, noise) draws each: x_pos, x_neg [B, C, H, W];
    eps_pos, eps_neg [B, K, C, H, W]; t [B, K]; delta_rca [B];
    emb: batch-first text embeddings of each pair's prompt ([B, ...] per key)."""

    x_pos: torch.Tensor
    x_neg: torch.Tensor
    eps_pos: torch.Tensor
    eps_neg: torch.Tensor
    t: torch.Tensor
    delta_rca: torch.Tensor
    emb: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.t.shape[0]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PairBatch:
        """The same batch with ``fn`` applied to every tensor (device moves, slicing)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return PairBatch(**{k: {n: fn(t) for n, t in v.items()} if isinstance(v, dict) else fn(v)
                            for k, v in values.items()})

    def to(self, device: torch.device | str) -> PairBatch:
        return self.apply(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> PairBatch:
        """Page-locked copies (DataLoader's ``pin_memory`` calls this), for asynchronous copies to CUDA."""
        return self.apply(lambda x: x.pin_memory())

    def split(self, parts: int) -> list[PairBatch]:
        """``parts`` equal consecutive micro-batches (gradient accumulation)."""
        size = len(self) // parts
        return [self.apply(lambda x, i=i: x[i * size:(i + 1) * size]) for i in range(parts)]


@dataclass(frozen=True)
class Side:
    """X+ (or X-) of every prompt, flat: prompt p's samples are the latent rows
    ``rows[offsets[p]:offsets[p + 1]]`` of the store, with their R_ca in ``rca``."""

    rows: np.ndarray
    rca: np.ndarray
    offsets: np.ndarray

    def size(self, p: int) -> int:
        return int(self.offsets[p + 1] - self.offsets[p])

    def at(self, p: int, i: int) -> tuple[int, float]:
        """(latent row, R_ca) of prompt p's i-th sample."""
        k = self.offsets[p] + i
        return int(self.rows[k]), float(self.rca[k])


class PairSet:
    """Prompts with a non-empty X+ and X-; their latents [M, C, H, W] and embeddings [P', ...] are
    memory-mapped columns of the run's training store (``capo.pipeline.pairstore``), read per batch;
    ``emb_rows[p]`` is prompt p's embedding row."""

    def __init__(self, prompt_ids: list[str], latents: TensorColumn, emb: dict[str, TensorColumn],
                 emb_rows: np.ndarray, positives: Side, negatives: Side):
        if not prompt_ids:
            raise CapoError("no prompt has both a positive and a negative sample; nothing to train on")
        self.prompt_ids, self.latents, self.emb, self.emb_rows = prompt_ids, latents, emb, emb_rows
        self.positives, self.negatives = positives, negatives
        self._perm: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def from_run(cls, run: RunDir) -> PairSet:
        """Read pairs.parquet, then open (on first use: build) the store of the latents and
        embeddings the pairs use; nothing per sample is loaded into memory."""
        table = run.read_pairs()
        lengths = {c: pc.list_value_length(table.column(c)).fill_null(0).to_numpy()
                   for c in ("positives", "negatives", "pos_rca", "neg_rca")}
        keep = _usable_rows(lengths, str(run.pairs_path))
        if not keep.size:
            raise CapoError("no prompt has both a positive and a negative sample", path=str(run.pairs_path))
        kept = table.take(pa.array(keep)).combine_chunks()
        pids = kept.column("prompt_id").chunk(0)
        flat = {c: pc.list_flatten(kept.column(c).chunk(0)).to_numpy() for c in lengths}
        code = pairstore.codes(pids, pids)
        keys = {s: pairstore.key(code[pc.list_parent_indices(kept.column(s).chunk(0)).to_numpy()], flat[s])
                for s in ("positives", "negatives")}
        wanted = np.unique(np.concatenate([keys["positives"], keys["negatives"]]))
        row_keys, latents, emb_rows, emb = pairstore.load(run, pids, wanted)
        order = np.argsort(row_keys)
        sides = [Side(_rows_of(keys[s], row_keys, order, run), flat[rca],
                      np.concatenate([[0], np.cumsum(lengths[s][keep])]))
                 for s, rca in (("positives", "pos_rca"), ("negatives", "neg_rca"))]
        return cls(pids.to_pylist(), latents, emb, emb_rows, *sides)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """Prompt order of one epoch, a permutation seeded by (seed, epoch)."""
        if epoch not in self._perm:
            rng = np.random.default_rng(stream_seed(seed, ORDER, epoch))
            self._perm = {epoch: rng.permutation(len(self))}
        return self._perm[epoch]

    def pick(self, seed: int, position: int) -> tuple[int, int, int, float]:
        """(prompt, latent row of x+, latent row of x-, delta_rca) at global stream position."""
        epoch, k = divmod(position, len(self))
        p = int(self.order(seed, epoch)[k])
        rng = np.random.default_rng(stream_seed(seed, PICK, epoch, p))
        i, j = rng.integers(self.positives.size(p)), rng.integers(self.negatives.size(p))
        (pos, pos_rca), (neg, neg_rca) = self.positives.at(p, int(i)), self.negatives.at(p, int(j))
        return p, pos, neg, pos_rca - neg_rca

    def batch(self, seed: int, step: int, global_batch: int, rank: int, world: int,
              sample_t: Callable[..., torch.Tensor], share_noise: bool = False, draws: int = 1
              ) -> PairBatch:
        """This rank's pairs [r G/W, (r+1) G/W) of global batch ``step`` (on CPU, float32)."""
        if global_batch % world:
            raise CapoError(f"batch_size {global_batch} is not divisible by {world} processes")
        local = range(rank * global_batch // world, (rank + 1) * global_batch // world)
        picks = [self.pick(seed, step * global_batch + i) for i in local]
        prompts, pos, neg, drca = (list(c) for c in zip(*picks, strict=True))
        t, eps_pos, eps_neg = _noise(seed, step, local, self.latents.shape[1:], sample_t, share_noise, draws)
        return PairBatch(
            x_pos=self.latents[pos].float(), x_neg=self.latents[neg].float(), eps_pos=eps_pos,
            eps_neg=eps_neg, t=t, delta_rca=torch.tensor(drca, dtype=torch.float32),
            emb={k: v[self.emb_rows[prompts]] for k, v in self.emb.items()},
        )


class StepBatches(Dataset):
    """Map-style dataset over optimizer steps: item ``step`` is this rank's ``PairSet.batch`` of
    global batch ``step``, so a DataLoader over any range of steps, with any number of workers,
    yields the pair stream of ``PairSet.batch`` unchanged."""

    def __init__(self, data: PairSet, seed: int, global_batch: int, rank: int, world: int,
                 sample_t: Callable[..., torch.Tensor], share_noise: bool = False, draws: int = 1):
        self.data, self.seed, self.global_batch, self.rank, self.world = data, seed, global_batch, rank, world
        self.sample_t, self.share_noise, self.draws = sample_t, share_noise, draws

    def __getitem__(self, step: int) -> PairBatch:
        return self.data.batch(self.seed, step, self.global_batch, self.rank, self.world, self.sample_t,
                               self.share_noise, self.draws)


def pair_loader(batches: StepBatches, steps: range, workers: int, prefetch: int,
                pin_memory: bool) -> DataLoader:
    """Batches of ``steps`` in order: ``workers`` processes (0: this one) each keep ``prefetch``
    batches ready; ``pin_memory`` page-locks them (for CUDA)."""
    return DataLoader(batches, batch_size=None, sampler=steps, num_workers=workers,
                      prefetch_factor=prefetch if workers else None, pin_memory=pin_memory,
                      collate_fn=_as_is, generator=torch.Generator())  # leaves the global RNG alone


def _as_is(batch: PairBatch) -> PairBatch:
    return batch


def _noise(seed: int, step: int, pairs: Sequence[int], shape: torch.Size,
           sample_t: Callable[..., torch.Tensor], share_noise: bool, draws: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair i, K = ``draws`` times in turn: t ~ schedule, eps+ and eps- ~ N(0, I) (eps- = eps+
    with share_noise), from one generator seeded by (seed, step, i); draw k < K is the same for
    every K. Returns t [B, K], eps_pos [B, K, *shape], eps_neg [B, K, *shape]."""
    ts, pos, neg = [], [], []
    for i in pairs:
        gen = torch.Generator().manual_seed(stream_seed(seed, NOISE, step, i))
        for _ in range(draws):
            ts.append(sample_t(1, generator=gen).float())
            pos.append(torch.randn(shape, generator=gen))
            neg.append(pos[-1] if share_noise else torch.randn(shape, generator=gen))
    b = len(pairs)
    return (torch.cat(ts).view(b, draws), torch.stack(pos).view(b, draws, *shape),
            torch.stack(neg).view(b, draws, *shape))


def _usable_rows(lengths: dict[str, np.ndarray], path: str) -> np.ndarray:
    """Rows of pairs.parquet with a non-empty X+ and X-; lists and their R_ca must match in length."""
    wrong_pos = lengths["positives"] != lengths["pos_rca"]
    wrong_neg = lengths["negatives"] != lengths["neg_rca"]
    bad = np.flatnonzero(wrong_pos | wrong_neg)
    if bad.size:
        idx, rca = ("positives", "pos_rca") if wrong_pos[bad[0]] else ("negatives", "neg_rca")
        raise CapoError(f"'{idx}' and '{rca}' differ in length", path=path, row=int(bad[0]))
    return np.flatnonzero((lengths["positives"] > 0) & (lengths["negatives"] > 0))


def _rows_of(keys: np.ndarray, row_keys: np.ndarray, order: np.ndarray, run: RunDir) -> np.ndarray:
    """The store row of each latent key (``order`` sorts ``row_keys``)."""
    at = order[np.minimum(np.searchsorted(row_keys, keys, sorter=order), len(order) - 1)]
    if not np.array_equal(row_keys[at], keys):
        raise CapoError("the training store lacks a latent named in pairs.parquet; remove it to rebuild",
                        path=str(run.root / pairstore.STORE_DIR))
    return at
