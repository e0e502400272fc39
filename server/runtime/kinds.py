"""One handler per adapter kind, in one table (`KINDS`): everything the serving runtime does
differently for LoRA, (IA)3, bottleneck, prompt tuning, P-tuning and prefix tuning.

Two families:

- weight kinds (`WeightKind`: LoRA, (IA)3, bottleneck) live in a device slot of the wrapped
  layers. `to_device(ver, dtype, device)` copies the validated host weights to the serving
  device once per install, stored in `dtype`: the runtime passes the adapter dtype
  (`--adapter-dtype`) to kinds whose `weight_dtype` is "adapter" (LoRA) and the model dtype to
  the others ((IA)3, bottleneck: a vector per module / a small bottleneck, already in the model
  dtype as PEFT runs them; `--adapter-dtype` does not change them); `install(layers, slot, weights)` puts them in a slot's entries of the
  wrapped modules; `apply(module, x, out, batch, per_slot)` is the layer-side math, run by every
  wrapped module for the tokens of the slots holding this kind. Kinds with `gathers` (all three)
  also keep every slot in fixed-address stacks (`new_stacks`) for the gathered op of
  fixed-shape decode steps (server/engine/static_decode.py).
- prompt kinds (`PromptKind`: prompt tuning, P-tuning, prefix tuning) hold no slot: `prefix(ver,
  runner)` builds the KV prefix in blocks of the KV pool, computed once per version and
  referenced in place by each sequence of that version (server/runtime/slots.py).

`summary(loaded)` is what GET /adapters shows of an adapter of the kind.

Adding a kind = one handler class here (or in its own module) + one row in `KINDS`.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from peftserve.adapters.bottleneck_ops import (BottleneckSlotWeights, BottleneckStacks, bottleneck_add_gathered_,
                                               bottleneck_add_segmented_)
from peftserve.adapters.config import AdapterKind
from peftserve.adapters.ia3_ops import IA3SlotWeights, IA3Stacks, ia3_apply_gathered, ia3_apply_segmented_
from peftserve.adapters.lora_ops import LoraSlotWeights, LoraStacks, lora_add_gathered_, lora_add_grouped_

from ..engine.step_state import AdapterBatch
from .slots import KVPrefix

if TYPE_CHECKING:
    from peftserve.adapters.artifact import LoadedAdapter

    from ..engine.runner import ModelRunner
    from .layers import AdapterLayers

# What `to_device` returns and `install` consumes: per wrapped site (a linear's module path, or a
# (layer, position) sublayer key) the kind's weights for that site, on the serving device.
DeviceWeights = dict[Any, Any]


class WeightDtype(enum.Enum):
    """Which storage dtype a weight kind's device copy takes."""

    MODEL = "model"  # the base model's dtype ((IA)3, bottleneck: PEFT runs them in the layer's dtype)
    ADAPTER = "adapter"  # --adapter-dtype (LoRA: float32 = PEFT's autocast_adapter_dtype)


class KindHandler:
    """Base of every handler. `uses_slot` / `uses_prefix` say which runtime path a kind takes."""

    uses_slot: ClassVar[bool] = False
    uses_prefix: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False  # may be folded into the base weights (server/runtime/merge.py)

    def summary(self, loaded: LoadedAdapter) -> dict:
        raise NotImplementedError


