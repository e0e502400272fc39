"""One engine replica: the `peftserve serve` wiring inside a Ray Serve deployment.

Why in-process ASGI: the replica answers through the same FastAPI app the single-process server
runs (auth, limits, error bodies, SSE, metrics), so Ray adds routing and nothing else.

Adapter residency (the part Ray decides): `load_adapter` is decorated with
`@serve.multiplexed(max_num_models_per_replica=K)` in app.py, with the adapter name as the
multiplexed model id. A load makes the adapter current in this replica's registry (from the
shared store); Ray's LRU eviction calls `_Resident.__del__`, which drops the adapter's weights
from this replica's host memory and device slot (`AdapterRegistry.release`) and never deletes
anything from the store. Ray Serve tells its routers which ids each replica holds, so requests
for an adapter go to a replica that already has it.

Consistency (the part the store decides): uploads, replaces and deletes go through whichever
replica Ray picks and land in ONE shared directory (`<store>/<name>/<version>/` + `CURRENT`,
version = content hash). Before a request runs, the replica compares each adapter it names with
the store's `CURRENT` (`AdapterRegistry.refresh`: one small file read) and reloads a changed
version or forgets a deleted one (-> 404), so no replica serves a version the store replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

from ..errors import AdapterNotFound, ApiError
from .asgi import call_asgi, stream_asgi
from .config import RayServeConfig

log = logging.getLogger("peftserve.server.ray_serve.replica")

REPLICA_HEADER = b"x-peftserve-replica"
RESIDENCY_HEADER = b"x-peftserve-adapter-residency"  # hit | load: was the adapter already resident here


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Ray replica (unit use)
        import uuid

        return "local-" + uuid.uuid4().hex[:8]


def _error(exc: ApiError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(exc.to_dict()).encode()
    return exc.status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class _Resident:
    """What the multiplexer holds per adapter; Ray calls `__del__` when it evicts it (LRU)."""

    def __init__(self, replica: "EngineReplica", name: str):
        self.replica, self.name = replica, name

    def __del__(self):
        replica = self.__dict__.get("replica")
        if replica is not None:
            replica._evicted(self)


class _ReplicaMetrics:
    """Series each replica adds to its own `/metrics` (scrape replicas one by one, or read them
    through the ingress: one replica per scrape, named by `peftserve_replica_info`)."""

    def __init__(self, metrics, replica_id: str, resident_count):
        from prometheus_client import Counter, Gauge

        r = metrics.registry
        self.adapter_label = metrics.adapter_label  # the app's bounded label set (OTHER beyond it)
        Gauge("peftserve_replica_info", "This Ray Serve replica (1).", ["replica"], registry=r).labels(
            replica=replica_id).set(1)
        self.residency = Counter("peftserve_replica_adapter_residency",
                                 "Routed adapter requests by whether the adapter was already resident here.",
                                 ["adapter", "result"], registry=r)
        self.loads = Counter("peftserve_replica_adapter_loads", "Adapters made resident on this replica.",
                             registry=r)
        self.evictions = Counter("peftserve_replica_adapter_evictions",
                                 "Adapters evicted from this replica (LRU beyond max_resident_adapters).", registry=r)
        Gauge("peftserve_replica_resident_adapters", "Adapters resident on this replica now.",
              registry=r).set_function(resident_count)


def build_state(cfg: RayServeConfig):
    """(state, app, serving) from `build_server` (server/build.py), like `peftserve serve`, except
    that the store is not scanned at start: N replicas would race to quarantine in a shared directory,
    and each replica loads only the adapters routed to it (on demand, bounded by K)."""
    from pathlib import Path

    import torch

    from peftserve.adapters.base_model import DEFAULT_MODEL, DEFAULT_MODEL_NAME, load_base_model, parse_dtype

    from ..api import adapters as adapters_api
    from ..build import build_server
    from ..metrics import Metrics
    from ..cli import _version
    from ..engine.config import EngineConfig
    from ..registry import RegistrySettings
    from ..state import ServerSettings

    torch.set_num_threads(cfg.threads or max(1, int(cfg.num_cpus_per_replica)))
    device = torch.device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device)
    hf_model, tokenizer, model_dir = load_base_model(cfg.model, dtype=dtype, device=device)
    model_name = DEFAULT_MODEL_NAME if str(cfg.model) == DEFAULT_MODEL else Path(str(model_dir)).name
    config = EngineConfig(max_batch_size=cfg.max_batch_size, max_model_len=cfg.max_model_len,
                          max_num_batched_tokens=cfg.max_num_batched_tokens, max_waiting=cfg.max_waiting,
                          kv_cache_bytes=cfg.kv_cache_bytes, kv_block_size=cfg.kv_block_size,
                          max_adapters_per_batch=cfg.max_adapters_per_batch,
                          max_adapter_bytes=cfg.max_adapter_bytes, merge_policy=cfg.merge_policy,
                          merge_min_steps=cfg.merge_min_steps, dtype=dtype, device=str(device),
                          adapter_dtype=parse_dtype(cfg.adapter_dtype, device),
                          decode_mode=cfg.decode_mode, max_lora_rank=cfg.max_lora_rank,
                          max_bottleneck_size=cfg.max_bottleneck_size)
    api_key, admin_key = cfg.keys()
    settings = ServerSettings(api_key=api_key, admin_key=admin_key, max_body_bytes=cfg.max_body_bytes,
                              body_limits={"/adapters": cfg.max_upload_bytes}, manage_engine=False,
                              dtype=str(dtype).removeprefix("torch."), version=_version(), ui=cfg.ui, docs=cfg.docs)
    metrics = Metrics(base_model=model_name, dtype=settings.dtype, version=settings.version,
                      vllm_names=cfg.vllm_metric_names)
    store = Path(cfg.resolved_store())
    # the host tier must hold at least the K adapters Ray keeps resident, or the two LRUs fight
    reg_settings = RegistrySettings(store=store, max_cpu_adapters=max(cfg.max_cpu_adapters, cfg.max_resident_adapters),
                                    max_cpu_bytes=cfg.max_cpu_bytes, max_combinations=cfg.max_combinations,
                                    strict_base=cfg.strict_base)
    server = build_server(hf_model, tokenizer, config, store=store, model_name=model_name,
                          registry_settings=reg_settings, settings=settings, metrics=metrics,
                          routers=[adapters_api.router])
    return server.state, server.app, server.serving


class EngineReplica:
    """Body of the `PeftReplica` deployment (app.py adds the multiplexed `load_adapter`)."""

    def __init__(self, config: dict):
        self.cfg = RayServeConfig.from_dict(config)
        self.replica_id = _replica_id()
        t0 = time.monotonic()
        self.state, self.app, self.serving = build_state(self.cfg)
        self.registry = self.serving.registry
        self.state.engine.start()
        self._resident: dict[str, _Resident] = {}
        self._lock = threading.Lock()
        self._metrics = _ReplicaMetrics(self.state.metrics, self.replica_id, lambda: len(self._resident))
        log.info("replica ready", extra={"replica": self.replica_id, "model": self.state.model_name,
                                         "seconds": round(time.monotonic() - t0, 2),
                                         "max_resident_adapters": self.cfg.max_resident_adapters})

    # -- residency (called by the multiplexer) -------------------------------------------------
    async def _load(self, name: str) -> _Resident:
        ver = await asyncio.to_thread(self.registry.refresh, name)
        if ver is None:
            raise AdapterNotFound(name)
        resident = _Resident(self, name)
        with self._lock:
            self._resident[name] = resident
        self._metrics.loads.inc()
        log.info("adapter resident", extra={"replica": self.replica_id, "adapter": name, "version": ver.version})
        return resident

    def _evicted(self, resident: _Resident) -> None:
        with self._lock:
            if self._resident.get(resident.name) is not resident:
                return  # a later load of the same name owns it now (or it was already evicted)
            del self._resident[resident.name]
        self._metrics.evictions.inc()
        self.registry.release(resident.name)
        log.info("adapter evicted", extra={"replica": self.replica_id, "adapter": resident.name})

    async def load_adapter(self, name: str) -> _Resident:  # replaced by the multiplexed one (app.py)
        return await self._load(name)

    def _sync_store(self) -> None:
        """Before adapter management: know every name the store holds now (uploads through other
        replicas), keeping weights resident only for the adapters Ray made resident here."""
        names = set(self.registry.store_names()) | {v.name for v in self.registry.list()}
        for name in sorted(names):
            try:
                self.registry.refresh(name)
            except ApiError as exc:
                log.error("adapter not refreshed", extra={"adapter": name, "error": exc.message})
                continue
            if name not in self._resident:
                self.registry.release(name)

    async def _prepare(self, req: dict):
        """-> (extra response headers, an error response or None)."""
        extra = [(REPLICA_HEADER, self.replica_id.encode())]
        try:
            if req.get("manage"):
                await asyncio.to_thread(self._sync_store)
            route = req.get("route")
            # an adapter the store lacks is never handed to the multiplexer (it would take a
            # resident slot); refresh forgot it, so the app answers 404 like a single server
            if route and await asyncio.to_thread(self.registry.refresh, route) is not None:
                hit = route in self._resident
                try:
                    await self.load_adapter(route)
                except AdapterNotFound:
                    pass  # deleted in between: same 404
                else:
                    self._metrics.residency.labels(adapter=self._metrics.adapter_label(route),
                                                   result="hit" if hit else "load").inc()
                    extra.append((RESIDENCY_HEADER, b"hit" if hit else b"load"))
            for name in req.get("adapters", ()):  # the version check: never serve a replaced version
                if name != route:  # checked just above
                    await asyncio.to_thread(self.registry.refresh, name)
        except ApiError as exc:
            return extra, _error(exc)
        return extra, None

    # -- requests -----------------------------------------------------------------------------
    async def handle(self, req: dict) -> dict:
        extra, error = await self._prepare(req)
        if error is None:
            status, headers, body = await call_asgi(self.app, req["method"], req["path"], req["query"],
                                                    req["headers"], req["body"])
        else:
            status, headers, body = error
        return {"status": status, "headers": list(headers) + extra, "body": body}

    async def handle_stream(self, req: dict):
        """Yields {"status", "headers"} first, then body chunks as the app sends them."""
        extra, error = await self._prepare(req)
        if error is not None:
            status, headers, body = error
            yield {"status": status, "headers": list(headers) + extra}
            yield body
            return
        async for message in stream_asgi(self.app, req["method"], req["path"], req["query"], req["headers"],
                                          req["body"]):
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", [])) + extra}
            elif message.get("body"):
                yield message["body"]

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine loop died."""
        if not self.state.engine.running:
            raise RuntimeError(f"engine not running: {self.state.engine.dead_reason}")

    def __del__(self):
        state = self.__dict__.get("state")
        if state is not None and state.engine.running:
            from ..api.app import stop_engine

            stop_engine(state)
