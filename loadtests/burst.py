"""Bounded load test against a peftserve on THIS machine (loopback only).

    .venv/bin/python loadtests/burst.py --url http://127.0.0.1:8000 --requests 200 --concurrency 64 \
        [--adapters a,b,c] [--bad-uploads 25] [--max-seconds 120]

Sends `--requests` generate calls (random adapter from `--adapters`, or base) with at most
`--concurrency` in flight, optionally interleaving hostile uploads (garbage safetensors) while
the good traffic runs, and stops by itself after `--requests` or `--max-seconds`. Prints status
counts, latency percentiles and the 429 rate; exits 1 if any *good* request failed with 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import statistics
import sys
import time
from collections import Counter
from urllib.parse import urlparse

import httpx


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError
        except ValueError:
            sys.exit(f"refusing to load-test {host!r}: loopback addresses only")
    return url


async def good_request(client, args, stats, latencies):
    adapter = random.choice(args.adapters) if args.adapters else None
    body = {"prompt": "Write one sentence about the sea.", "max_new_tokens": args.max_new_tokens,
            "adapter": adapter, "ignore_eos": True}
    t0 = time.perf_counter()
    try:
        r = await client.post("/generate", json=body, headers=args.headers)
        stats[r.status_code] += 1
        if r.status_code == 200:
            latencies.append(time.perf_counter() - t0)
    except httpx.HTTPError as exc:
        stats[type(exc).__name__] += 1


async def bad_upload(client, args, stats):
    files = {"adapter_config": ("adapter_config.json", b'{"peft_type": "LORA", "r": 8}'),
             "adapter_model": ("adapter_model.safetensors", b"\xff" * 64)}
    r = await client.post("/adapters", data={"name": f"bad-{random.randrange(1 << 30)}"}, files=files,
                          headers=args.admin_headers)
    stats[f"bad_upload_{r.status_code}"] += 1


async def main(args) -> int:
    stats: Counter = Counter()
    latencies: list[float] = []
    sem = asyncio.Semaphore(args.concurrency)
    deadline = time.monotonic() + args.max_seconds
    async with httpx.AsyncClient(base_url=args.url, timeout=args.max_seconds) as client:
        async def one(i):
            async with sem:
                if time.monotonic() > deadline:
                    stats["skipped_deadline"] += 1
                    return
                if args.bad_uploads and i % max(1, args.requests // args.bad_uploads) == 0:
                    await bad_upload(client, args, stats)
                await good_request(client, args, stats, latencies)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    print(f"wall {wall:.1f}s  ok {len(latencies)}  statuses {dict(stats)}")
    print(f"latency p50 {q[49]:.3f}s  p99 {q[98]:.3f}s  429-rate {stats[429] / max(1, args.requests):.1%}")
    failed = sum(v for k, v in stats.items() if isinstance(k, int) and k >= 500)
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", type=loopback_only)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--adapters", type=lambda s: [a for a in s.split(",") if a], default=[])
    p.add_argument("--bad-uploads", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-key", default=None)
    a = p.parse_args()
    a.headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    a.admin_headers = {"Authorization": f"Bearer {a.admin_key}"} if a.admin_key else a.headers
    sys.exit(asyncio.run(main(a)))
