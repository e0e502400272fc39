"""Scale-out on Ray Serve (issue 14): what Ray routing costs and what adapter affinity buys.

Throughput of 1 vs 2 replicas on a 2-core machine means nothing, so this measures:

(a) routing overhead per request: the same sequential workload (one request at a time, so no
    queueing; `max_new_tokens` 1, base model and one LoRA) against `peftserve serve` (subprocess,
    HTTP) and through the Ray ingress (Serve proxy -> PeftIngress -> PeftReplica, HTTP), client-side
    wall time per request, p50/p99; overhead = Ray minus direct.
(b) adapter residency under Zipf traffic over `--adapters` LoRAs (default 64) with K resident per
    replica (`--max-resident`, default 16) on `--replicas` replicas: the same seeded request
    sequence sent through the replica deployment handle with `multiplexed_model_id` = adapter
    (what the ingress does with affinity on) and without it (Ray's plain power-of-two balancing),
    each after its own warm-up; hit = the answering replica already held the adapter
    (`x-peftserve-adapter-residency` header), load = it had to load it (per 1,000 requests).

Default model: a tiny random Llama saved to a temp dir (the engine's own time is then small and
the routing cost stands out); `--model DIR` for a real one. One command, a few minutes:
`.venv/bin/python benchmarks/scaleout.py [--out FILE]`.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def args_parser():
    p = common.parser(__doc__)
    p.set_defaults(dtype="float32", threads=1, model=None)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--max-resident", type=int, default=16, help="K: adapters resident per replica")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    p.add_argument("--requests", type=int, default=1000, help="measured requests per routing mode")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured requests before each mode")
    p.add_argument("--latency-requests", type=int, default=300, help="sequential requests per side in (a)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight in (b)")
    return p


def make_adapters(root: Path, model_dir: Path, n: int, seed: int) -> list[Path]:
    """One PEFT LoRA on the model, then n distinct variants (scaled copies: new content hashes)."""
    from peft import LoraConfig

    from peftserve.adapters.base_model import load_base_model

    model, _, _ = load_base_model(str(model_dir))
    base = common.make_peft_adapter(model, root / "lora-0", LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False), seed)
    out = []
    for i in range(n):
        d = root / f"a{i:03d}"
        d.mkdir()
        (d / "adapter_config.json").write_bytes((base / "adapter_config.json").read_bytes())
        (d / "adapter_model.safetensors").write_bytes(common.perturbed_copy(base / "adapter_model.safetensors",
                                                                            seed + i))
        out.append(d)
    return out


def latency_run(url: str, n: int, prompt: list[int], adapter: str | None) -> list[float]:
    import httpx

    body = {"input_ids": prompt, "max_new_tokens": 1, **({"adapter": adapter} if adapter else {})}
    times = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n + 10):
            t0 = time.perf_counter()
            r = c.post("/generate", json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code} {r.text[:200]}")
            if i >= 10:  # the first few warm connections and caches
                times.append(dt)
    return times


def summary(times: list[float]) -> dict:
    return {"n": len(times), "p50_ms": common.pct(times, 50) * 1e3, "p99_ms": common.pct(times, 99) * 1e3,
            "mean_ms": sum(times) / len(times) * 1e3}


def upload_all(url: str, dirs: list[Path]) -> list[str]:
    import httpx

    names = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for d in dirs:
            files = {"adapter_config": ("adapter_config.json", (d / "adapter_config.json").read_bytes()),
                     "adapter_model": ("adapter_model.safetensors", (d / "adapter_model.safetensors").read_bytes())}
            r = c.post("/adapters", data={"name": d.name, "replace": "true"}, files=files)
            if r.status_code != 201:
                raise RuntimeError(f"upload {d.name}: HTTP {r.status_code} {r.text[:200]}")
            names.append(d.name)
    return names


async def residency_run(handle, names: list[str], sequence: list[int], prompt: list[int], affinity: bool,
                        concurrency: int) -> dict:
    """Send `sequence` (indices into names) through the replica handle; count hit/load per request."""
    counts = {"hit": 0, "load": 0, "other": 0}
    per_replica: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        name = names[i]
        body = json.dumps({"input_ids": prompt, "max_new_tokens": 1, "adapter": name}).encode()
        req = {"method": "POST", "path": "/generate", "query": b"", "body": body, "route": name,
               "adapters": [name], "manage": False, "headers": [(b"content-type", b"application/json")]}
        h = handle.options(multiplexed_model_id=name) if affinity else handle
        async with sem:
            out = await h.handle.remote(req)
        if out["status"] != 200:
            raise RuntimeError(f"{name}: HTTP {out['status']} {out['body'][:200]!r}")
        headers = dict(out["headers"])
        counts[headers.get(b"x-peftserve-adapter-residency", b"other").decode()] += 1
        rid = headers[b"x-peftserve-replica"].decode()
        per_replica[rid] = per_replica.get(rid, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in sequence))
    n = len(sequence)
    return {"requests": n, "hits": counts["hit"], "loads": counts["load"], "hit_rate": counts["hit"] / n,
            "loads_per_1000": counts["load"] * 1000 / n, "per_replica": per_replica,
            "seconds": time.perf_counter() - t0}


def main() -> int:
    args = args_parser().parse_args()
    if args.quick:
        args.requests, args.warmup, args.latency_requests = 200, 50, 60
    common.setup(args)
    import ray
    from ray import serve

    from peftserve.adapters.base_model import save_tiny_model_dir
    from peftserve.server.ray_serve.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="peftserve-scaleout-"))
    model_dir = Path(args.model) if args.model else save_tiny_model_dir(tmp / "model")
    adapter_dirs = make_adapters(tmp, model_dir, args.adapters, args.seed)
    prompt = list(range(100, 116))
    results: dict = {"environment": common.environment(args), "config": {
        k: getattr(args, k) for k in ("replicas", "adapters", "max_resident", "zipf", "requests", "warmup",
                                      "latency_requests", "concurrency", "dtype", "threads")},
        "model": "tiny random Llama (2 layers, hidden 64)" if not args.model else str(args.model)}

    # (a) direct server, alone on the machine
    direct_args = type("A", (), {"model": model_dir, "dtype": args.dtype, "threads": args.threads})
    with common.Server(direct_args, extra=["--adapter-store", str(tmp / "store-direct"), "--no-ui"]) as srv:
        upload_all(srv.url, adapter_dirs[:1])
        direct = {"base": summary(latency_run(srv.url, args.latency_requests, prompt, None)),
                  "lora": summary(latency_run(srv.url, args.latency_requests, prompt, adapter_dirs[0].name))}

    # (a) through Ray, then (b)
    port = common.free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app({
            "model": str(model_dir), "dtype": args.dtype, "adapter_store": str(tmp / "store-ray"),
            "replicas": args.replicas, "num_cpus_per_replica": 0.5, "threads": args.threads,
            "max_resident_adapters": args.max_resident, "max_adapters_per_batch": 8, "ui": False,
        }), name="scaleout", route_prefix="/")
        results["ray_start_s"] = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        names = upload_all(url, adapter_dirs)
        ray_side = {"base": summary(latency_run(url, args.latency_requests, prompt, None)),
                    "lora": summary(latency_run(url, args.latency_requests, prompt, names[0]))}
        results["latency"] = {"direct": direct, "ray": ray_side, "overhead_ms": {
            kind: {q: ray_side[kind][q] - direct[kind][q] for q in ("p50_ms", "p99_ms")} for kind in ("base", "lora")}}

        handle = serve.get_deployment_handle("PeftReplica", app_name="scaleout")
        rng = random.Random(args.seed)
        warm = common.zipf_choices(rng, len(names), args.zipf, args.warmup)
        seq = common.zipf_choices(rng, len(names), args.zipf, args.requests)

        async def both_modes() -> dict:
            out = {}
            for mode, affinity in (("random", False), ("affinity", True)):
                await residency_run(handle, names, warm, prompt, affinity, args.concurrency)  # warm-up
                out[mode] = await residency_run(handle, names, seq, prompt, affinity, args.concurrency)
            return out

        results["residency"] = asyncio.run(both_modes())
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)

    lat = results["latency"]
    print("\n| path | workload | p50 ms | p99 ms |\n|---|---|---|---|")
    for side in ("direct", "ray"):
        for kind in ("base", "lora"):
            s = lat[side][kind]
            print(f"| {side} | {kind} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")
    for kind in ("base", "lora"):
        o = lat["overhead_ms"][kind]
        print(f"| Ray overhead | {kind} | {o['p50_ms']:+.1f} | {o['p99_ms']:+.1f} |")
    print(f"\n{args.adapters} adapters, Zipf s={args.zipf}, K={args.max_resident} per replica, {args.replicas} replicas, "
          f"{args.requests} requests after {args.warmup} warm-up\n")
    print("| routing | hit rate | loads / 1,000 requests | requests per replica |\n|---|---|---|---|")
    for mode in ("random", "affinity"):
        r = results["residency"][mode]
        print(f"| {mode} | {r['hit_rate']:.1%} | {r['loads_per_1000']:.0f} | {sorted(r['per_replica'].values())} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
