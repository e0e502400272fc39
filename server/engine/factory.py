"""Assemble model + adapter layers + device slots + engine + registry in the right order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftserve.adapters.spec import BaseModelSpec

from ..registry import AdapterRegistry, RegistrySettings
from .adapter_layers import AdapterLayers
from .adapter_slots import AdapterSlots
from .adapter_weights import prefix_for, slot_installer
from .config import EngineConfig
from .engine import LLMEngine
from .merge import MergePolicy


@dataclass
class Serving:
    engine: LLMEngine
    registry: AdapterRegistry
    slots: AdapterSlots
    spec: BaseModelSpec


def build_serving(hf_model, tokenizer, config: EngineConfig, store: Path, model_name: str | None = None,
                  registry_settings: RegistrySettings | None = None, observer=None) -> Serving:
    """hf_model must be a model instance owned by the server (its modules get wrapped)."""
    spec = BaseModelSpec.from_model(hf_model, model_name, max_model_len=config.max_model_len)
    layers = AdapterLayers(hf_model, MergePolicy(config.merge_policy), config.merge_min_steps)
    holder: dict = {}
    slots = AdapterSlots(
        layers, config.max_adapters_per_batch,
        compute_prefix=lambda ver: prefix_for(ver, holder["engine"].runner),
        device_weights=lambda ver: slot_installer(ver, dtype=config.dtype, device=hf_model.device),
        observer=observer,
    )
    engine = LLMEngine(hf_model, tokenizer, config, adapters=slots, observer=observer)
    holder["engine"] = engine
    settings = registry_settings or RegistrySettings(store=store)
    # A replaced/deleted version leaves the device tier once no running request pins it; the
    # drop runs on the engine thread (the only thread touching slots) when an AsyncEngine is
    # attached — see server wiring — and directly in synchronous use.
    registry = AdapterRegistry(spec, settings, on_drop=lambda ver: slots.drop(ver.key))
    return Serving(engine, registry, slots, spec)
