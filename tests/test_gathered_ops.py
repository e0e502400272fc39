"""The gathered (BGMV-style) adapter ops of fixed-shape decode steps against the references.

`lora_add_gathered_` and `ia3_apply_gathered` read every slot from fixed-address stacks
(adapters/lora_ops.py, adapters/ia3_ops.py): mixed ranks zero-padded to the stacks' width, slot
0 and empty slots exactly neutral, and `put`/`clear` in place (a captured graph keeps reading the
same storage). The fast ops must equal the one-token-at-a-time references.
"""

from __future__ import annotations

import pytest
import torch

from peftserve.adapters.ia3_ops import IA3SlotWeights, IA3Stacks, ia3_apply_gathered, ia3_reference
from peftserve.adapters.lora_ops import LoraSlotWeights, LoraStacks, lora_add_gathered_, lora_delta_reference

IN, OUT, SLOTS = 12, 10, 5


def _lora(gen, rank: int, scale: float, dtype=torch.float32) -> LoraSlotWeights:
    return LoraSlotWeights(torch.randn(rank, IN, generator=gen), torch.randn(OUT, rank, generator=gen), scale,
                           dtype=dtype)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gathered_lora_equals_the_reference_for_mixed_ranks_and_empty_slots(storage, out_dtype):
    gen = torch.Generator().manual_seed(0)
    weights = {1: _lora(gen, 2, 0.5, storage), 2: _lora(gen, 8, 2.0, storage), 4: _lora(gen, 5, 1.0, storage)}
    stacks = LoraStacks(SLOTS, IN, OUT, max_rank=8, dtype=storage, device=torch.device("cpu"))
    for slot, w in weights.items():
        stacks.put(slot, w)
    token_slots = torch.tensor([0, 2, 1, 1, 4, 3, 2, 0, 4])  # slot 3 empty, slot 0 = no adapter
    x = torch.randn(len(token_slots), IN, generator=gen)
    base = torch.randn(len(token_slots), OUT, generator=gen).to(out_dtype)
    got = lora_add_gathered_(base.clone(), x, token_slots, stacks)
    want = (base.float() + lora_delta_reference(x, token_slots, weights)).to(out_dtype)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    neutral = (token_slots == 0) | (token_slots == 3)
    assert torch.equal(got[neutral], base[neutral])  # exactly untouched, not approximately


def test_lora_stacks_change_in_place_and_refuse_a_rank_they_cannot_hold():
    gen = torch.Generator().manual_seed(1)
    stacks = LoraStacks(SLOTS, IN, OUT, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    addresses = (stacks.A.data_ptr(), stacks.B.data_ptr(), stacks.scale.data_ptr())
    x = torch.randn(3, IN, generator=gen)
    slots = torch.tensor([1, 1, 0])
    stacks.put(1, _lora(gen, 4, 1.0))
    first = lora_add_gathered_(torch.zeros(3, OUT), x, slots, stacks)
    replacement = _lora(gen, 2, 3.0)  # a smaller rank into the same slot: no stale columns left
    stacks.put(1, replacement)
    second = lora_add_gathered_(torch.zeros(3, OUT), x, slots, stacks)
    torch.testing.assert_close(second, lora_delta_reference(x, slots, {1: replacement}))
    assert not torch.allclose(first, second)
    stacks.clear(1)
    assert torch.equal(lora_add_gathered_(torch.zeros(3, OUT), x, slots, stacks), torch.zeros(3, OUT))
    assert (stacks.A.data_ptr(), stacks.B.data_ptr(), stacks.scale.data_ptr()) == addresses
    too_big = _lora(gen, 5, 1.0)
    assert not stacks.fits(too_big)
    with pytest.raises(ValueError, match="max rank"):
        stacks.put(2, too_big)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_ia3_equals_the_reference_for_input_and_output_scaling(dtype):
    gen = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(IN, OUT).to(dtype)
    weights = {1: IA3SlotWeights(torch.rand(IN, generator=gen).to(dtype) + 0.5, feedforward=True),
               3: IA3SlotWeights(torch.rand(OUT, generator=gen).to(dtype) + 0.5, feedforward=False)}
    stacks = IA3Stacks(SLOTS, IN, OUT, dtype, torch.device("cpu"))
    for slot, w in weights.items():
        stacks.put(slot, w)
    token_slots = torch.tensor([3, 0, 1, 2, 3, 1])
    x = torch.randn(len(token_slots), IN, generator=gen).to(dtype)
    with torch.no_grad():
        got = ia3_apply_gathered(base, x, token_slots, stacks)
        want = ia3_reference(base, x, token_slots, weights)
        plain = token_slots.tolist().index(0)
        assert torch.equal(got[plain], base(x)[plain])  # no adapter: the base output, bit for bit
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    stacks.clear(1)
    assert torch.equal(stacks.inp[1], torch.ones(IN, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_bottleneck_equals_the_reference_for_every_activation_and_placement(dtype):
    from peftserve.adapters.bottleneck_ops import (ACTIVATIONS, BottleneckSlotWeights, BottleneckStacks,
                                                   bottleneck_add_gathered_, bottleneck_reference)

    gen = torch.Generator().manual_seed(5)
    hidden = 12

    def adapter(size, act, scaling, parallel):
        r = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
        return BottleneckSlotWeights(r(size, hidden), r(size), r(hidden, size), r(hidden), act, scaling, parallel)

    acts = list(ACTIVATIONS)
    weights = {1: adapter(3, acts[0], 0.5, False), 2: adapter(8, acts[1], 2.0, True),
               4: adapter(5, acts[2], 1.0, False), 5: adapter(6, acts[3], -1.0, True)}
    stacks = BottleneckStacks(SLOTS, hidden, width=8, dtype=dtype, device=torch.device("cpu"))
    for slot, w in weights.items():
        stacks.put(slot, w)
    token_slots = torch.tensor([0, 2, 1, 5, 4, 3, 2, 0, 5])  # slot 3 empty, slot 0 = none
    y = torch.randn(len(token_slots), hidden, generator=gen).to(dtype)
    x = torch.randn(len(token_slots), hidden, generator=gen).to(dtype)
    got = bottleneck_add_gathered_(y.clone(), x, token_slots, stacks)
    want = bottleneck_reference(y, x, token_slots, weights)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    neutral = (token_slots == 0) | (token_slots == 3)
    assert torch.equal(got[neutral], y[neutral])
    assert not stacks.fits(adapter(9, acts[0], 1.0, False))
    stacks.clear(2)
    cleared = bottleneck_add_gathered_(y.clone(), x, token_slots, stacks)
    assert torch.equal(cleared[token_slots == 2], y[token_slots == 2])
