"""`peftserve serve ...` and `peftserve train-adapter ...`.

`serve` loads the base model, builds the engine (+ the adapter registry when available), and
runs the API under uvicorn with structured JSON logs (one object per line on stderr).

Shutdown: the first SIGTERM starts a drain — `/ready` answers 503 at once and new requests get
503 `draining` while in-flight requests finish (up to `--drain-timeout`; whatever is still running
then is aborted); then uvicorn shuts down (lifespan stops the engine) and the process exits 0.
A second SIGTERM skips the wait; SIGINT (Ctrl-C) shuts down without draining, twice forces.
"""

from __future__ import annotations

import argparse
import re
import asyncio
import datetime as _dt
import json
import logging
import os
import signal
import sys
import time

log = logging.getLogger("peftserve.server.cli")

_RESERVED = set(vars(logging.LogRecord("x", 0, "x", 0, "x", (), None))) | {"message", "asctime", "taskName",
                                                                          "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        out = {"ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("peftserve")
    except Exception:
        return "0.0.0"


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {n})")
    return n


_BYTE_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?b?|b)?\s*$", re.IGNORECASE)


def _bytes(value: str) -> int:
    """A byte count: `4294967296`, `4GiB`, `512MiB` (powers of 1024), `4G`/`4GB` (powers of 1000)."""
    match = _BYTE_COUNT.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte count: {value!r} (e.g. 4GiB, 512MiB, 4000000000)")
    number, prefix, binary = match.groups()
    power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
    n = int(float(number) * (1024 if binary else 1000) ** power)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 byte (got {value!r})")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {n})")
    return n


