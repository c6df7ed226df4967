"""Draw-to-draw noise of the implicit reward margin at a fixed model (docs/objectives.md).

For the first ``--pairs`` pairs of a run's training stream and ``--draws`` (t, ε) draws each,
computes βΔ_θ,k per draw under the run's trained model (RUN/model, LoRA) against the base, with
independent and with shared noise (x⁺ and x⁻ get the same ε), under normalised (default) or the
paper's un-normalised sigmoid weighting. Prints, per noise mode: the mean within-pair std of
βΔ_θ over draws (the jitter one draw carries; a K-draw mean has jitter / sqrt(K)), the std over
pairs of each pair's mean over all draws (the signal), and the mean |βΔ_θ| per draw.

    python bench/margin_noise.py --run RUN --beta 300 [--pairs 48] [--draws 16] [--paper]
"""

from __future__ import annotations

import argparse

import torch

from capo.pipeline.generate import load_base
from capo.pipeline.preference import REFERENCES, margin
from capo.pipeline.rundir import RunDir
from capo.pipeline.trainset import PairBatch, PairSet
from capo.pipeline.tuned import apply_trained
from capo.weighting import build


def per_draw(batch: PairBatch, k: int) -> PairBatch:
    """Only draw k of every pair."""
    return PairBatch(
        x_pos=batch.x_pos,
        x_neg=batch.x_neg,
        eps_pos=batch.eps_pos[:, k : k + 1],
        eps_neg=batch.eps_neg[:, k : k + 1],
        t=batch.t[:, k : k + 1],
        delta_rca=batch.delta_rca,
        emb=batch.emb,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--bias", type=float, default=1.5)
    p.add_argument("--paper", action="store_true", help="un-normalised weighting")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = RunDir.at(args.run)
    adapter = apply_trained(
        load_base(run.read_base_model(), torch.device("cpu"), load_text_encoders=False, load_vae=False),
        run.model_dir,
    )
    reference = REFERENCES[True](adapter.denoiser)
    weighting, mean = build("sigmoid", adapter.schedule, not args.paper, bias=args.bias)
    data = PairSet.from_run(run)
    print(
        f"E_t f = {mean:.4f} ({'paper form' if args.paper else 'normalised'}), beta {args.beta:g}, "
        f"{args.pairs} pairs x {args.draws} draws"
    )
    for shared in (False, True):
        batch = data.batch(0, 0, args.pairs, 0, 1, adapter.schedule.sample_t, shared, args.draws)
        with torch.no_grad():
            draws = (
                torch.stack(
                    [
                        margin(adapter, adapter.denoiser, reference, per_draw(batch, k), weighting)[0]
                        for k in range(args.draws)
                    ],
                    dim=1,
                )
                * args.beta
            )
        print(
            f"share_noise={shared!s:5}: jitter per draw (mean within-pair std) "
            f"{draws.std(dim=1).mean():.4g}; signal (std over pairs of the pair mean) "
            f"{draws.mean(dim=1).std():.4g}; mean |beta*margin| per draw {draws.abs().mean():.4g}; "
            f"E[delta_rca] {batch.delta_rca.mean():.4g}"
        )


if __name__ == "__main__":
    main()
