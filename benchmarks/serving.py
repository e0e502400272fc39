"""Serving benchmark (issue 2): continuous batching vs HF `generate` static batches.

    .venv/bin/python benchmarks/serving.py --dtype bfloat16 --threads 2 --out runs/bench/serving-bf16.json
    .venv/bin/python benchmarks/serving.py --quick          # smoke test (< 2 min)

(a) Poisson-arrival workload (default 128 requests at 4 req/s, prompts U[16,512] random
    non-special token ids, outputs U[16,256] with ignore_eos, seeded) replayed against the real
    HTTP server (`peftserve serve` subprocess, SSE, client-side timestamps; `--inprocess` uses the
    AsyncEngine in this process instead) and against HF `model.generate` serving the same requests
    in arrival-order static batches of 16 (left-padded; a batch starts when its last request has
    arrived and the previous batch finished; max_new_tokens = the batch's longest output; each
    request counts only its own tokens; token times come from a streamer, so TTFT = batch start +
    first generate step - arrival). Metrics: tokens/s (generated tokens / makespan), TTFT p50/p99,
    ITL p50/p99, e2e p50.
(b) 64 equal requests (64 prompt tokens, 64 new, ignore_eos) submitted at once: our engine
    (in-process) vs one HF static batch of 64; and engine overhead: our median decode-step time
    with all 64 rows decoding vs a bare HF forward loop on the same batch (`model(next_ids,
    past_key_values=..., use_cache=True, logits_to_keep=1)`, and the same loop with the logits
    taken as a contiguous [rows, hidden] matmul, which avoids HF's slow bf16 path). Then the
    matmul ceiling (issue 13 item 4): the same step's matmuls alone on this machine in this run,
    and our decode step as a fraction of it.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import torch

from common import (Server, environment, hf_baseline, hf_generate, latency_summary, load_model, median_seconds, parser,
                    random_prompt, replay, setup, sse_generate, table, token_pool, write_json)
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.engine import LLMEngine
from peftserve.server.engine.request import SamplingParams, Sequence


def args_():
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate (req/s)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=64, help="engine: running sequences")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="engine: token budget per step")
    p.add_argument("--inprocess", action="store_true", help="(a) via AsyncEngine in this process, not HTTP")
    p.add_argument("--b-requests", type=int, default=64)
    p.add_argument("--b-prompt", type=int, default=64)
    p.add_argument("--b-new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="(b): best of N runs, ours and HF alternating")
    p.add_argument("--probe-threads", type=int, nargs="*", default=[1],
                   help="(b): also time decode steps (ours, bare) at these thread counts (collapse check)")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.requests, a.rate, a.prompt_len, a.output_len, a.hf_batch = 8, 8.0, [16, 48], [4, 10], 4
        a.b_requests, a.b_prompt, a.b_new, a.repeats = 8, 16, 6, 1
    return a


def engine_config(args, dtype, max_len: int) -> EngineConfig:
    return EngineConfig(max_batch_size=args.max_batch_size, max_model_len=max_len,
                        max_num_batched_tokens=args.max_num_batched_tokens, dtype=dtype)


def workload(args, pool) -> list[dict]:
    rng = random.Random(args.seed)
    t, reqs = 0.0, []
    for i in range(args.requests):
        t += rng.expovariate(args.rate) if i else 0.0  # first request at t=0
        reqs.append({"arrival": t, "prompt": random_prompt(rng, pool, rng.randint(*args.prompt_len)),
                     "out": rng.randint(*args.output_len)})
    return reqs


# -- (a) ours ------------------------------------------------------------------------------
def ours_http(args, reqs, max_len):
    import httpx

    extra = ["--max-batch-size", str(args.max_batch_size), "--max-model-len", str(max_len),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-waiting", "4096"]
    with Server(args, extra) as srv:
        async def main():
            limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
            async with httpx.AsyncClient(limits=limits, timeout=None) as client:
                warm = {"times": []}
                await sse_generate(client, srv.url, {"input_ids": reqs[0]["prompt"][:16], "max_new_tokens": 4,
                                                     "ignore_eos": True}, time.perf_counter(), warm)
                if "error" in warm:
                    raise RuntimeError(f"warm-up request failed: {warm['error']}")

                async def submit(req, t0, rec):
                    await sse_generate(client, srv.url, {"input_ids": req["prompt"], "max_new_tokens": req["out"],
                                                         "ignore_eos": True}, t0, rec)
                return await replay(submit, reqs)

        return asyncio.run(main())


def ours_inprocess(args, dtype, reqs, max_len):
    from peftserve.server.engine.async_engine import AsyncEngine

    model, tok = load_model(args, dtype)
    engine = LLMEngine(model, tok, engine_config(args, dtype, max_len))
    engine.generate([reqs[0]["prompt"][:16]], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    aeng = AsyncEngine(engine)
    aeng.start()

    async def submit(req, t0, rec):
        async for ev in aeng.submit(req["prompt"], SamplingParams(max_new_tokens=req["out"], ignore_eos=True)):
            if ev.token_id is not None:
                rec["times"].append(time.perf_counter() - t0)
            if ev.error:
                rec["error"] = ev.error

    try:
        return asyncio.run(replay(submit, reqs))
    finally:
        aeng.stop()


# -- (a) HF static batches ------------------------------------------------------------------
def hf_static(hf, reqs, batch):
    clock, recs = 0.0, []
    hf_generate(hf, [reqs[0]["prompt"][:16]], 2)  # warm-up
    for b in range(0, len(reqs), batch):
        group = reqs[b:b + batch]
        start = max(clock, max(r["arrival"] for r in group))
        secs, times, _ = hf_generate(hf, [r["prompt"] for r in group], max(r["out"] for r in group))
        recs += [{"arrival": r["arrival"], "times": [start + x for x in times[:r["out"]]]} for r in group]
        clock = start + secs
    return recs, clock


def part_a(args, dtype, pool, hf):
    reqs = workload(args, pool)
    max_len = max(len(r["prompt"]) + r["out"] for r in reqs) + 8
    if args.inprocess:
        mode = "in-process AsyncEngine"
        recs, makespan = ours_inprocess(args, dtype, reqs, max_len)
    else:
        mode = "HTTP server + SSE"
        recs, makespan = ours_http(args, reqs, max_len)
    errors = [r["error"] for r in recs if "error" in r]
    ours = latency_summary(recs, makespan)
    short = sum(len(r["times"]) != q["out"] for r, q in zip(recs, reqs))
    hf_recs, hf_makespan = hf_static(hf, reqs, args.hf_batch)
    theirs = latency_summary(hf_recs, hf_makespan)
    keys = ["tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_s", "makespan_s", "completed"]
    table(f"(a) {args.requests} requests, Poisson {args.rate} req/s, prompts {args.prompt_len}, outputs "
          f"{args.output_len} (ours: {mode})",
          ["system", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "e2e p50 s", "makespan s",
           "completed"],
          [["peftserve (continuous batching)"] + [ours[k] for k in keys],
           [f"HF generate, static batches of {args.hf_batch}"] + [theirs[k] for k in keys]])
    ratio = ours["tok_s"] / theirs["tok_s"]
    print(f"\nthroughput ours/HF = {ratio:.2f}x (target >= 3x); TTFT p99 ours {ours['ttft_p99_ms']:.0f} ms vs HF "
          f"{theirs['ttft_p99_ms']:.0f} ms (target: lower)"
          + (f"\nWARNING: {len(errors)} request errors, e.g. {errors[0]}" if errors else "")
          + (f"\nWARNING: {short} requests did not get exactly their output length" if short else ""))
    return {"mode": mode, "ours": ours, "hf": theirs, "ratio_tok_s": ratio, "errors": errors[:5],
            "wrong_length": short}


# -- (b) 64 at once + engine overhead -------------------------------------------------------
def ours_step_loop(engine, prompts, new):
    """Submit all at once and step to completion -> (seconds, decode-step times with every row decoding)."""
    seqs = [Sequence(list(p), SamplingParams(max_new_tokens=new, ignore_eos=True), on_event=lambda ev: None)
            for p in prompts]
    t0 = time.perf_counter()
    for s in seqs:
        engine.add(s)
    decode_steps = []
    while engine.has_work():
        full_decode = engine.num_running == len(seqs) and not engine.num_waiting and \
            all(not s.in_prefill for s in seqs)
        t = time.perf_counter()
        engine.step()
        if full_decode:
            decode_steps.append(time.perf_counter() - t)
    secs = time.perf_counter() - t0
    assert all(len(s.output_ids) == new for s in seqs), "engine produced a wrong number of tokens"
    return secs, decode_steps


@torch.inference_mode()
def bare_loop(hf, prompts, steps, contiguous_head: bool):
    """Prefill once, then time `steps` bare decode forwards (greedy) -> per-step seconds."""
    ids = torch.tensor(prompts)
    out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        if contiguous_head:
            h = hf.model(input_ids=nxt[:, None], past_key_values=pkv, use_cache=True).last_hidden_state
            logits = hf.lm_head(h[:, -1].contiguous())
        else:
            logits = hf(input_ids=nxt[:, None], past_key_values=pkv, use_cache=True, logits_to_keep=1).logits[:, -1]
        nxt = logits.argmax(-1)
        times.append(time.perf_counter() - t)
    return times


def part_b(args, dtype, pool, hf):
    rng = random.Random(args.seed + 1)
    n, P, N = args.b_requests, args.b_prompt, args.b_new
    prompts = [random_prompt(rng, pool, P) for _ in range(n)]
    model, tok = load_model(args, dtype)
    engine = LLMEngine(model, tok, EngineConfig(max_batch_size=n, max_model_len=P + N + 8,
                                                max_num_batched_tokens=args.max_num_batched_tokens, dtype=dtype))
    engine.generate(prompts[:4], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    hf_generate(hf, prompts[:4], 2)
    ours_runs, hf_runs, steps = [], [], []
    for _ in range(args.repeats):
        secs, dec = ours_step_loop(engine, prompts, N)
        ours_runs.append(secs)
        steps += dec
        hf_runs.append(hf_generate(hf, prompts, N)[0])
    ours_s, hf_s = min(ours_runs), min(hf_runs)
    tokens = n * N
    table(f"(b) {n} equal requests ({P} prompt + {N} new tokens) submitted at once, best of {args.repeats}",
          ["system", "tok/s", "seconds", "vs HF"],
          [["peftserve engine (in-process)", tokens / ours_s, ours_s, hf_s / ours_s],
           [f"HF generate, static batch of {n}", tokens / hf_s, hf_s, 1.0]])
    bare = {name: bare_loop(hf, prompts, max(N, 8), contiguous) for name, contiguous in
            [("HF forward, logits_to_keep=1", False), ("HF decoder + contiguous lm_head", True)]}
    ours_step = statistics.median(steps) if steps else float("nan")
    best_bare = min(statistics.median(t) for t in bare.values())
    rows = [[f"peftserve engine.step (all {n} rows decoding)", 1e3 * ours_step, len(steps), ours_step / best_bare]]
    rows += [[name, 1e3 * statistics.median(t), len(t), statistics.median(t) / best_bare] for name, t in bare.items()]
    table(f"(b) engine overhead: median decode-step time at batch {n}", ["loop", "ms/step", "steps", "vs fastest bare"],
          rows)
    print(f"\nours vs HF static batch = {hf_s / ours_s:.2f}x (target >= 1.0x); decode step ours / fastest bare "
          f"= {ours_step / best_bare:.2f}x (target <= 1.5x)")
    ceiling = matmul_ceiling(hf, n)
    fraction = ceiling["seconds"] / ours_step
    table(f"(b) decode step vs the matmul ceiling at batch {n} (issue 13 item 4)", ["", "value"], [
        ["the step's matmuls alone (every Linear, same shapes), ms", 1e3 * ceiling["seconds"]],
        ["peftserve engine.step, ms", 1e3 * ours_step],
        ["fraction of the ceiling (target >= 0.5)", fraction],
        ["step GEMM GFLOP/s (ours) / large-GEMM GFLOP/s", f"{ceiling['flops'] / ours_step / 1e9:.1f} / "
                                                         f"{ceiling['peak_gemm_flop_s'] / 1e9:.1f}"]])
    probe = thread_probe(args, engine, hf, prompts, ours_step,
                         statistics.median(bare["HF decoder + contiguous lm_head"]))
    return {"threads_probe": probe, "ours_s": ours_runs, "hf_s": hf_runs, "tokens": tokens,
            "ours_tok_s": tokens / ours_s, "hf_tok_s": tokens / hf_s, "ratio": hf_s / ours_s,
            "ours_decode_step_ms": 1e3 * ours_step,
            "bare_decode_step_ms": {k: 1e3 * statistics.median(v) for k, v in bare.items()},
            "overhead_ratio": ours_step / best_bare, "matmul_ceiling": ceiling, "ceiling_fraction": fraction}


def matmul_ceiling(model, rows: int, repeats: int = 5) -> dict:
    """What the matmuls of one decode step cost on this machine, measured in this run: every
    nn.Linear of the model (projections, MLP, lm_head) applied to `rows` tokens, back to back
    with nothing else (no attention, norms, Python), median of `repeats`; plus the machine's
    GEMM rate on one large square matmul of the same dtype, for reference."""
    import torch.nn.functional as F

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = linears[0].weight.dtype
    xs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in linears}
    flops = sum(2 * rows * m.in_features * m.out_features for m in linears)

    def once():
        with torch.inference_mode():
            for m in linears:
                F.linear(xs[m.in_features], m.weight)

    seconds = median_seconds(once, repeats)
    a = torch.randn(2048, 2048, dtype=dtype)
    torch.matmul(a, a)
    t = time.perf_counter()
    for _ in range(3):
        torch.matmul(a, a)
    peak = 3 * 2 * 2048 ** 3 / (time.perf_counter() - t)
    return {"seconds": seconds, "flops": flops, "peak_gemm_flop_s": peak}


def thread_probe(args, engine, hf, prompts, ours_step, bare_step):
    """Decode-step medians at other thread counts: torch threads can collapse on a shared machine."""
    rows, out = [[args.threads, 1e3 * ours_step, 1e3 * bare_step]], {}
    for th in [t for t in args.probe_threads if t != args.threads]:
        torch.set_num_threads(th)
        try:
            _, dec = ours_step_loop(engine, prompts, min(args.b_new, 12))
            bare = bare_loop(hf, prompts, min(args.b_new, 12), True)
        finally:
            torch.set_num_threads(args.threads)
        out[th] = {"ours_ms": 1e3 * statistics.median(dec), "bare_ms": 1e3 * statistics.median(bare)}
        rows.append([th, out[th]["ours_ms"], out[th]["bare_ms"]])
    if len(rows) > 1:
        table("(b) thread check: median decode-step ms at batch %d" % len(prompts),
              ["torch threads", "peftserve ms/step", "bare HF (contiguous head) ms/step"], rows)
    return out


def main():
    args = args_()
    dtype = setup(args)
    hf, tok = hf_baseline(args, dtype)
    pool = token_pool(tok, hf.config.vocab_size)
    result = {"env": environment(args)}
    if not args.skip_a:
        result["a"] = part_a(args, dtype, pool, hf)
    if not args.skip_b:
        result["b"] = part_b(args, dtype, pool, hf)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
