"""KV memory benchmark (issue 12): a long context limit in a fixed KV budget.

    .venv/bin/python benchmarks/kv_memory.py --dtype float32 --out runs/bench/kv-memory.json
    .venv/bin/python benchmarks/kv_memory.py --quick

Builds the engine for `--max-model-len 8192 --max-batch-size 64` with the default KV pool
(`--kv-cache-bytes` unset: at most 4 GiB) and submits `--requests` prompts of `--prompt-len`
tokens at once, more tokens in flight than the pool holds. Reports the process RSS (after loading
the model, after building the engine, peak), the pool's size next to what one row of
max_model_len per sequence would take, the peak KV usage seen after each step, preemptions,
and throughput. Every request must finish with its `--new` tokens: the pool bounds memory,
admission waits and preemption recomputes; nothing fails.
"""

from __future__ import annotations

import random
import time

from common import environment, load_model, parser, random_prompt, setup, table, token_pool, write_json
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.engine import LLMEngine
from peftserve.server.engine.kv_cache import kv_bytes_per_token
from peftserve.server.engine.request import FinishReason, SamplingParams, Sequence

GiB = 1 << 30


def rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="default: the engine's (at most 4 GiB)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=1536)
    p.add_argument("--new", type=int, default=16)
    args = p.parse_args()
    if args.quick:
        args.requests, args.prompt_len, args.new, args.kv_cache_bytes = 16, 512, 8, 256 << 20
        args.max_model_len = 2048
    dtype = setup(args)
    model, tok = load_model(args, dtype)
    rss_model, _ = rss()
    config = EngineConfig(max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                          kv_cache_bytes=args.kv_cache_bytes, dtype=dtype)
    engine = LLMEngine(model, tok, config)
    rss_engine, _ = rss()
    m, cache = engine.model, engine.cache
    per_token = kv_bytes_per_token(m.num_layers, m.kv_heads, m.head_dim, cache.k[0].dtype)
    rows_layout = (args.max_batch_size + 1) * args.max_model_len * per_token  # the old slot layout

    rng = random.Random(args.seed)
    pool = token_pool(tok, m.vocab_size)
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    seqs = [Sequence(random_prompt(rng, pool, args.prompt_len), params, on_event=lambda ev: None)
            for _ in range(args.requests)]
    t0 = time.perf_counter()
    for seq in seqs:
        engine.add(seq)
    peak_usage, peak_running, steps = 0.0, 0, 0
    while engine.has_work():
        engine.step()
        steps += 1
        snap = engine.snapshot()
        peak_usage, peak_running = max(peak_usage, snap.kv_usage), max(peak_running, snap.running)
    seconds = time.perf_counter() - t0
    _, rss_peak = rss()
    finished = sum(s.finish_reason is FinishReason.LENGTH and len(s.output_ids) == args.new for s in seqs)
    result = {
        "kv_pool_bytes": cache.nbytes, "kv_pool_tokens": cache.capacity_tokens,
        "slot_layout_bytes": rows_layout, "tokens_in_flight_wanted": args.requests * (args.prompt_len + args.new),
        "rss_model": rss_model, "rss_engine": rss_engine, "rss_peak": rss_peak,
        "peak_kv_usage": peak_usage, "peak_running": peak_running, "preemptions": engine.preemptions,
        "steps": steps, "seconds": seconds, "requests_finished": finished, "requests": args.requests,
        "prompt_tokens_per_s": args.requests * args.prompt_len / seconds,
    }
    table("KV memory (issue 12)", ["", "value"], [
        ["KV pool", f"{cache.nbytes / GiB:.2f} GiB = {cache.capacity_tokens} tokens"],
        [f"one row of {args.max_model_len} per sequence would be", f"{rows_layout / GiB:.2f} GiB"],
        ["tokens wanted in flight", result["tokens_in_flight_wanted"]],
        ["RSS: model / + engine / peak", f"{rss_model / GiB:.2f} / {rss_engine / GiB:.2f} / {rss_peak / GiB:.2f} GiB"],
        ["peak KV usage / peak running", f"{peak_usage:.2f} / {peak_running}"],
        ["preemptions", engine.preemptions],
        ["finished with all tokens", f"{finished} / {args.requests}"],
        ["wall", f"{seconds:.1f} s ({result['prompt_tokens_per_s']:.0f} prompt tok/s)"],
    ])
    write_json(args.out, {"environment": environment(args), "result": result})
    if finished != args.requests:
        raise SystemExit(f"only {finished} of {args.requests} requests finished with {args.new} tokens")


if __name__ == "__main__":
    main()