class WeightKind(KindHandler):
    uses_slot = True
    site: ClassVar[str] = "linear"  # "linear": AdapterLinear entries; "sublayer": AdapterSublayer entries
    weight_dtype: ClassVar[WeightDtype] = WeightDtype.MODEL  # which dtype `to_device` gets

    def to_device(self, ver, dtype: torch.dtype, device: torch.device) -> DeviceWeights:
        raise NotImplementedError

    def device_nbytes(self, ver, dtype: torch.dtype) -> int:
        """Bytes its installed entries will take in `dtype` (the device byte budget reserves this
        before the install). Default: the host weights (float32 as validated) at `dtype`'s size."""
        return int(ver.nbytes) * dtype.itemsize // 4

    def install(self, layers: AdapterLayers, slot: int, weights: DeviceWeights) -> bool:
        """Put one slot's entries into the wrapped modules (the caller clears the slot on failure).
        -> whether every module's gathered stacks hold them too (fixed-shape steps may serve it)."""
        sites = layers.linears if self.site == "linear" else layers.sublayers
        held = [sites[key].put(self, slot, w) for key, w in weights.items()]
        return bool(held) and all(held)

    def apply(self, module, x: torch.Tensor, out: torch.Tensor, batch: AdapterBatch, per_slot: dict) -> None:
        """In place on `out` for this kind's slots; `per_slot`: slot -> this module's entry."""
        raise NotImplementedError

    # -- gathered (graph-safe) path, for decode steps with fixed shapes; optional per kind ----
    gathers: ClassVar[bool] = False  # has `new_stacks` and a gathered op
    gather_computes_base: ClassVar[bool] = False  # True: `gather_base` (rescales the base); else `gather_add_`
    gather_width: ClassVar[str] = "max_lora_rank"  # which GatherLimits field sizes its stacks

    def new_stacks(self, module, num_slots: int, width: int, dtype: torch.dtype, device: torch.device, example):
        """Fixed-address buffers for every slot at `module` (with `fits`, `put`, `clear`, `nbytes`),
        `width` wide (rank, bottleneck size); `example`: the weights about to be installed there."""
        raise NotImplementedError

    def gather_base(self, module, x: torch.Tensor, token_slots: torch.Tensor, stacks) -> torch.Tensor:
        raise NotImplementedError

    def gather_add_(self, module, x: torch.Tensor, out: torch.Tensor, token_slots: torch.Tensor, stacks) -> None:
        raise NotImplementedError


class PromptKind(KindHandler):
    uses_prefix = True

    def prefix(self, ver, runner: ModelRunner) -> KVPrefix:
        raise NotImplementedError

    def summary(self, loaded: LoadedAdapter) -> dict:
        return {"num_virtual_tokens": int(loaded.weights.num_virtual_tokens)}


def host_weights(ver):
    """The validated host-memory weights of a version (the request's handle holds them)."""
    if ver.loaded is None:
        raise RuntimeError(f"adapter {ver.name} version {ver.version} not resident in host memory")
    return ver.loaded


def _targets(modules) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in modules})


# -- LoRA ----------------------------------------------------------------------------------------
class LoraKind(WeightKind):
    """out += scale * B @ A @ x per token, through adapters/lora_ops.py (grouped by rank)."""

    mergeable = True
    weight_dtype = WeightDtype.ADAPTER

    def to_device(self, ver, dtype, device):
        # dtype = the adapter dtype, float32 by default whatever the base dtype; bf16/fp16 only
        # store A and B, the math stays float32 (see adapters/lora_ops.py: PEFT semantics, CPU speed)
        modules = host_weights(ver).weights.modules
        if device.type == "cpu":  # the host tensors themselves (in the matmul layout: see adapters/lora.py)
            return {p: LoraSlotWeights(m.A, m.B, m.scale, dtype=dtype) for p, m in modules.items()}
        return {p: LoraSlotWeights(m.A.to(device), m.B.to(device), m.scale, dtype=dtype) for p, m in modules.items()}

    def device_nbytes(self, ver, dtype):
        # LoraSlotWeights holds A and B and their transposed copies (LoraSlotWeights.nbytes); a
        # loaded LoRA's A and B already are the transposed views of the matmul layout, so those
        # are the same memory, while a combination's (adapters/combine.py) are copied
        modules = host_weights(ver).weights.modules.values()
        return sum(t.numel() * dtype.itemsize * (1 if t.T.is_contiguous() else 2) for m in modules for t in (m.A, m.B))

    def apply(self, module, x, out, batch, per_slot):
        # module.derived[self]: stacked weights per slot tuple, emptied whenever the slots change
        lora_add_grouped_(out, x, batch.segments, per_slot, module.derived.setdefault(self, {}), batch.plans)

    gathers = True

    def new_stacks(self, module, num_slots, width, dtype, device, example):
        return LoraStacks(num_slots, module.in_features, module.out_features, width, dtype, device)

    def gather_add_(self, module, x, out, token_slots, stacks):
        lora_add_gathered_(out, x, token_slots, stacks)

    def summary(self, loaded):
        modules = loaded.weights.modules
        ranks = sorted({m.rank for m in modules.values()})
        return {"rank": max(ranks), "ranks": ranks, "target_modules": _targets(modules), "num_modules": len(modules)}


