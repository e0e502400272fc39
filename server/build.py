"""The only wiring of a server: model -> runtime -> engine -> (async engine) -> registry ->
ServerState -> app. Used by the CLI, the Ray replica, the evaluation harness, the benchmarks and
the tests.

- `build_engine(...)`: synchronous, in-process use (tests, benchmarks, evaluation): the registry
  drops device-tier versions directly, on the calling thread, which is the engine's thread.
- `build_server(...)`: the HTTP server: an `AsyncEngine` runs the engine in its own thread, and
  the registry's drops travel to that thread through the engine's command queue
  (`EngineThreadDevice`), so only the engine thread ever touches device slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peftserve.adapters.spec import BaseModelSpec

from .engine.async_engine import AsyncEngine
from .engine.config import EngineConfig
from .engine.engine import LLMEngine
from .metrics import Metrics
from .registry import AdapterRegistry, DeviceTier, RegistrySettings
from .runtime.layers import AdapterLayers
from .runtime.merge import MergePolicy
from .runtime.runtime import DeviceRuntime
from .state import ServerSettings, ServerState

if TYPE_CHECKING:
    from fastapi import FastAPI


@dataclass
class Serving:
    """One base model served in-process: the engine, its adapter runtime and the registry."""

    engine: LLMEngine
    registry: AdapterRegistry
    runtime: DeviceRuntime
    spec: BaseModelSpec


class EngineThreadDevice:
    """The registry's `DeviceTier` while an AsyncEngine runs: each drop is queued as an engine
    command, so it runs on the engine thread between steps. The command holds the version key
    only — never the version and its weights (see `DeviceTier`)."""

    def __init__(self, async_engine: AsyncEngine, runtime: DeviceRuntime):
        self._engine = async_engine
        self._runtime = runtime

    def drop(self, key: str) -> None:
        runtime = self._runtime
        self._engine.call(lambda _engine: runtime.drop(key))

    def stage(self, ver) -> None:
        """On the caller's (request or upload) thread: `DeviceRuntime.stage` is thread-safe."""
        self._runtime.stage(ver)


def build_runtime(hf_model, config: EngineConfig, observer=None) -> DeviceRuntime:
    """Wrap `hf_model`'s modules (it must be owned by the server) and make its device tier."""
    layers = AdapterLayers(hf_model)
    return DeviceRuntime(layers, config.max_adapters_per_batch, dtype=config.dtype, device=hf_model.device,
                         merge_policy=MergePolicy(config.merge_policy), merge_min_steps=config.merge_min_steps,
                         observer=observer, adapter_dtype=config.adapter_dtype,
                         max_adapter_bytes=config.max_adapter_bytes)


def _registry(spec: BaseModelSpec, store: Path, settings: RegistrySettings | None,
              device: DeviceTier) -> AdapterRegistry:
    return AdapterRegistry(spec, settings or RegistrySettings(store=store), device=device)


def build_engine(hf_model, tokenizer, config: EngineConfig, store: Path, model_name: str | None = None,
                 registry_settings: RegistrySettings | None = None, observer=None) -> Serving:
    """Model -> runtime -> engine -> registry, for synchronous use (`engine.step()` / `generate`)."""
    spec = BaseModelSpec.from_model(hf_model, model_name, max_model_len=config.max_model_len)
    runtime = build_runtime(hf_model, config, observer)
    engine = LLMEngine(hf_model, tokenizer, config, adapters=runtime, observer=observer)
    return Serving(engine, _registry(spec, store, registry_settings, device=runtime), runtime, spec)


@dataclass
class Server:
    """What `build_server` returns: the state the routes read, the app, and the serving parts
    (`serving` is None for a base-model-only server)."""

    state: ServerState
    app: FastAPI
    serving: Serving | None


def build_server(hf_model, tokenizer, config: EngineConfig, store: Path | None, *, model_name: str,
                 registry_settings: RegistrySettings | None = None, settings: ServerSettings | None = None,
                 metrics=None, routers=(), idle_wait_s: float = 0.05) -> Server:
    """Model -> runtime -> engine -> async engine -> registry -> ServerState -> app (not started).

    `store=None` serves the base model only: no wrapped layers, no runtime, no registry.
    `metrics` (server/metrics.py; made here when None) observes the engine and the runtime. Registry
    drops made before the engine thread starts (loading the store) wait in its command queue.
    """
    from .api.app import create_app  # the HTTP layer only here: the rest stays framework-free

    settings = settings or ServerSettings()
    if metrics is None:
        metrics = Metrics(base_model=model_name, dtype=settings.dtype, version=settings.version)
    if store is None:
        async_engine = AsyncEngine(LLMEngine(hf_model, tokenizer, config, observer=metrics), idle_wait_s=idle_wait_s)
        state = ServerState(async_engine, tokenizer, model_name, settings=settings, metrics=metrics)
        return Server(state, create_app(state, routers=list(routers)), None)
    spec = BaseModelSpec.from_model(hf_model, model_name, max_model_len=config.max_model_len)
    runtime = build_runtime(hf_model, config, metrics)
    engine = LLMEngine(hf_model, tokenizer, config, adapters=runtime, observer=metrics)
    async_engine = AsyncEngine(engine, idle_wait_s=idle_wait_s)
    registry = _registry(spec, store, registry_settings, device=EngineThreadDevice(async_engine, runtime))
    state = ServerState(async_engine, tokenizer, model_name, registry=registry, settings=settings,
                        metrics=metrics)
    app = create_app(state, routers=list(routers))
    return Server(state, app, Serving(engine, registry, runtime, spec))
