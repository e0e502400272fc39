"""Adaptive merge: fold a LoRA into the base weights while it is the only adapter running.

When every token of the step uses the same LoRA slot (for `min_steps` consecutive steps, so a
lone request does not trigger a merge it cannot amortise), W' = W + scale * B @ A is written
into the base linear weights and the per-token LoRA path is skipped: zero adapter overhead.
The moment another adapter or a base row shows up, the original weights are copied back from
the saved copy — an exact restore, no subtraction, so no drift however many cycles.

The runtime calls this explicitly before each forward (`AdapterRuntime.prepare`), never a setter.
"""

from __future__ import annotations

import enum

import torch


class MergePolicy(str, enum.Enum):
    NEVER = "never"
    SINGLE_ADAPTER = "single-adapter"  # merge while one LoRA serves every running row


class Merger:
    """Which LoRA slot is folded into the base weights (`merged_slot`, 0 = none) and how to undo it."""

    def __init__(self, policy: MergePolicy = MergePolicy.NEVER, min_steps: int = 4):
        self.policy = MergePolicy(policy)
        self.min_steps = min_steps
        self.merged_slot = 0
        self._streak_slot = 0
        self._streak = 0
        self._saved: dict[object, torch.Tensor] = {}  # AdapterLinear -> original weight
        self.cycles = 0

    def decide(self, batch, mergeable: set[int]) -> int:
        """Slot to have merged for this step (0 = none). `mergeable`: slots holding a LoRA."""
        if self.policy is MergePolicy.NEVER or batch is None:
            return 0
        segs = batch.segments
        total = int(batch.token_slots.shape[0])
        single = len(segs) == 1 and segs[0][1] == 0 and segs[0][2] == total and segs[0][0] in mergeable
        slot = segs[0][0] if single else 0
        self._streak = self._streak + 1 if slot and slot == self._streak_slot else (1 if slot else 0)
        self._streak_slot = slot
        if slot and (slot == self.merged_slot or self._streak >= self.min_steps):
            return slot
        return 0

    @torch.no_grad()
    def merge(self, entries, slot: int) -> None:
        """W += scale * B @ A for every (AdapterLinear, LoraSlotWeights) of `slot` in `entries`."""
        for lin, w in entries:
            weight = lin.base.weight
            self._saved[lin] = weight.detach().clone()
            delta = (w.B.float() @ w.A.float()) * w.scale  # [out, in], computed in fp32
            if lin.transposed:  # GPT-2 Conv1D stores [in, out]
                delta = delta.T
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged_slot = slot
        self.cycles += 1

    @torch.no_grad()
    def unmerge(self) -> None:
        for lin, original in self._saved.items():
            lin.base.weight.copy_(original)
        self._saved.clear()
        self.merged_slot = 0