# -- (IA)3 ---------------------------------------------------------------------------------------
class IA3Kind(WeightKind):
    """PEFT's (IA)3: a learned vector rescales a module's input (feed-forward) or output."""

    def to_device(self, ver, dtype, device):
        modules = host_weights(ver).weights.modules
        return {p: IA3SlotWeights(m.vector.to(device=device, dtype=dtype).contiguous(), bool(m.scales_input))
                for p, m in modules.items()}

    def apply(self, module, x, out, batch, per_slot):
        ia3_apply_segmented_(out, x, module.base, batch.segments, per_slot)  # adapters/ia3_ops.py

    gathers = True
    gather_computes_base = True

    def new_stacks(self, module, num_slots, width, dtype, device, example):
        return IA3Stacks(num_slots, module.in_features, module.out_features, dtype, device)

    def gather_base(self, module, x, token_slots, stacks):
        return ia3_apply_gathered(module.base, x, token_slots, stacks)

    def summary(self, loaded):
        modules = loaded.weights.modules
        return {"target_modules": _targets(modules), "num_modules": len(modules)}


# -- bottleneck ----------------------------------------------------------------------------------
class BottleneckKind(WeightKind):
    """Houlsby/Pfeiffer adapters after a decoder sublayer: y += scaling * up(act(down(z)))."""

    site = "sublayer"

    def device_nbytes(self, ver, dtype):
        # the host tensors keep the file's dtype (bf16 files stay bf16): count elements, not bytes
        layers = host_weights(ver).weights.layers
        return sum(x.numel() for by_pos in layers.values() for t in by_pos.values()
                   for x in (t.down_weight, t.down_bias, t.up_weight, t.up_bias)) * dtype.itemsize

    def to_device(self, ver, dtype, device):
        loaded = host_weights(ver)
        cfg = loaded.config

        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        return {(layer, pos): BottleneckSlotWeights(to(t.down_weight), to(t.down_bias), to(t.up_weight),
                                                    to(t.up_bias), cfg.non_linearity, float(cfg.scaling), cfg.parallel)
                for layer, by_pos in loaded.weights.layers.items() for pos, t in by_pos.items()}

    def apply(self, module, x, out, batch, per_slot):
        """x: the sublayer's input [1, T, hidden]; out: its output (a private copy) [1, T, hidden]."""
        bottleneck_add_segmented_(out[0], x[0], batch.segments, per_slot)  # adapters/bottleneck_ops.py

    gathers = True
    gather_width = "max_bottleneck_size"

    def new_stacks(self, module, num_slots, width, dtype, device, example):
        return BottleneckStacks(num_slots, example.up_w.shape[0], width, dtype, device)

    def gather_add_(self, module, x, out, token_slots, stacks):
        """x: the sublayer's input [1, T, hidden]; out: its output (a private copy) [1, T, hidden]."""
        bottleneck_add_gathered_(out[0], x[0], token_slots, stacks)

    def summary(self, loaded):
        return {"placement": loaded.config.placement, "num_layers": len(loaded.weights.layers)}


# -- prompt kinds --------------------------------------------------------------------------------
class SoftPromptKind(PromptKind):
    """Prompt tuning and P-tuning: virtual-token embeddings run through the model once."""

    def prefix(self, ver, runner):
        model = runner.model
        embeds = host_weights(ver).weights.embeddings  # [n, hidden]
        blocks, n = runner.compute_prefix(embeds.to(device=model.device, dtype=model.dtype))
        return _pool_prefix(runner, blocks, n)


class PrefixTuningKind(PromptKind):
    """Prefix tuning: K/V used as given (PEFT passes them as past_key_values, un-rotated)."""

    def prefix(self, ver, runner):
        model = runner.model
        kv = host_weights(ver).weights.kv  # [layers, 2, kv_heads, n, head_dim]
        kv = kv.to(device=model.device, dtype=model.dtype)
        blocks, n = runner.store_prefix([kv[i, 0] for i in range(kv.shape[0])], [kv[i, 1] for i in range(kv.shape[0])])
        return _pool_prefix(runner, blocks, n)


def _pool_prefix(runner, blocks: list[int], n: int) -> KVPrefix:
    cache = runner.cache
    return KVPrefix(blocks, n, nbytes=len(blocks) * cache.block_nbytes, release=cache.free)


_SOFT_PROMPT = SoftPromptKind()

KINDS: dict[AdapterKind, KindHandler] = {
    AdapterKind.LORA: LoraKind(),
    AdapterKind.IA3: IA3Kind(),
    AdapterKind.BOTTLENECK: BottleneckKind(),
    AdapterKind.PROMPT_TUNING: _SOFT_PROMPT,
    AdapterKind.P_TUNING: _SOFT_PROMPT,
    AdapterKind.PREFIX_TUNING: PrefixTuningKind(),
}
