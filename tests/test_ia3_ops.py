"""(IA)3 serving op (adapters/ia3_ops.py): the segmented fast path equals the token-by-token
reference, which equals PEFT's `ia3.Linear` for one adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftserve.adapters.ia3_ops import IA3SlotWeights, ia3_apply_segmented_, ia3_reference


def _setup(seed: int = 0, in_f: int = 12, out_f: int = 10):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g))
        base.bias.copy_(torch.randn(out_f, generator=g))
    weights = {
        1: IA3SlotWeights(torch.rand(in_f, generator=g) + 0.5, feedforward=True),
        2: IA3SlotWeights(torch.rand(out_f, generator=g) + 0.5, feedforward=False),
        4: IA3SlotWeights(torch.rand(in_f, generator=g) - 0.5, feedforward=True),
    }
    return base, weights, g


@pytest.mark.parametrize("segments", [
    [(0, 0, 3), (1, 3, 7), (2, 7, 12), (3, 12, 14), (4, 14, 20)],  # 3: a slot without (IA)3 here
    [(2, 0, 20)],
    [(1, 0, 1), (4, 1, 2), (0, 2, 20)],
    [],
])
def test_segmented_equals_reference(segments):
    base, weights, g = _setup()
    x = torch.randn(20, 12, generator=g)
    token_slots = torch.zeros(20, dtype=torch.long)
    for slot, s, e in segments:
        token_slots[s:e] = slot
    with torch.no_grad():
        want = ia3_reference(base, x, token_slots, weights)
        out = base(x)
        got = ia3_apply_segmented_(out, x, base, segments, weights)
    assert got is out  # in place
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reference_is_peft_ia3_linear():
    """One adapter on every token: PEFT's forward, base(x * l) for feedforward, base(x) * l else."""
    from peft import IA3Config, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff, self.attn = nn.Linear(12, 10), nn.Linear(12, 10)

        def forward(self, x):
            return self.ff(x), self.attn(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), IA3Config(target_modules=["ff", "attn"], feedforward_modules=["ff"],
                                            init_ia3_weights=False))
    x = torch.randn(7, 12)
    with torch.no_grad():
        want_ff, want_attn = model(x)
        net = model.base_model.model
        slots = torch.ones(7, dtype=torch.long)
        for layer, want, ff in ((net.ff, want_ff, True), (net.attn, want_attn, False)):
            vec = layer.ia3_l["default"].reshape(-1)
            got = ia3_reference(layer.base_layer, x, slots, {1: IA3SlotWeights(vec, ff)})
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
