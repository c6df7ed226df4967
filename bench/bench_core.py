"""Benchmark: calibrate (Eq. 7) + FRS (Sec. 4.3) over P prompts, vectorised vs a per-prompt loop.

    python bench/bench_core.py [--prompts 100000] [--samples 16] [--rewards 3] [--loop-prompts 2000]

Times capo.calibration.calibrate (once per reward) + ensemble + capo.pairs.frontier_sets on
random rewards [P, N, L], then a plain per-prompt Python implementation of the same maths on the
first --loop-prompts prompts (all of them if --loop-prompts >= P), checks that both agree there,
and prints the loop time extrapolated linearly to P prompts and the speed ratio.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from capo.calibration import calibrate, ensemble
from capo.pairs import frontier_sets


def vectorised(R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """capo's path: R [P, N, L] -> (R_ca [P, N, L], X+ [P, N], X- [P, N])."""
    R_ca = np.stack([calibrate(R[:, :, j]) for j in range(R.shape[2])], axis=2)
    ensemble(R_ca)  # the training target; timed as part of the pipeline
    positive, negative = frontier_sets(R_ca)
    return R_ca, positive, negative


def loop_prompt(r: list[list[float]]) -> tuple[list[list[float]], list[bool], list[bool]]:
    """One prompt, plain Python: r[i][j] = reward j of sample i -> (R_ca, X+, X-)."""
    n, L = len(r), len(r[0])
    rca = [
        [sum(1 / (1 + math.exp(r[k][j] - r[i][j])) for k in range(n) if k != i) / (n - 1) for j in range(L)]
        for i in range(n)
    ]

    def dominates(a: list[float], b: list[float]) -> bool:
        pairs = list(zip(a, b, strict=True))
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    upper = [not any(dominates(rca[i], rca[k]) for i in range(n)) for k in range(n)]
    lower = [not any(dominates(rca[i], rca[k]) for k in range(n)) for i in range(n)]
    pos = [u and not d for u, d in zip(upper, lower, strict=True)]
    neg = [d and not u for u, d in zip(upper, lower, strict=True)]
    if not any(pos) or not any(neg):
        mean = [sum(x) / L for x in rca]
        best = max(range(n), key=mean.__getitem__)
        worst = min(range(n), key=mean.__getitem__)
        tie = mean[best] == mean[worst]
        pos = [i == best and not tie for i in range(n)]
        neg = [i == worst and not tie for i in range(n)]
    return rca, pos, neg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--rewards", type=int, default=3)
    ap.add_argument("--loop-prompts", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    P, N, L = args.prompts, args.samples, args.rewards
    R = np.random.default_rng(0).normal(size=(P, N, L))
    print(f"P={P:,} prompts, N={N} samples, L={L} rewards (random normal logits, float64)")

    times, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        R_ca, positive, negative = vectorised(R)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    best = min(times)
    print(
        f"vectorised calibrate x{L} + ensemble + FRS: best {best:.3f} s wall "
        f"of {args.repeats} runs ({', '.join(f'{t:.3f}' for t in times)}); "
        f"CPU time best {min(cpu):.3f} s"
    )
    start = time.perf_counter()
    frontier_sets(R_ca)
    print(f"  of which FRS alone: {time.perf_counter() - start:.3f} s wall")

    n_loop = min(args.loop_prompts, P)
    rows = R[:n_loop].tolist()
    start = time.perf_counter()
    looped = [loop_prompt(r) for r in rows]
    loop_s = time.perf_counter() - start  # single-threaded pure Python: wall ~ CPU time
    rca_loop = np.array([x[0] for x in looped])
    assert np.allclose(rca_loop, R_ca[:n_loop], atol=1e-12), "loop and vectorised R_ca differ"
    assert (np.array([x[1] for x in looped]) == positive[:n_loop]).all(), "X+ differs"
    assert (np.array([x[2] for x in looped]) == negative[:n_loop]).all(), "X- differs"
    full_loop = loop_s * P / n_loop
    label = "measured" if n_loop == P else f"EXTRAPOLATED from {n_loop:,} prompts ({loop_s:.2f} s)"
    print(f"per-prompt Python loop, {P:,} prompts: {full_loop:.1f} s ({label})")
    print(f"results agree on the first {n_loop:,} prompts; speed-up: {full_loop / best:.0f}x")


if __name__ == "__main__":
    main()
