"""Copy many small matrices, each transposed, into one float32 buffer: in a few calls, not one each.

Why: a loaded LoRA is one copy of its upload (adapters/lora.py), and an r16 q,k,v,o LoRA of the
default model is 240 matrices. Copied one by one, the per-call overhead (~7 us with numpy, 3x
that with torch) costs more than the bytes, on the thread answering the upload (upload -> first
token has a 20 ms budget). But a safetensors file lays such matrices out regularly: the same
tensor of every layer has one shape and sits at evenly spaced offsets (the writer sorts by name
and every layer's block has the same size). Such a run of k matrices is one strided [k, m, n]
view of the file's storage, and its transposed copy is one call.

- `plan_copy(tensors, names)` -> a `CopyPlan`: `names` grouped into runs (same dtype, shape and
  name but for its numbers, contiguous, in one storage, evenly spaced; anything else is a run of
  one), each given its place
  in the buffer. It depends on the tensors' names, dtypes, shapes and storage offsets only, so a
  caller may keep it for tensors of the same layout (`layout_key`).
- `copy_transposed(plan, tensors, out)` runs it into `out` (float32 [>= plan.numel]) and returns
  {name: that tensor's [n, m] copy, a contiguous view of `out`}.

The reference is the obvious loop, `out_t = t.T.float().contiguous()` per tensor; tests compare.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

_DIGITS = re.compile(r"[0-9]+")
_NUMPY_DTYPES = (torch.float32, torch.float16)  # numpy's transposing copy: ~3x torch's here; no bf16


@dataclass(frozen=True)
class Run:
    names: tuple[str, ...]  # k tensors [m, n] of one dtype, in storage order
    m: int
    n: int
    step: int  # elements between consecutive ones in their storage (m * n for a run of one)
    dest: int  # element offset in the buffer of the first one's [n, m] copy; the rest follow


@dataclass(frozen=True)
class CopyPlan:
    runs: tuple[Run, ...]
    numel: int  # float32 elements the buffer needs


def layout_key(tensors: Mapping[str, torch.Tensor]) -> tuple:
    """What a plan depends on: whether all tensors share one storage (so that offsets compare) and,
    per tensor, its name, dtype, shape, storage offset and contiguity. A mapping that knows its
    layout without making its tensors says so (`layout()`: safetensors_io.RegionViews)."""
    if hasattr(tensors, "layout"):
        return tensors.layout()
    base = {t.data_ptr() - t.storage_offset() * t.element_size() for t in tensors.values()}
    return (len(base) == 1, tuple((k, t.dtype, tuple(t.shape), t.storage_offset(), t.is_contiguous())
                                  for k, t in tensors.items()))


def plan_copy(tensors: Mapping[str, torch.Tensor], names: list[str], shared: bool | None = None) -> CopyPlan:
    """Runs over `names` (2-D tensors of `tensors`); see the module doc. `shared`: whether they
    all view one storage, `layout_key(tensors)[0]` (computed here unless the caller has it)."""
    if shared is None:
        shared = layout_key(tensors)[0]
    groups: dict[tuple, list[str]] = {}
    for name in names:
        t = tensors[name]
        if shared and t.is_contiguous():  # the same tensor of every layer: one name but for its numbers
            groups.setdefault((t.dtype, tuple(t.shape), _DIGITS.sub("#", name)), []).append(name)
        else:
            groups[(name,)] = [name]  # copied on its own
    runs, dest = [], 0
    for members in groups.values():
        members.sort(key=lambda k: tensors[k].storage_offset())
        for run in _progressions(members, tensors):
            m, n = tensors[run[0]].shape
            step = tensors[run[1]].storage_offset() - tensors[run[0]].storage_offset() if len(run) > 1 else m * n
            runs.append(Run(tuple(run), m, n, step, dest))
            dest += len(run) * m * n
    return CopyPlan(tuple(runs), dest)


def _progressions(members: list[str], tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Split offset-sorted `members` into maximal runs of evenly spaced offsets."""
    runs: list[list[str]] = []
    for name in members:
        run = runs[-1] if runs else None
        off = tensors[name].storage_offset()
        if run is not None and (len(run) == 1 or off - tensors[run[-1]].storage_offset()
                                == tensors[run[1]].storage_offset() - tensors[run[0]].storage_offset()):
            run.append(name)
        else:
            runs.append([name])
    return runs


def copy_transposed(plan: CopyPlan, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Execute `plan` into `out` (float32 CPU, >= plan.numel) -> {name: [n, m] contiguous view}."""
    out_np = out.numpy()
    copies: dict[str, torch.Tensor] = {}
    for run in plan.runs:
        k, m, n = len(run.names), run.m, run.n
        dst = out_np[run.dest: run.dest + k * m * n].reshape(k, n, m)
        first = tensors[run.names[0]]
        # [k, m, n]: the run in its storage (for a run of one, the tensor itself: any strides)
        src = (torch.as_strided(first, (k, m, n), (run.step, n, 1), first.storage_offset()) if k > 1
               else first.unsqueeze(0))
        if src.dtype in _NUMPY_DTYPES:
            np.copyto(dst, src.numpy().transpose(0, 2, 1))
        else:  # bfloat16
            torch.from_numpy(dst).copy_(src.transpose(1, 2))
        for i, name in enumerate(run.names):
            copies[name] = torch.from_numpy(dst[i])
    return copies
