"""adapters/transposed_copy.py against its reference, `t.T.float().contiguous()` per tensor: files
whose layers repeat (runs of evenly spaced tensors, copied as one block), irregular layouts,
tensors of separate storages or not contiguous (copied one by one), every dtype."""

from __future__ import annotations

import pytest
import torch

from peftserve.adapters.safetensors_io import borrowed_safetensors, write_safetensors
from peftserve.adapters.transposed_copy import copy_transposed, layout_key, plan_copy


def layered(layers: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA-like file: per layer, A [4, 24] and B [24, 4] for q, and A [4, 24] / B [8, 4] for k."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for mod, width in (("q", 24), ("k", 8)):
            out[f"layers.{i}.{mod}.lora_A.weight"] = torch.randn(4, 24, generator=g).to(dtype)
            out[f"layers.{i}.{mod}.lora_B.weight"] = torch.randn(width, 4, generator=g).to(dtype)
    return out


def check(tensors: dict[str, torch.Tensor], names: list[str]):
    plan = plan_copy(tensors, names)
    out = torch.full((plan.numel + 5,), float("nan"))  # a bigger buffer: the tail stays untouched
    copies = copy_transposed(plan, tensors, out)
    assert set(copies) == set(names)
    for name in names:
        want = tensors[name].T.float().contiguous()
        assert copies[name].is_contiguous() and torch.equal(copies[name], want), name
    ptrs = sorted((copies[n].data_ptr(), copies[n].numel()) for n in names)
    assert all(a + 4 * n <= b for (a, n), (b, _) in zip(ptrs, ptrs[1:]))  # no two copies overlap
    assert torch.isnan(out[plan.numel:]).all()
    return plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_file_whose_layers_repeat_is_copied_in_runs(dtype):
    data = write_safetensors(layered(12, dtype))
    with borrowed_safetensors(data, max_bytes=1 << 20) as tensors:
        plan = check(tensors, list(tensors))
    assert len(plan.runs) == 4 and all(len(r.names) == 12 for r in plan.runs)  # guard: runs really formed


def test_a_subset_and_an_irregular_layout_still_copy_exactly():
    tensors = layered(7, torch.float32, seed=1)
    tensors["layers.3.q.lora_A.weight"] = torch.randn(6, 24)  # another shape: later layers shift
    data = write_safetensors(tensors)
    with borrowed_safetensors(data, max_bytes=1 << 20) as views:
        names = [n for n in views if not n.startswith("layers.5.")]  # and a gap
        plan = check(views, names)
    assert 4 < len(plan.runs) < len(names)  # guard: runs formed, and split where the spacing breaks


def test_separate_and_non_contiguous_tensors_are_copied_one_by_one():
    tensors = layered(3, torch.float32, seed=2)
    tensors["layers.0.q.lora_A.weight"] = torch.randn(24, 4).T  # a transposed view: not contiguous
    assert not layout_key(tensors)[0]  # separate storages
    plan = check(tensors, list(tensors))
    assert len(plan.runs) == len(tensors)


def test_the_layout_key_tells_layouts_apart():
    a = write_safetensors(layered(3, torch.float32))
    b = write_safetensors(layered(3, torch.float32, seed=5))  # other values, same layout
    c = write_safetensors({**layered(3, torch.float32), "extra": torch.randn(2, 2)})
    with borrowed_safetensors(a, max_bytes=1 << 20) as ta, borrowed_safetensors(b, max_bytes=1 << 20) as tb, \
            borrowed_safetensors(c, max_bytes=1 << 20) as tc:
        assert layout_key(ta) == layout_key(tb) != layout_key(tc)


@pytest.mark.parametrize("with_empty", [False, True])
def test_region_views_describe_their_layout_as_the_views_themselves_would(with_empty):
    """safetensors_io.RegionViews makes views lazily and reports `layout()` without them: it must
    be what layout_key computes from the views (else a plan could be reused for the wrong layout)."""
    from peftserve.adapters.safetensors_io import RegionViews

    tensors = layered(3, torch.float32)
    if with_empty:
        tensors["layers.0.empty"] = torch.zeros(0, 4)
    with borrowed_safetensors(write_safetensors(tensors), max_bytes=1 << 20) as views:
        assert isinstance(views, RegionViews)
        lazy = layout_key(views)
        assert lazy == layout_key(dict(views.items()))
        assert lazy[0] is not with_empty
