"""Dynamic vs fixed-shape decode steps on this machine (issue 12): why `--decode-mode auto` keeps
the dynamic step on CPU.

    .venv/bin/python benchmarks/decode_modes.py --dtype float32 --threads 2

The same engine and prompts, in-process, `decode_mode="dynamic"` (every step sized to its rows)
and `"static"` (decode-only steps on the fixed buffers a CUDA graph replays, run eagerly: padded
batch bucket, attention by block table, adapters gathered from stacks), alternating, best of
`--repeats`; base rows, and with `--loras N` every request on one of N LoRAs (r8-64, q,k,v,o).
On a GPU the fixed step is what graphs replay (benchmarks/gpu.py measures that); here it can only
cost or save Python and padding.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from common import (load_model, make_peft_adapter, parser, random_prompt, scratch_dir, setup, table, token_pool,
                    write_json)
from peft import LoraConfig

from peftserve.server.build import build_engine
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.request import SamplingParams

MODES = ("dynamic", "static")


def run(args, dtype, mode: str, prompts, lora_dirs, store: Path) -> tuple[float, int]:
    model, tok = load_model(args, dtype)
    serving = build_engine(model, tok, EngineConfig(max_batch_size=len(prompts), dtype=dtype, decode_mode=mode,
                                                    max_adapters_per_batch=max(1, len(lora_dirs))), store=store)
    for i, d in enumerate(lora_dirs):
        serving.registry.import_dir(d, f"l{i}")
    handles = [serving.registry.resolve(f"l{i % len(lora_dirs)}") if lora_dirs else None for i in range(len(prompts))]
    serving.engine.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True), adapters=handles)  # warm-up
    t0 = time.perf_counter()
    serving.engine.generate(prompts, SamplingParams(max_new_tokens=args.new, ignore_eos=True), adapters=handles)
    return len(prompts) * args.new / (time.perf_counter() - t0), serving.engine.runner.static_steps


def main():
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--loras", type=int, default=0, help="requests spread over this many LoRAs (0 = base)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.requests, args.new, args.repeats = 8, 4, 1
    dtype = setup(args)
    root = scratch_dir("peftserve-bench-modes-")
    model, tok = load_model(args, dtype)
    rng = random.Random(args.seed)
    pool = token_pool(tok, model.config.vocab_size)
    prompts = [random_prompt(rng, pool, args.prompt_len) for _ in range(args.requests)]
    lora_dirs = [make_peft_adapter(model, root / f"lora{i}", LoraConfig(
        r=(8, 16, 32, 64)[i % 4], lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False), 100 + i) for i in range(args.loras)]
    del model
    best = {m: 0.0 for m in MODES}
    fixed_steps = 0
    for rep in range(args.repeats):
        for mode in MODES:
            tok_s, steps = run(args, dtype, mode, prompts, lora_dirs, root / f"store-{mode}-{rep}")
            best[mode] = max(best[mode], tok_s)
            fixed_steps = max(fixed_steps, steps)
    table(f"decode modes: {args.requests} requests x ({args.prompt_len} prompt + {args.new} new), "
          f"{args.loras or 'no'} LoRAs, best of {args.repeats} (tok/s)",
          ["dynamic", "static (the graph's step, eager)", "static / dynamic", "fixed-shape steps per run"],
          [[best["dynamic"], best["static"], best["static"] / best["dynamic"], fixed_steps]])
    write_json(args.out, {"args": vars(args), "tok_s": best, "fixed_steps": fixed_steps})


if __name__ == "__main__":
    main()
