"""Adapter-kinds benchmark (issue 4): soft prompts, prefixes and LoRAs mixed in one batch.

    .venv/bin/python benchmarks/kinds.py --dtype bfloat16 --threads 2 --out runs/bench/kinds-bf16.json
    .venv/bin/python benchmarks/kinds.py --quick            # smoke test (< 2 min)

64 concurrent requests (64 prompt tokens, 64 new, ignore_eos) submitted at once in one
`engine.generate`: 8 prompt-tuning (20 virtual tokens), 8 prefix-tuning (20 virtual tokens) and
8 LoRA (r16, q,k,v,o) adapters with 2 requests each, plus 16 base requests, in a seeded shuffled
order; versus the same 64 prompts base-only, in the same run (interleaved repeats, best of N).
All adapters are made with PEFT (`get_peft_model` + `save_pretrained`, random init) and warmed
first (one request each: KV prefixes computed, LoRAs installed). TTFT = arrival -> first token
(targets: mixed/base TTFT <= 1.05x, throughput >= 0.85x).

PEFT comparison: PEFT cannot hold prompt-learning adapters and LoRAs in one model, nor batch
different prompt-learning adapters, so it serves the same requests one adapter at a time: a
fresh `PeftModel.from_pretrained` per adapter, its requests as one batch, only `generate` timed;
a request's TTFT is the time of the groups before it + its group's first generate step.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig

from common import (environment, hf_baseline, hf_generate, load_model, make_peft_adapter, parser, pct, random_prompt,
                    scratch_dir, setup, table, token_pool, write_json)
from peftserve.server.engine.config import EngineConfig
from peftserve.server.build import build_engine
from peftserve.server.engine.request import SamplingParams

KINDS = {
    "soft-prompt": lambda a: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.virtual_tokens),
    "prefix": lambda a: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.virtual_tokens),
    "lora": lambda a: LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, init_lora_weights=False,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def args_():
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--per-kind", type=int, default=8, help="adapters of each kind")
    p.add_argument("--per-adapter", type=int, default=2, help="requests per adapter (the rest are base)")
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-peft", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.requests, a.prompt_len, a.new_tokens, a.per_kind, a.per_adapter, a.repeats = 10, 16, 6, 2, 1, 1
    if a.requests < 3 * a.per_kind * a.per_adapter:
        p.error("--requests must cover 3 * per-kind * per-adapter adapter requests")
    return a


def ttft_stats(ttfts: list[float]) -> dict:
    return {"ttft_p50_ms": 1e3 * pct(ttfts, 50), "ttft_mean_ms": 1e3 * sum(ttfts) / len(ttfts),
            "ttft_p99_ms": 1e3 * pct(ttfts, 99)}


def run_ours(serving, prompts, names, new_tokens) -> dict:
    t0 = time.perf_counter()
    handles = [serving.registry.resolve(n) if n else None for n in names]
    seqs = serving.engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                   adapters=handles)
    secs = time.perf_counter() - t0
    assert all(len(s.output_ids) == new_tokens for s in seqs), [s.finish_reason for s in seqs][:4]
    ttfts = [s.first_token_at - s.arrival for s in seqs]
    return {"seconds": secs, "tok_s": len(seqs) * new_tokens / secs, "ttfts": ttfts, **ttft_stats(ttfts)}


def run_peft(hf, adapters: dict, prompts, names, new_tokens) -> dict:
    """One adapter at a time (base first), one batch per adapter; only generate is timed."""
    groups: dict[str | None, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    clock, ttfts, gen_s = 0.0, [0.0] * len(prompts), 0.0
    for name in sorted(groups, key=lambda n: (n is not None, n or "")):
        idx = groups[name]
        model = hf if name is None else PeftModel.from_pretrained(hf, adapters[name][1]).eval()
        secs, times, _ = hf_generate(model, [prompts[i] for i in idx], new_tokens)
        for i in idx:
            ttfts[i] = clock + times[0]
        clock += secs
        gen_s += secs
        if name is not None:
            hf = model.unload() if adapters[name][0] == "lora" else model.get_base_model()
    return {"seconds": gen_s, "tok_s": len(prompts) * new_tokens / gen_s, "ttfts": ttfts, **ttft_stats(ttfts)}


def main():
    args = args_()
    dtype = setup(args)
    root = scratch_dir("peftserve-bench-kinds-")
    hf, tok = hf_baseline(args, dtype)
    rng = random.Random(args.seed)
    pool = token_pool(tok, hf.config.vocab_size)
    prompts = [random_prompt(rng, pool, args.prompt_len) for _ in range(args.requests)]
    adapters: dict[str, tuple[str, Path]] = {}  # name -> (kind, dir)
    for k, (kind, make) in enumerate(KINDS.items()):
        for i in range(args.per_kind):
            name = f"{kind}-{i}"
            adapters[name] = (kind, make_peft_adapter(hf, root / name, make(args), 1000 * k + i))
    names = [n for n in adapters for _ in range(args.per_adapter)]
    names += [None] * (args.requests - len(names))
    rng.shuffle(names)

    model, _ = load_model(args, dtype)
    cfg = EngineConfig(max_batch_size=args.requests, max_model_len=args.prompt_len + args.new_tokens +
                       args.virtual_tokens + 8, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_adapters_per_batch=max(8, args.per_kind), dtype=dtype)
    serving = build_engine(model, tok, cfg, store=root / "store")
    for name, (_, path) in adapters.items():
        serving.registry.import_dir(path, name)
    warm = list(adapters)  # one request per adapter: prefixes computed, LoRAs installed
    run_ours(serving, [prompts[i % len(prompts)] for i in range(len(warm))], warm, 1)
    runs = {"base-only": [], "mixed": []}
    for _ in range(args.repeats):
        runs["base-only"].append(run_ours(serving, prompts, [None] * args.requests, args.new_tokens))
        runs["mixed"].append(run_ours(serving, prompts, names, args.new_tokens))
    ours = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    base, mixed = ours["base-only"], ours["mixed"]

    results = {"ours": ours}
    rows = [[f"peftserve, {case}", r["tok_s"], r["tok_s"] / base["tok_s"], r["ttft_p50_ms"], r["ttft_mean_ms"],
             r["ttft_p99_ms"], r["ttft_mean_ms"] / base["ttft_mean_ms"]] for case, r in ours.items()]
    if not args.skip_peft:
        hf_generate(hf, prompts[:2], 2)  # warm-up
        peft_base = run_peft(hf, adapters, prompts, [None] * args.requests, args.new_tokens)
        peft_mixed = run_peft(hf, adapters, prompts, names, args.new_tokens)
        results |= {"peft_base": peft_base, "peft_mixed": peft_mixed}
        rows += [["HF base, one batch", peft_base["tok_s"], peft_base["tok_s"] / base["tok_s"],
                  peft_base["ttft_p50_ms"], peft_base["ttft_mean_ms"], peft_base["ttft_p99_ms"],
                  peft_base["ttft_mean_ms"] / base["ttft_mean_ms"]],
                 ["PEFT, one adapter at a time", peft_mixed["tok_s"], peft_mixed["tok_s"] / base["tok_s"],
                  peft_mixed["ttft_p50_ms"], peft_mixed["ttft_mean_ms"], peft_mixed["ttft_p99_ms"],
                  peft_mixed["ttft_mean_ms"] / base["ttft_mean_ms"]]]
    n_base = names.count(None)
    table(f"{args.requests} requests at once ({args.prompt_len} prompt + {args.new_tokens} new): {args.per_kind} "
          f"soft-prompt + {args.per_kind} prefix ({args.virtual_tokens} vt) + {args.per_kind} LoRA adapters x "
          f"{args.per_adapter} requests + {n_base} base; best of {args.repeats}",
          ["case", "tok/s", "tok/s vs ours base-only", "TTFT p50 ms", "TTFT mean ms", "TTFT p99 ms",
           "TTFT mean vs ours base-only"], rows)
    by_kind = {}
    for kind in ["base", *KINDS]:
        idx = [i for i, n in enumerate(names) if (n is None if kind == "base" else n and adapters[n][0] == kind)]
        by_kind[kind] = [1e3 * pct([mixed["ttfts"][i] for i in idx], 50),
                         1e3 * pct([base["ttfts"][i] for i in idx], 50), len(idx)]
    table("peftserve mixed run: TTFT p50 by kind (same request positions in the base-only run)",
          ["kind", "mixed TTFT p50 ms", "base-only TTFT p50 ms", "requests"], [[k, *v] for k, v in by_kind.items()])
    print(f"\nmixed vs base-only: throughput {mixed['tok_s'] / base['tok_s']:.2f}x (target >= 0.85x), TTFT mean "
          f"{mixed['ttft_mean_ms'] / base['ttft_mean_ms']:.2f}x (target <= 1.05x)"
          + (f"; ours mixed vs PEFT one-at-a-time: {mixed['tok_s'] / results['peft_mixed']['tok_s']:.2f}x throughput"
             if "peft_mixed" in results else "")
          + f"\nslots: {serving.runtime.stats}")
    results |= {"env": environment(args), "by_kind_ttft_p50_ms": by_kind, "all_runs": runs,
                "slots": dict(serving.runtime.stats)}
    write_json(args.out, results)


if __name__ == "__main__":
    main()