def build_parser() -> argparse.ArgumentParser:
    from .engine.config import EngineConfig

    d = EngineConfig()
    parser = argparse.ArgumentParser(prog="peftserve", description="Multi-adapter LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train-adapter", add_help=False, help="train an adapter (see `peftserve train-adapter --help`)")
    s = sub.add_parser("serve", help="run the HTTP API server",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r = sub.add_parser("serve-ray", help="run N engine replicas behind Ray Serve (extra: peftserve[ray])",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for p in (s, r):  # serve-ray takes every serve flag (each replica is one `serve` engine)
        p.add_argument("--model", default="default", help="`default` (SmolLM2-135M-Instruct) or a local HF model dir")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=_non_negative, default=8000)
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        p.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="storage dtype of LoRA weights on the device; the LoRA math stays float32. "
                            "float32 = PEFT's numerics exactly; bfloat16/float16 halve the adapter bytes each "
                            "decode step reads (faster with many adapters; logits differ from PEFT by the "
                            "rounding of A and B). (IA)3 and bottleneck adapters always use the model dtype")
        p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:0, ...)")
        p.add_argument("--max-batch-size", type=_positive, default=d.max_batch_size,
                       help="running sequences at most")
        p.add_argument("--max-model-len", type=_positive, default=d.max_model_len,
                       help="prompt + generated tokens per request")
        p.add_argument("--kv-cache-bytes", type=_bytes, default=None,
                       help="KV-cache pool size (e.g. 4GiB): memory grows with the tokens in flight up to it; "
                            "admission waits when it is full. Default: max-batch-size x max-model-len tokens, "
                            "at most 4 GiB")
        p.add_argument("--kv-block-size", type=_positive, default=d.kv_block_size, help="tokens per KV-cache block")
        p.add_argument("--decode-mode", default=d.decode_mode, choices=["auto", "dynamic", "static", "graph"],
                       help="decode-only steps: `graph` replays CUDA graphs captured at start-up per batch bucket, "
                            "`static` runs the same fixed-shape step eagerly, `dynamic` sizes every step to its rows; "
                            "auto = graph on CUDA, dynamic on CPU")
        p.add_argument("--enforce-eager", dest="decode_mode", action="store_const", const="dynamic",
                       help="no CUDA graphs (= --decode-mode dynamic)")
        p.add_argument("--max-lora-rank", type=_positive, default=d.max_lora_rank,
                       help="largest LoRA rank fixed-shape (graph) decode steps serve; rows of larger ranks run "
                            "dynamic steps. Costs (in + out) x rank x (slots + 1) adapter-dtype values per "
                            "wrapped linear when graphs are on")
        p.add_argument("--max-bottleneck-size", type=_positive, default=d.max_bottleneck_size,
                       help="largest bottleneck-adapter size fixed-shape (graph) decode steps serve; larger ones "
                            "run dynamic steps")
        p.add_argument("--max-num-batched-tokens", type=_positive, default=d.max_num_batched_tokens,
                       help="token budget of one engine step")
        p.add_argument("--max-waiting", type=_non_negative, default=d.max_waiting,
                       help="queued requests before 429 queue_full")
        p.add_argument("--max-adapters-per-batch", type=_positive, default=d.max_adapters_per_batch,
                       help="device slots: distinct weight adapters (LoRA, (IA)3, bottleneck) installed at once")
        p.add_argument("--max-adapter-bytes", type=_bytes, default=d.max_adapter_bytes,
                       help="device memory all installed weight adapters may take together (e.g. 2GiB; their "
                            "entries at the storage dtype, a LoRA's transposed copies included): least recently "
                            "used idle adapters are evicted to make room, requests wait while running ones "
                            "hold it. Default 2 GiB")
        p.add_argument("--max-cpu-adapters", type=_positive, default=100_000,
                       help="count cap of adapters kept in host memory (--max-cpu-bytes is the budget that binds)")
        p.add_argument("--max-cpu-bytes", type=_positive, default=2 << 30,
                       help="host-memory byte budget for adapters and weighted combinations")
        p.add_argument("--max-combinations", type=_positive, default=16,
                       help="live weighted combinations (`adapter: [{name, weight}, ...]`) kept in host memory")
        p.add_argument("--strict-base", action="store_true",
                       help="refuse (422 base_model_mismatch) adapters whose config names another base model")
        p.add_argument("--merge-policy", default=d.merge_policy, choices=["never", "single-adapter"],
                       help="fold a LoRA into the base weights while it serves every running row")
        p.add_argument("--merge-min-steps", type=_positive, default=d.merge_min_steps)
        p.add_argument("--adapter-store", metavar="DIR", default=None, help="where uploaded adapters are stored")
        p.add_argument("--adapters", metavar="DIR", default=None, help="load every adapter found in DIR at start-up")
        p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="OpenAI `model` ids of the base model (the first is listed by /v1/models); "
                                "default: the model directory's name")
        p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                       help="vLLM-style preload of named adapters (any kind), alongside --adapters")
        p.add_argument("--allowed-adapter-dirs", nargs="+", default=None, metavar="DIR",
                       help="directories POST /v1/load_lora_adapter may load from (default: none, refused)")
        p.add_argument("--vllm-metric-names", action=argparse.BooleanOptionalAction, default=True,
                       help="also expose vLLM's metric names (vllm:num_requests_waiting, vllm:lora_requests_info, ...)")
        p.add_argument("--api-key", default=os.environ.get("PEFTSERVE_API_KEY"),
                       help="bearer token for /generate (env PEFTSERVE_API_KEY)")
        p.add_argument("--admin-key", default=os.environ.get("PEFTSERVE_ADMIN_KEY"),
                       help="bearer token for adapter management (env PEFTSERVE_ADMIN_KEY; default: the API key)")
        p.add_argument("--max-body-bytes", type=_positive, default=1024 * 1024, help="request-body cap for /generate")
        p.add_argument("--max-upload-bytes", type=_positive, default=256 * 1024 * 1024,
                       help="request-body cap for /adapters uploads")
        p.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests may take to finish after SIGTERM")
        p.add_argument("--no-ui", dest="ui", action="store_false",
                       help="do not serve the playground page at /ui (it follows --api-key when served)")
        p.add_argument("--no-docs", dest="docs", action="store_false",
                       help="do not serve /docs, /redoc and /openapi.json (otherwise they need the API key when set)")
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
        p.add_argument("--threads", type=_positive, default=None, help="torch intra-op threads")
    from .ray_serve.launch import add_arguments as add_ray_arguments  # no Ray import: flags only

    add_ray_arguments(r)
    return parser


