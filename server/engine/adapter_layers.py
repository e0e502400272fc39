"""Adapter-aware wrappers around the base model's modules, driven by the step's AdapterBatch.

Weight adapters (LoRA, (IA)3, bottleneck) act per token: the runner orders rows by adapter
slot, so each slot's tokens are a contiguous segment of the packed `[T]` axis, and every
wrapped module applies, per segment, whatever the adapter in that slot has for this module.
The per-step batch is set once per step on the shared `AdapterLayers` object (vLLM's
punica-wrapper pattern) — no module globals, no forward hooks.

Slot 0 is "no adapter". Slot weights are per-module entries of the adapter's true shape (not
`[max_slots, max_rank, ...]` buffers padded to the largest rank: on CPU the padding would cost
memory and FLOPs for nothing, and a slot entry is swapped in with one dict assignment).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftserve.adapters.lora_ops import LoraSlotWeights, lora_add_grouped_

from .merge import MergePolicy, Merger
from .model import decoder_parts
from .step_state import AdapterBatch


@dataclass(frozen=True)
class IA3SlotWeights:
    scale: torch.Tensor  # [in] for feed-forward modules (scales the input), else [out]
    feedforward: bool


@dataclass(frozen=True)
class BottleneckSlotWeights:
    down_w: torch.Tensor  # [b, hidden]
    down_b: torch.Tensor  # [b]
    up_w: torch.Tensor  # [hidden, b]
    up_b: torch.Tensor  # [hidden]
    act: str
    scaling: float
    parallel: bool  # reads the sublayer input instead of its output

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        from peftserve.adapters.bottleneck import ACTIVATIONS

        return self.scaling * F.linear(ACTIVATIONS[self.act](F.linear(z, self.down_w, self.down_b)), self.up_w, self.up_b)


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: weight stored [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class AdapterLinear(nn.Module):
    """A base nn.Linear (or GPT-2 Conv1D) plus per-slot LoRA / (IA)3 entries."""

    def __init__(self, base: nn.Module, ctx: "AdapterLayers"):
        super().__init__()
        self.base = base
        self.transposed = not isinstance(base, nn.Linear)  # Conv1D keeps its weight as [in, out]
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        self._ctx = [ctx]  # list: keep the shared context out of nn.Module child registration
        self.lora: dict[int, LoraSlotWeights] = {}
        self.lora_stacks: dict = {}  # slot tuple -> stacked weights (grouped path); reset on change
        self.ia3: dict[int, IA3SlotWeights] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self._ctx[0].batch
        if batch is None or not batch.segments or not (self.lora or self.ia3):
            return self.base(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, in]
        out = self.base(x2)  # [T, out]
        if self.ia3:
            for slot, s, e in batch.segments:
                w = self.ia3.get(slot)
                if w is None:
                    continue
                if w.feedforward:  # PEFT: base(x * l) — recompute this segment only
                    out[s:e] = self.base(x2[s:e] * w.scale)
                else:  # PEFT: base(x) * l
                    out[s:e] = out[s:e] * w.scale
        if self.lora:
            lora_add_grouped_(out, x2, batch.segments, self.lora, self.lora_stacks, batch.plans)
        return out.view(*shape[:-1], out.shape[-1])


class AdapterSublayer(nn.Module):
    """Wraps a decoder layer's `self_attn` or `mlp` for per-slot bottleneck adapters."""

    def __init__(self, base: nn.Module, ctx: "AdapterLayers"):
        super().__init__()
        self.base = base
        self._ctx = [ctx]
        self.bottleneck: dict[int, BottleneckSlotWeights] = {}

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        batch = self._ctx[0].batch
        if batch is None or not self.bottleneck or not batch.segments:
            return out
        y = out[0] if isinstance(out, tuple) else out  # [1, T, hidden]
        src = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        y = y.clone()
        for slot, s, e in batch.segments:
            w = self.bottleneck.get(slot)
            if w is not None:
                z = src[0, s:e] if w.parallel else y[0, s:e]
                y[0, s:e] = y[0, s:e] + w(z)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)


class AdapterLayers:
    """Owns the wrapped modules of one model and the step's AdapterBatch."""

    def __init__(self, hf_model: nn.Module, merge_policy: MergePolicy = MergePolicy.NEVER, merge_min_steps: int = 4):
        self.batch: AdapterBatch | None = None
        self.merger = Merger(merge_policy, merge_min_steps)
        self.lora_only: set[int] = set()  # slots holding a LoRA (mergeable) adapter
        self.linears: dict[str, AdapterLinear] = {}
        self.sublayers: dict[tuple[int, str], AdapterSublayer] = {}
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
        target = self.merger.decide(batch, self.lora_only)
        if target != self.merger.merged_slot:
            self.merger.unmerge()
            if target:
                self.merger.merge(self.linears.values(), target)
        # While merged, the LoRA lives in the base weights: the wrappers must not add it again.
        self.batch = AdapterBatch(batch.token_slots, []) if target else batch

    def install_lora(self, slot: int, modules: dict[str, LoraSlotWeights]) -> None:
        for path, w in modules.items():
            self.linears[path].lora[slot] = w
            self.linears[path].lora_stacks.clear()
        self.lora_only.add(slot)

    def install_ia3(self, slot: int, modules: dict[str, IA3SlotWeights]) -> None:
        for path, w in modules.items():
            self.linears[path].ia3[slot] = w

    def install_bottleneck(self, slot: int, sublayers: dict[tuple[int, str], BottleneckSlotWeights]) -> None:
        for key, w in sublayers.items():
            self.sublayers[key].bottleneck[slot] = w

    def clear(self, slot: int) -> None:
        if self.merger.merged_slot == slot:
            self.merger.unmerge()
        self.lora_only.discard(slot)
        for lin in self.linears.values():
            if lin.lora.pop(slot, None) is not None:
                lin.lora_stacks.clear()
            lin.ia3.pop(slot, None)
        for sub in self.sublayers.values():
            sub.bottleneck.pop(slot, None)
