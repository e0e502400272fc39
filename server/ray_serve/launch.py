"""`peftserve serve-ray`: the Ray application from command-line flags.

Starts a local Ray cluster (or joins one with `--address`), runs the application built by
app.py with Serve's HTTP proxy on `--host:--port`, and keeps it up until SIGINT/SIGTERM, then
shuts Serve down (replicas drain through Ray's graceful shutdown) and leaves the cluster.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

log = logging.getLogger("peftserve.server.ray_serve.launch")

# serve flags that carry over into RayServeConfig under the same name (dashes -> underscores)
_SHARED = ("model", "dtype", "adapter_dtype", "device", "max_batch_size", "max_model_len", "max_num_batched_tokens", "max_waiting",
           "kv_cache_bytes", "kv_block_size", "decode_mode", "max_lora_rank", "max_bottleneck_size",
           "max_adapters_per_batch", "max_adapter_bytes", "max_cpu_adapters", "max_cpu_bytes", "merge_policy", "merge_min_steps",
           "adapter_store", "api_key", "admin_key", "max_body_bytes", "max_upload_bytes", "threads", "ui", "docs",
           "max_combinations", "strict_base", "vllm_metric_names")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=2, help="engine replicas (fixed count)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (`auto`, `ray://host:10001`); default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--max-resident-adapters", type=int, default=16,
                   help="K: adapters one replica keeps loaded (Ray Serve multiplexing evicts LRU beyond it)")
    p.add_argument("--no-affinity", dest="affinity", action="store_false",
                   help="route without regard to adapters (Ray's power-of-two balancing)")
    p.add_argument("--autoscale", action="store_true",
                   help="scale replicas on queue depth between --min-replicas and --max-replicas")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling target of running+queued requests per replica (default: --max-batch-size)")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="1 with --device cuda")
    p.add_argument("--retries", type=int, default=2, help="re-sends of a request whose replica died first")


# serve flags the replicas do not take: refused when given, never silently ignored
_NOT_ON_RAY = ("allowed_adapter_dirs", "drain_timeout", "lora_modules", "served_model_name")


def unsupported_flags(args) -> list[str]:
    """The `_NOT_ON_RAY` flags given with a value other than their default, as `--flag-name`."""
    from ..cli import build_parser

    defaults = build_parser().parse_args(["serve-ray"])
    return ["--" + n.replace("_", "-") for n in _NOT_ON_RAY if getattr(args, n) != getattr(defaults, n)]


def config_from_args(args) -> dict:
    raw = {name: getattr(args, name) for name in _SHARED}
    for name in ("replicas", "max_resident_adapters", "affinity", "autoscale", "min_replicas", "max_replicas",
                 "target_ongoing_requests", "num_cpus_per_replica", "num_gpus_per_replica", "retries"):
        raw[name] = getattr(args, name)
    return raw


def serve_ray(args) -> int:
    from ..cli import configure_logging
    from .config import RayConfigError, RayServeConfig

    configure_logging(args.log_level)
    if args.adapters:
        log.error("--adapters is not supported with serve-ray: upload through POST /adapters or start "
                  "`peftserve serve --adapters DIR --adapter-store STORE` once to import into the shared store")
        return 2
    unsupported = unsupported_flags(args)
    if unsupported:
        log.error("not supported with serve-ray (the replicas would ignore them): %s", ", ".join(unsupported))
        return 2
    try:
        raw = RayServeConfig.from_dict(config_from_args(args)).to_dict()
    except RayConfigError as exc:
        log.error("cannot start: %s", exc, extra={"code": exc.code})
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        log.error("serve-ray needs Ray Serve: pip install 'peftserve[ray]'")
        return 2
    from .app import build_app

    init = {"address": args.address} if args.address else {"num_cpus": args.num_cpus}
    ray.init(**init, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init: it installs a SIGTERM handler that exits
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(raw), name="peftserve", route_prefix="/")
        log.info("serving on Ray", extra={"host": args.host, "port": args.port, "replicas": raw["replicas"],
                                          "autoscale": raw["autoscale"], "affinity": raw["affinity"],
                                          "max_resident_adapters": raw["max_resident_adapters"]})
        stop.wait()
        log.info("shutting down Ray Serve")
    finally:
        try:
            serve.delete("peftserve")
            if not args.address:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
