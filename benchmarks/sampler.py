"""Sampler: the batched draw vs the same arithmetic row by row (issue 12, item 4).

    .venv/bin/python benchmarks/sampler.py --threads 2

64 rows of the default model's vocabulary (49,152), float32 logits, each row with its own seeded
generator, for temperature only, top-k 50 and top-p 0.9: median ms per step of `sampler.sample`
(rows filtered together, in chunks of 16 on CPU; one host copy) against `sampler._draw` called
per row (what a per-row sampler costs: a filter, a softmax and a host sync per row). The
sampler before issue 12 drew each row with `torch.multinomial` after a per-row filter: 93 /
126 / 389 ms per step for these three cases on the CI machine (measured before the change).
"""

from __future__ import annotations

import torch

from common import median_seconds, parser, setup, table
from peftserve.server.engine import sampler
from peftserve.server.engine.request import SamplingParams


def timed(fn, repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    setup(args)
    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(args.seed)) * 3
    out = []
    for name, params in (("temperature 0.8", SamplingParams(temperature=0.8)),
                         ("top-k 50", SamplingParams(temperature=0.8, top_k=50)),
                         ("top-p 0.9", SamplingParams(temperature=0.8, top_p=0.9))):
        gens = [torch.Generator().manual_seed(i) for i in range(args.rows)]
        batched = timed(lambda: sampler.sample(logits, [params] * args.rows, gens), args.repeats)
        per_row = timed(lambda: [sampler._draw(logits[r], params, sampler._uniform(gens[r]))
                                 for r in range(args.rows)], args.repeats)
        out.append([name, f"{per_row:.1f}", f"{batched:.1f}", f"{per_row / batched:.1f}x"])
    table(f"sampling {args.rows} rows x {args.vocab} vocab, ms per step", ["params", "row by row", "batched", "speed-up"],
          out)


if __name__ == "__main__":
    main()
