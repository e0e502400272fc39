"""The Triton gathered-LoRA kernels (adapters/lora_triton.py) against the plain-torch form and the
one-token reference. Runs on CUDA (benchmarks/gpu_check.sh) and on CPU only under Triton's
interpreter (`TRITON_INTERPRET=1`); the CPU suite has no Triton and skips it without importing it."""

from __future__ import annotations

import os

import pytest
import torch

from peftserve.adapters.lora_ops import LoraSlotWeights, LoraStacks, lora_add_gathered_torch_, lora_delta_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("needs CUDA (or Triton's interpreter: TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")
pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IN, OUT, SLOTS, MAX_RANK = 40, 200, 6, 24  # none a multiple of the kernels' tiles


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_gathered_lora_equals_the_torch_form_and_the_reference(storage, out_dtype):
    from peftserve.adapters.lora_triton import lora_add_gathered_triton_

    gen = torch.Generator().manual_seed(4)

    def lora(rank, scale):
        return LoraSlotWeights(torch.randn(rank, IN, generator=gen), torch.randn(OUT, rank, generator=gen), scale,
                               dtype=storage)

    weights = {1: lora(3, 0.5), 2: lora(24, 2.0), 4: lora(17, 1.0), 5: lora(8, -1.5)}
    stacks = LoraStacks(SLOTS, IN, OUT, MAX_RANK, storage, DEVICE)
    for slot, w in weights.items():
        stacks.put(slot, LoraSlotWeights(w.A.to(DEVICE), w.B.to(DEVICE), w.scale, dtype=storage))
    token_slots = torch.tensor([0, 2, 1, 1, 4, 3, 2, 0, 5, 4, 2])  # slot 3 empty, slot 0 = none
    x = torch.randn(len(token_slots), IN, generator=gen)
    base = torch.randn(len(token_slots), OUT, generator=gen).to(out_dtype)
    slots_dev = token_slots.to(DEVICE)
    got = lora_add_gathered_triton_(base.clone().to(DEVICE), x.to(DEVICE), slots_dev, stacks).cpu()
    torch_form = lora_add_gathered_torch_(base.clone().to(DEVICE), x.to(DEVICE), slots_dev, stacks).cpu()
    want = (base.float() + lora_delta_reference(x, token_slots, weights)).to(out_dtype)
    tol = 1e-4 if out_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(got, torch_form, rtol=tol, atol=tol)
    neutral = (token_slots == 0) | (token_slots == 3)
    assert torch.equal(got[neutral], base[neutral])  # rank 0: nothing read, nothing added
    stacks.clear(2)  # in place: the next launch sees slot 2 empty
    again = lora_add_gathered_triton_(base.clone().to(DEVICE), x.to(DEVICE), slots_dev, stacks).cpu()
    assert torch.equal(again[token_slots == 2], base[token_slots == 2])
