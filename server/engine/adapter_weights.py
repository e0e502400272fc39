"""From validated host-memory adapters to what the device tier installs or caches."""

from __future__ import annotations

from typing import Callable

import torch

from peftserve.adapters.config import AdapterKind
from peftserve.adapters.lora_ops import LoraSlotWeights

from .adapter_layers import AdapterLayers, BottleneckSlotWeights, IA3SlotWeights
from .adapter_slots import KVPrefix

Installer = Callable[[AdapterLayers, int], None]


def slot_installer(ver, dtype: torch.dtype, device: torch.device) -> Installer:
    """Copy an adapter version's weights to the serving device/dtype; return its installer."""
    loaded = ver.loaded
    if loaded is None:
        raise RuntimeError(f"adapter {ver.name} version {ver.version} not resident in host memory")
    w = loaded.weights

    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    if ver.kind is AdapterKind.LORA:
        # float32 whatever the base dtype (see adapters/lora_ops.py: PEFT semantics, CPU speed)
        mods = {p: LoraSlotWeights(m.A.to(device), m.B.to(device), float(m.scale)) for p, m in w.modules.items()}
        return lambda layers, slot: layers.install_lora(slot, mods)
    if ver.kind is AdapterKind.IA3:
        mods = {p: IA3SlotWeights(to(m.vector), bool(m.scales_input)) for p, m in w.modules.items()}
        return lambda layers, slot: layers.install_ia3(slot, mods)
    if ver.kind is AdapterKind.BOTTLENECK:
        cfg = loaded.config
        subs = {
            (layer, pos): BottleneckSlotWeights(to(t.down_weight), to(t.down_bias), to(t.up_weight), to(t.up_bias),
                                                cfg.non_linearity, float(cfg.scaling), cfg.parallel)
            for layer, by_pos in w.layers.items() for pos, t in by_pos.items()
        }
        return lambda layers, slot: layers.install_bottleneck(slot, subs)
    raise ValueError(f"{ver.kind} is not a slot adapter")


def prefix_for(ver, runner) -> KVPrefix:
    """KV prefix of a prompt adapter: soft prompts run through the model once; prefix-tuning
    K/V are used as given (PEFT passes them as past_key_values, un-rotated)."""
    w = ver.loaded.weights
    model = runner.model
    if ver.kind in (AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING):
        ks, vs = runner.compute_prefix(w.embeddings.to(device=model.device, dtype=model.dtype))
        return KVPrefix(ks, vs)
    if ver.kind is AdapterKind.PREFIX_TUNING:
        kv = w.kv.to(device=model.device, dtype=model.dtype)  # [layers, 2, kv_heads, n, head_dim]
        return KVPrefix([kv[i, 0].contiguous() for i in range(kv.shape[0])],
                        [kv[i, 1].contiguous() for i in range(kv.shape[0])])
    raise ValueError(f"{ver.kind} is not a prompt adapter")