def parse_lora_modules(items: list[str]) -> list[tuple[str, str]]:
    """vLLM's `--lora-modules` forms: `name=path`, or JSON `{"name": ..., "path": ...}`."""
    out = []
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                obj = json.loads(item)
                out.append((str(obj["name"]), str(obj["path"])))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora-modules: cannot parse {item!r} (want name=path or JSON name/path)") from None
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules: {item!r} is not name=path")
            out.append((name, path))
    return out


def _open_registry(registry, args) -> None:
    """Load the adapter store (survives restarts), then preload `--adapters DIR` if given."""
    from pathlib import Path

    from ..adapters.artifact import CONFIG_NAME
    from ..adapters.errors import AdapterError
    from .errors import ApiError

    loaded = registry.load_store()
    log.info("adapter store opened", extra={"store": str(registry.store), "adapters": len(loaded)})
    for name, path in parse_lora_modules(args.lora_modules or []):
        try:
            ver = registry.import_dir(Path(path), name)
            log.info("adapter preloaded", extra={"adapter": name, "kind": ver.kind.value, "version": ver.version})
        except (AdapterError, ApiError, OSError) as exc:
            log.error("adapter not preloaded", extra={"path": str(path), "adapter": name, "error": str(exc)})
    if args.adapters:
        for sub in sorted(Path(args.adapters).iterdir()):
            if not (sub / CONFIG_NAME).is_file():
                continue
            try:
                ver = registry.import_dir(sub)
                log.info("adapter preloaded", extra={"adapter": ver.name, "kind": ver.kind.value, "version": ver.version})
            except (AdapterError, ApiError, OSError) as exc:  # one bad adapter never blocks the start
                log.error("adapter not preloaded", extra={"path": str(sub), "error": str(exc)})


