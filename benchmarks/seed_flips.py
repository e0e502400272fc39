"""How often a token changes when its row is computed alone instead of in a batch.

    .venv/bin/python benchmarks/seed_flips.py                                   # tiny model
    .venv/bin/python benchmarks/seed_flips.py --model default --batch 64 --pairs 512 --draws 1000
    (add --dtype bfloat16 for bf16)

The forward is not batch-invariant: CPU matmul kernels round a row differently with the number of
rows, so a decode row's logits computed alone (1 row) and among `--batch` rows (the same token ids
through the same model) may differ in their last bits, more after many bf16 layers
(docs/openai.md, "seed"). A greedy token changes where that difference reorders its best two
logits; a seeded one, which takes the same uniform either way, where it moves a boundary of the
CDF across the draw or changes which tokens top-k / top-p keep. For each setting this prints the
per-token chance of another token (each (alone, batched) pair of logits against `--draws`
uniforms, with the engine's own filter and inverse-CDF draw) and how many rows kept another set
of tokens. `tiny` is the test suite's 2-layer random Llama at the default tokenizer's 49,152-token
vocabulary (near-uniform distributions); `default` is SmolLM2-135M-Instruct (use `--batch 64`:
its down-projection rounds every row count below 57 differently from 64). The tests that compare a
seeded request across batch shapes sample at top-k 3-5 because of these figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import environment, load_model, parser, setup, table, write_json
from peftserve.adapters.base_model import tiny_random_llama
from peftserve.server.engine.request import SamplingParams
from peftserve.server.engine.sampler import draw_tokens, filter_logits_batch

SETTINGS = {
    "greedy": dict(),
    "temperature 1.0": dict(temperature=1.0),
    "temperature 0.3": dict(temperature=0.3),
    "top-p 0.9 (T 0.9)": dict(temperature=0.9, top_p=0.9),
    "top-k 200 + top-p 0.95 (T 0.9)": dict(temperature=0.9, top_k=200, top_p=0.95),
    "top-k 50 (T 1.0)": dict(temperature=1.0, top_k=50),
    "top-k 5 (T 1.0)": dict(temperature=1.0, top_k=5),
    "top-k 5 + top-p 0.9 (T 0.9)": dict(temperature=0.9, top_k=5, top_p=0.9),
}


@torch.no_grad()
def logit_pairs(model, vocab: int, pairs: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (alone, batched), each [pairs, V] float32: one decode position per row, computed in a
    forward of its own and in a forward of `batch` rows."""
    alone, batched = [], []
    for _ in range(max(pairs // batch, 1)):
        ids = torch.randint(0, vocab, (batch, 1), generator=generator)  # [B, 1]
        batched.append(model(ids).logits[:, -1].float())
        alone.append(torch.cat([model(ids[r:r + 1]).logits[:, -1].float() for r in range(batch)]))
    return torch.cat(alone), torch.cat(batched)


def draws(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [R, V], uniforms [D] -> token ids [R, D]: `sampler.draw_tokens`'s inverse-CDF
    arithmetic, every uniform at once (the row's CDF is summed once, not once per uniform)."""
    cdf = probs.double().cumsum(dim=-1)  # [R, V]
    target = uniforms[None, :] * cdf[:, -1:]  # [R, D]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)


def flip_rate(alone: torch.Tensor, batched: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor,
              chunk: int = 128) -> tuple[float, int]:
    """-> (per-token chance of a different token, rows whose kept set differs)."""
    if params.greedy:  # the argmax: no draw, and every token kept
        return float((alone.argmax(dim=-1) != batched.argmax(dim=-1)).double().mean()), 0
    flips = kept_differs = 0
    for i in range(0, alone.shape[0], chunk):
        a, b = alone[i:i + chunk], batched[i:i + chunk]
        fa = filter_logits_batch(a, [params] * a.shape[0])  # [r, V]
        fb = filter_logits_batch(b, [params] * b.shape[0])
        kept_differs += int((torch.isinf(fa) != torch.isinf(fb)).any(dim=-1).sum())
        pa, pb = torch.softmax(fa, dim=-1), torch.softmax(fb, dim=-1)
        da = draws(pa, uniforms)
        assert torch.equal(da[:, 0], draw_tokens(pa, uniforms[:1].expand(a.shape[0])))  # the engine's draw
        flips += int((da != draws(pb, uniforms)).sum())
    return flips / (alone.shape[0] * len(uniforms)), kept_differs


def _ranges(counts: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    out, start = [], None
    for i, m in enumerate(counts):
        start = m if start is None else start
        if i + 1 == len(counts) or counts[i + 1] != m + 1:
            out.append(f"{start}-{m}" if m > start else f"{m}")
            start = None
    return ", ".join(out) or "none"


@torch.no_grad()
def row_counts(model, generator: torch.Generator, ref_rows: int = 64) -> list[dict]:
    """Where the rounding comes from: for each distinct weight shape among the model's linears
    (its own weights), the row counts m < `ref_rows` for which `F.linear(x[:m], W)` differs from
    the same rows of a `ref_rows`-row product; and whether a `ref_rows`-row product's row is the
    same whatever its position and whatever the other rows (what computing every linear in
    fixed-size row chunks, a batch-invariant design, would need)."""
    found: dict[tuple, list[str]] = {}
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shape = tuple(module.weight.shape)
            found.setdefault(shape, []).append(name.rsplit(".", 1)[-1])
            weights.setdefault(shape, module.weight)
    out = []
    for shape, w in weights.items():
        x = torch.randn(2 * ref_rows, shape[1], generator=generator).to(w.dtype)  # [2R, in]
        ref = F.linear(x[:ref_rows], w)  # [R, out]
        differ = [m for m in range(1, ref_rows) if not torch.equal(F.linear(x[:m], w), ref[:m])]
        perm = torch.randperm(ref_rows, generator=generator)
        out.append({"shape": list(shape), "modules": sorted(set(found[shape])), "differ": differ,
                    "position_invariant": torch.equal(F.linear(x[perm], w), ref[perm]),
                    "neighbour_invariant": torch.equal(F.linear(torch.cat([x[:1], x[ref_rows + 1:]]), w)[0], ref[0])})
    return out


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(model="tiny", dtype="float32")
    p.add_argument("--pairs", type=int, default=2000, help="(alone, batched) logit pairs")
    p.add_argument("--batch", type=int, default=8, help="rows in the batched forward")
    p.add_argument("--draws", type=int, default=2000, help="uniforms per pair")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.draws = 32, 50
    dtype = setup(args)
    if args.model == "tiny":
        vocab = 49152
        model = tiny_random_llama(vocab, seed=args.seed).to(dtype)
    else:
        model, _ = load_model(args, dtype)
        vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    alone, batched = logit_pairs(model, vocab, args.pairs, args.batch, gen)
    uniforms = torch.rand(args.draws, dtype=torch.float64, generator=gen)
    gaps = (alone - batched).abs().max(dim=-1).values  # [pairs]: each row's largest difference
    diff, median = float(gaps.max()), float(gaps.median())
    rows, out = [], {}
    for name, kw in SETTINGS.items():
        rate, kept = flip_rate(alone, batched, SamplingParams(**kw), uniforms)
        out[name] = {"flip_per_token": rate, "rows_kept_set_differs": kept}
        rows.append([name, f"{rate:.1e}", f"{kept} / {alone.shape[0]}"])
    table(f"{args.model}: a decode row alone vs among {args.batch}; logit difference per row: median {median:.1e}, largest {diff:.1e}",
          ["sampling", "P(other token) per token", "rows whose kept set differs"], rows)
    shapes = row_counts(model, gen)
    table(f"{args.model} ({args.dtype}): row counts whose rows differ from a 64-row product, per linear",
          ["weight [out, in]", "modules", "row counts", "64-row product: position / neighbour invariant"],
          [[f"{s['shape']}", " ".join(s["modules"]), _ranges(s["differ"]),
            f"{s['position_invariant']} / {s['neighbour_invariant']}"] for s in shapes])
    write_json(args.out, {"env": environment(args), "max_logit_diff": diff, "median_row_max_logit_diff": median,
                          "pairs": alone.shape[0], "batch": args.batch, "draws": args.draws, "settings": out,
                          "row_counts": shapes})


if __name__ == "__main__":
    main()
