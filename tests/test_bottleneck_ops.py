"""Bottleneck serving op (adapters/bottleneck_ops.py): the segmented fast path equals the
token-by-token reference, and both equal the `attach_bottleneck` reference forward of
adapters/bottleneck.py (the wrapper training and the PEFT-style parity tests use)."""

from __future__ import annotations

import pytest
import torch

from peftserve.adapters import bottleneck as bn
from peftserve.adapters.bottleneck_ops import BottleneckSlotWeights, bottleneck_add_segmented_, bottleneck_reference
from tests.tiny import tiny_llama

H = 64  # tests.tiny hidden size


def _slot_weights(t: bn.AdapterTensors, cfg: bn.BottleneckConfig) -> BottleneckSlotWeights:
    return BottleneckSlotWeights(t.down_weight, t.down_bias, t.up_weight, t.up_bias, cfg.non_linearity,
                                 float(cfg.scaling), cfg.parallel)


def _random(placement: str, act: str, seed: int, size: int = 8, scaling: float = 1.0):
    cfg = bn.BottleneckConfig(bottleneck_size=size, placement=placement, non_linearity=act, scaling=scaling)
    weights = bn.init_bottleneck(cfg, {"hidden_size": H, "num_hidden_layers": 2}, seed=seed, random_up=True)
    return cfg, weights


@pytest.mark.parametrize("segments", [
    [(0, 0, 3), (1, 3, 7), (2, 7, 12), (3, 12, 14), (4, 14, 20)],  # 3: a slot without a bottleneck here
    [(2, 0, 20)],
    [(1, 0, 1), (4, 1, 2), (0, 2, 20)],
    [],
])
def test_segmented_equals_reference(segments):
    adapters = {1: _random("houlsby", "relu", 1), 2: _random("parallel", "gelu", 2, scaling=0.5),
                4: _random("pfeiffer", "tanh", 4, size=3, scaling=2.0)}
    weights = {slot: _slot_weights(w.layers[0]["mlp"], cfg) for slot, (cfg, w) in adapters.items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, H, generator=g), torch.randn(20, H, generator=g)
    token_slots = torch.zeros(20, dtype=torch.long)
    for slot, s, e in segments:
        token_slots[s:e] = slot
    want = bottleneck_reference(y, x, token_slots, weights)
    out = y.clone()
    got = bottleneck_add_segmented_(out, x, segments, weights)
    assert got is out  # in place
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("placement,act", [("houlsby", "silu"), ("pfeiffer", "relu"), ("parallel", "gelu")])
def test_equals_attach_bottleneck(placement, act):
    """The sublayers `attach_bottleneck` wraps compute what the serving op adds to their output."""
    cfg, weights = _random(placement, act, seed=7, scaling=1.5)
    model = tiny_llama(0)
    handle = bn.attach_bottleneck(model, cfg, weights)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, H, generator=g)
    with torch.no_grad():
        for (i, pos), wrapper in handle.wrappers.items():
            if pos != "mlp":
                continue  # attention needs position embeddings; the op does not care which sublayer
            want = wrapper(x)
            y = wrapper.base(x)[0].clone()
            slot = {3: _slot_weights(weights.layers[i][pos], cfg)}
            got = bottleneck_add_segmented_(y, x[0], [(0, 0, 2), (3, 2, 9)], slot)
            torch.testing.assert_close(got[2:], want[0, 2:], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[:2], wrapper.base(x)[0, :2])  # slot 0: the base output
            ref = bottleneck_reference(wrapper.base(x)[0], x[0], torch.tensor([0, 0] + [3] * 7), slot)
            torch.testing.assert_close(ref, got, rtol=1e-6, atol=1e-6)
    handle.detach()