def serve(args) -> int:
    import torch

    from ..adapters.base_model import DEFAULT_MODEL, DEFAULT_MODEL_NAME, BaseModelError, load_base_model, parse_dtype
    from .metrics import Metrics
    from .engine.config import EngineConfig
    from pathlib import Path

    from ..adapters.base_model import cache_dir
    from .api import adapters as adapters_api
    from .api import vllm_ops
    from .build import build_server
    from .engine.model import UnsupportedModelError
    from .registry import RegistrySettings
    from .state import ServerSettings

    configure_logging(args.log_level)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        dtype = parse_dtype(args.dtype, device)
        t0 = time.monotonic()
        hf_model, tokenizer, model_dir = load_base_model(args.model, dtype=dtype, device=device)
        model_name = DEFAULT_MODEL_NAME if str(args.model) == DEFAULT_MODEL else os.path.basename(
            os.path.normpath(str(model_dir)))
        log.info("base model loaded", extra={"model": model_name, "model_dir": str(model_dir),
                                             "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                                             "seconds": round(time.monotonic() - t0, 2)})
        config = EngineConfig(max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                              max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
                              kv_cache_bytes=args.kv_cache_bytes, kv_block_size=args.kv_block_size,
                              max_adapters_per_batch=args.max_adapters_per_batch,
                              max_adapter_bytes=args.max_adapter_bytes, merge_policy=args.merge_policy,
                              merge_min_steps=args.merge_min_steps, dtype=dtype, device=str(device),
                              adapter_dtype=parse_dtype(args.adapter_dtype, device),
                              decode_mode=args.decode_mode, max_lora_rank=args.max_lora_rank,
                              max_bottleneck_size=args.max_bottleneck_size)
        max_pos = getattr(hf_model.config, "max_position_embeddings", None)
        if max_pos and args.max_model_len > max_pos:
            log.warning("max_model_len exceeds the model's max_position_embeddings",
                        extra={"max_model_len": args.max_model_len, "max_position_embeddings": max_pos})
        settings = ServerSettings(api_key=args.api_key or None, admin_key=args.admin_key or None,
                                  max_body_bytes=args.max_body_bytes,
                                  body_limits={"/adapters": args.max_upload_bytes},
                                  drain_timeout_s=args.drain_timeout, dtype=str(dtype).removeprefix("torch."),
                                  version=_version(), ui=args.ui, docs=args.docs,
                                  served_model_names=tuple(args.served_model_name or ()),
                                  allowed_adapter_dirs=tuple(args.allowed_adapter_dirs or ()))
        metrics = Metrics(base_model=model_name, dtype=settings.dtype, version=settings.version,
                          vllm_names=args.vllm_metric_names)
        store = Path(args.adapter_store) if args.adapter_store else cache_dir() / "adapter-store"
        reg_settings = RegistrySettings(store=store, max_cpu_adapters=args.max_cpu_adapters,
                                        max_cpu_bytes=args.max_cpu_bytes, max_combinations=args.max_combinations,
                                        strict_base=args.strict_base)
        server = build_server(hf_model, tokenizer, config, store=store, model_name=model_name,
                              registry_settings=reg_settings, settings=settings, metrics=metrics,
                              routers=[adapters_api.router, vllm_ops.router])
        _open_registry(server.serving.registry, args)  # drops queue until the engine thread starts
    except (BaseModelError, UnsupportedModelError, ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    state, app = server.state, server.app
    if not settings.api_key:
        log.warning("no API key configured: /generate is open to anyone who can reach %s:%s", args.host, args.port)
    return run_server(app, state, host=args.host, port=args.port, log_level=args.log_level)


def _make_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose SIGTERM drains first (see the module docstring)."""

        def __init__(self, config, state):
            super().__init__(config)
            self.state = state
            self._drain_task: asyncio.Task | None = None

        def handle_exit(self, sig, frame) -> None:  # runs in the signal handler (main thread)
            # never record the signal: uvicorn would re-raise it after shutdown (exit status != 0)
            if sig == signal.SIGTERM and not self.state.draining and not self.should_exit:
                self.state.draining = True  # /ready -> 503 and new requests -> 503 from now on
                log.info("SIGTERM received: draining", extra={"inflight": self.state.inflight,
                                                              "timeout_s": self.state.settings.drain_timeout_s})
            elif self.should_exit:
                self.force_exit = True
            else:
                self.state.draining = True
                self.should_exit = True

        async def on_tick(self, counter: int) -> bool:
            if self.state.draining and self._drain_task is None and not self.should_exit:
                self._drain_task = asyncio.ensure_future(self._drain())
            return await super().on_tick(counter)

        async def _drain(self) -> None:
            state = self.state
            deadline = time.monotonic() + state.settings.drain_timeout_s
            while state.inflight > 0 and time.monotonic() < deadline and not self.should_exit:
                await asyncio.sleep(0.05)
            if state.inflight > 0 and state.engine.running:
                log.warning("drain timeout: aborting in-flight requests", extra={"inflight": state.inflight})
                await asyncio.to_thread(state.engine.abort_all)
                grace = time.monotonic() + 2.0
                while state.inflight > 0 and time.monotonic() < grace:
                    await asyncio.sleep(0.05)
            log.info("drained; shutting down", extra={"inflight": state.inflight})
            self.should_exit = True

    return DrainingServer


def run_server(app, state, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               sockets=None) -> int:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=5, server_header=False)
    server = _make_server_class()(config, state)
    server.run(sockets=sockets)
    if not server.started:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-adapter":
        from peftserve.adapters.training.cli import main as train_main

        return int(train_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "serve-ray":
        from .ray_serve.launch import serve_ray

        return serve_ray(args)
    return 2  # pragma: no cover  (argparse enforces a command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
