"""Adapter-aware wrappers around the base model's modules, driven by the step's AdapterBatch.

Weight adapters (LoRA, (IA)3, bottleneck) act per token: the runner orders rows by adapter
slot, so each slot's tokens are a contiguous segment of the packed `[T]` axis, and every
wrapped module applies, per segment, whatever the adapter in that slot has for this module.
The per-step batch is set once per step on the shared `AdapterLayers` object (vLLM's
punica-wrapper pattern) — no module globals, no forward hooks. Setting it has no side effect:
the adaptive merge is the runtime's explicit step (server/runtime/runtime.py `prepare`).

Slot 0 is "no adapter". A module's entries are `{kind handler: {slot: weights}}`, each of the
adapter's true shape (not `[max_slots, max_rank, ...]` buffers padded to the largest rank: on
CPU the padding would cost memory and FLOPs for nothing, and a slot entry is swapped in with one
dict assignment). The math is the kind's: `handler.apply` (server/runtime/kinds.py). Only where
fixed-shape decode steps run (CUDA graphs) does a module also keep `gathered` stacks of that
padded form, written in place on every put/clear, read by the GATHER-mode forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.model import decoder_parts
from ..engine.step_state import AdapterBatch, AdapterMode


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: weight stored [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class _SlotEntries:
    """Per-kind, per-slot entries of one wrapped module (mixed into both wrappers)."""

    entries: dict  # kind handler -> {slot: that kind's weights at this module}
    derived: dict  # kind handler -> cache derived from its entries (LoRA's stacks); reset on change
    # kind handler -> its fixed-address [slots + 1, ...] buffers for the gathered (graph-safe) op;
    # only when gathered decode is on (DeviceRuntime.enable_gather), kept in step with `entries`
    gathered: dict

    def put(self, kind, slot: int, weights) -> bool:
        """-> whether this module's gathered stacks of `kind` now hold the slot too (False: no
        stacks, or weights wider than they are; such a slot is served by dynamic steps only)."""
        self.entries.setdefault(kind, {})[slot] = weights
        self.derived.pop(kind, None)
        stacks = self.gathered.get(kind)
        if stacks is None or not stacks.fits(weights):
            return False
        stacks.put(slot, weights)
        return True

    def clear(self, slot: int) -> None:
        for kind in list(self.entries):
            if self.entries[kind].pop(slot, None) is not None:
                self.derived.pop(kind, None)
            if not self.entries[kind]:
                del self.entries[kind]  # an empty module stays on the base-only fast path
        for stacks in self.gathered.values():
            stacks.clear(slot)


class AdapterLinear(_SlotEntries, nn.Module):
    """A base nn.Linear (or GPT-2 Conv1D) plus per-slot entries of the linear kinds (LoRA, (IA)3)."""

    def __init__(self, base: nn.Module, ctx: "AdapterLayers"):
        super().__init__()
        self.base = base
        self.transposed = not isinstance(base, nn.Linear)  # Conv1D keeps its weight as [in, out]
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        self._ctx = [ctx]  # list: keep the shared context out of nn.Module child registration
        self.entries, self.derived, self.gathered = {}, {}, {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self._ctx[0].batch
        if batch is not None and batch.mode is AdapterMode.GATHER:
            return self._forward_gathered(x, batch.token_slots)
        if batch is None or not batch.segments or not self.entries:
            return self.base(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, in]
        out = self.base(x2)  # [T, out]
        # A slot holds one adapter of one kind, so kinds touch disjoint segments: order is free.
        for kind, per_slot in self.entries.items():
            kind.apply(self, x2, out, batch, per_slot)
        return out.view(*shape[:-1], out.shape[-1])

    def _forward_gathered(self, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        """Every gathered kind's op, whatever the slots hold now: the same ops every step, so a
        captured graph stays valid as adapters come and go (their stacks change in place). A kind
        that rescales the base's input or output ((IA)3) computes the base output; additive kinds
        (LoRA) then add to it."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, in]
        out = None
        for kind, stacks in self.gathered.items():
            if kind.gather_computes_base:
                out = kind.gather_base(self, x2, token_slots, stacks)
        if out is None:
            out = self.base(x2)
        for kind, stacks in self.gathered.items():
            if not kind.gather_computes_base:
                kind.gather_add_(self, x2, out, token_slots, stacks)
        return out.view(*shape[:-1], out.shape[-1])


class AdapterSublayer(_SlotEntries, nn.Module):
    """Wraps a decoder layer's `self_attn` or `mlp` for per-slot sublayer kinds (bottleneck)."""

    def __init__(self, base: nn.Module, ctx: "AdapterLayers"):
        super().__init__()
        self.base = base
        self._ctx = [ctx]
        self.entries, self.derived, self.gathered = {}, {}, {}

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        batch = self._ctx[0].batch
        if batch is None:
            return out
        if batch.mode is AdapterMode.GATHER:  # the same ops every step (stacks change in place)
            work = self.gathered
            if not work:
                return out
        elif not self.entries or not batch.segments:
            return out
        y = out[0] if isinstance(out, tuple) else out  # [1, T, hidden]
        src = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [1, T, hidden]
        y = y.clone()  # the base module may return a view of a buffer it reuses
        if batch.mode is AdapterMode.GATHER:
            for kind, stacks in work.items():
                kind.gather_add_(self, src, y, batch.token_slots, stacks)
        else:
            for kind, per_slot in self.entries.items():
                kind.apply(self, src, y, batch, per_slot)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)


class AdapterLayers:
    """Owns the wrapped modules of one model and the step's AdapterBatch."""

    def __init__(self, hf_model: nn.Module):
        self.batch: AdapterBatch | None = None
        self.linears: dict[str, AdapterLinear] = {}  # module path -> wrapper
        self.sublayers: dict[tuple[int, str], AdapterSublayer] = {}  # (layer, "attn"|"mlp") -> wrapper
        prefix, decoder_layers, sublayer_attr = decoder_parts(hf_model)
        for name, module in list(hf_model.named_modules()):
            for child_name, child in list(module.named_children()):
                path = f"{name}.{child_name}" if name else child_name
                if _is_linear(child) and path.startswith(prefix):
                    wrapped = AdapterLinear(child, self)
                    setattr(module, child_name, wrapped)
                    self.linears[path] = wrapped
        for i, layer in enumerate(decoder_layers):
            for pos, attr in sublayer_attr.items():
                wrapped = AdapterSublayer(getattr(layer, attr), self)
                setattr(layer, attr, wrapped)
                self.sublayers[(i, pos)] = wrapped

    def set_batch(self, batch: AdapterBatch | None) -> None:
        """The token -> slot map every wrapped module reads during the next forward."""
        self.batch = batch

    def clear(self, slot: int) -> None:
        """Remove every entry of `slot` (any kind) from every wrapped module."""
        for module in (*self.linears.values(), *self.sublayers.values()):
            module.clear(slot)
