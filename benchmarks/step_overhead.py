"""Host time of a fixed-shape decode step outside the model (issue 12): what a CUDA-graph replay
cannot hide.

    .venv/bin/python benchmarks/step_overhead.py [--batches 64,256] [--contexts 64,2000] [--out F]

A replayed step costs the GPU's time for the graph plus everything the engine thread does in
Python around it: schedule, fill the fixed buffers (token ids, positions, block tables), sample,
emit (detokenize, stop checks, events). On an H200 a 1B model's batch-64 step runs in ~4.5 ms
under HF's compiled `generate` (issue 12's table), so host work of a few ms decides whether we
reach it, and it grows with the batch: the batch-256 target needs it small per row.

The model here is a 1-layer, 64-wide Llama over the default tokenizer's vocabulary (so the
per-token work is real: 49k-wide logits, real detokenization), the engine in
`decode_mode="static"` (the step a GPU replays, run eagerly), one torch thread. Per decode step
(ms): `host` = schedule + the runner's and the sampler's Python around the device work (fill,
bucket checks, emit: detokenize, stop checks, events; with `--metrics`, the server's Prometheus
observer: its per-token part in emit, the step's publishing in `publish`); the forward and the logits reductions
(`sample`, `nonfinite`) are timed apart, as on a GPU they are the device's; `other` = the step
loop and freeing the step's tensors. Compare commits by running this script in each (same
machine, alternating); the figures are this machine's, not a GPU host's.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from common import time_calls

from peftserve.adapters.base_model import resolve_model_dir, tiny_random_llama
from peftserve.server.build import build_engine
from peftserve.server.engine import engine as engine_mod
from peftserve.server.engine import runner as runner_mod
from peftserve.server.engine import scheduler as scheduler_mod
from peftserve.server.engine import static_decode as static_mod
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.request import SamplingParams, Sequence
from peftserve.server.metrics import Metrics

PHASES = {  # label -> (owner, attribute) timed around every call
    "schedule": (scheduler_mod.Scheduler, "schedule"),
    "execute": (runner_mod.ModelRunner, "execute"),  # fill + forward + the fixed path's checks
    "bucket": (static_mod.StaticDecode, "bucket"),  # does the plan fit the fixed buffers, which bucket
    "fill": (static_mod.StaticDecode, "fill"),
    "forward": (static_mod.StaticDecode, "forward"),
    "sample_and_emit": (engine_mod.LLMEngine, "_sample_and_emit"),
    "sample": (engine_mod, "sample_step"),  # with the step's one device->host copy
    "nonfinite": (engine_mod, "screen_rows"),
    "emit": (engine_mod.LLMEngine, "_append_token"),
    "publish": (Metrics, "on_step"),  # with --metrics: the step's metrics, published at its end
}


def run(tok, batch: int, ctx: int, new: int, block_size: int, totals: collections.Counter, store: Path,
        metrics: bool) -> dict:
    torch.manual_seed(0)
    model = tiny_random_llama(len(tok), num_hidden_layers=1, max_position_embeddings=ctx + new + 8)
    config = EngineConfig(max_batch_size=batch, max_model_len=ctx + new + 8, max_num_batched_tokens=batch * ctx,
                          decode_mode="static", kv_block_size=block_size)
    serving = build_engine(model, tok, config, store=store, observer=Metrics() if metrics else None)
    engine = serving.engine
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(300, len(tok) - 300, (ctx,), generator=g).tolist() for _ in range(batch)]
    seqs = [Sequence(p, SamplingParams(max_new_tokens=new, ignore_eos=True), on_event=lambda ev: None)
            for p in prompts]
    for seq in seqs:
        engine.add(seq)
    while any(s.num_computed < ctx for s in seqs):  # prefill (dynamic steps): not measured
        engine.step()
    totals.clear()
    steps, t0 = 0, time.perf_counter()
    while engine.has_work():
        engine.step()
        steps += 1
    wall = time.perf_counter() - t0
    assert engine.runner.static_steps >= steps - 1, "decode steps did not take the fixed-shape path"
    ms = {k: 1e3 * v / steps for k, v in totals.items()}
    ms["step"] = 1e3 * wall / steps
    device = ms["forward"] + ms["sample"] + ms["nonfinite"]  # what runs on the device on a GPU
    # the engine's own Python around them: what a replayed step still waits for
    ms.setdefault("publish", 0.0)
    ms["host"] = ms["schedule"] + ms["execute"] + ms["sample_and_emit"] + ms["publish"] - device
    # the step loop itself and freeing the step's tensors (on CPU: unmapping the logits, ~5 ms
    # for 256 x 49k float32 on this VM; a GPU's caching allocator keeps them)
    ms["other"] = ms["step"] - ms["schedule"] - ms["execute"] - ms["sample_and_emit"] - ms["publish"]
    ms = {k: round(v, 3) for k, v in ms.items()}
    return {"batch": batch, "context": ctx, "steps": steps, "ms_per_step": ms,
            "host_us_per_row": round(1e3 * ms["host"] / batch, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--contexts", default="64,2000")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=64, help="KV block size (the engine's default)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N per case")
    ap.add_argument("--metrics", action="store_true",
                    help="attach the server's Prometheus observer (as `serve` does); its per-token part counts in emit")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(resolve_model_dir("default"))
    totals: collections.Counter = collections.Counter()
    time_calls(PHASES, totals)
    results = []
    for ctx in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            with tempfile.TemporaryDirectory() as store:
                runs = [run(tok, batch, ctx, args.new, args.block_size, totals, Path(store) / str(i), args.metrics)
                        for i in range(args.repeats)]
            best = min(runs, key=lambda r: r["ms_per_step"]["host"])
            results.append(best)
            m = best["ms_per_step"]
            print(f"batch {batch:4d} context {ctx:5d}: host {m['host']:7.3f} ms/step ({best['host_us_per_row']:6.2f} us/row)"
                  f" = schedule {m['schedule']:.3f} + bucket {m['bucket']:.3f} + fill {m['fill']:.3f}"
                  f" + emit {m['emit']:.3f} + publish {m['publish']:.3f} + rest"
                  f" | other {m['other']:.3f} | device-side, here on CPU: forward {m['forward']:.3f}"
                  f" sample {m['sample']:.3f} nonfinite {m['nonfinite']:.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": 1, "metrics": args.metrics,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
