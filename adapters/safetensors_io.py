"""Strict reader for untrusted `.safetensors` bytes.

We parse and validate the whole container ourselves *before* any tensor is materialised, so that
a hostile upload can never make us allocate based on an unchecked length, read out of bounds,
alias two tensors onto the same bytes, or load a pickle. Only after every check passes do we copy
each tensor's bytes out (so the caller may drop the upload buffer) and view them as torch tensors.

Layout (https://github.com/huggingface/safetensors):
    [8 bytes: u64 little-endian N][N bytes: UTF-8 JSON header][data region]
    header = {"__metadata__": {str: str}?, name: {"dtype": str, "shape": [int], "data_offsets": [s, e]}}
    offsets are relative to the data region and must tile it exactly.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from peftserve.adapters.strict_json import loads_strict
from .errors import (
    INVALID_SAFETENSORS,
    NON_FINITE,
    UNSUPPORTED_DTYPE,
    AdapterError,
    AdapterTooLarge,
    NeverLoadedFormat,
)

# Adapter weights are always floating point; integer/bool/f64/f8 tensors have no business here.
SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
}
# Every dtype the format defines: used to tell "valid but refused" (unsupported_dtype) apart from
# "garbage" (invalid_safetensors).
_KNOWN_DTYPES = frozenset(
    {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
     "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
)
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}
MAX_NDIM = 8
MAX_DIM = 2**31 - 1  # per dimension, also for empty tensors (see _check_extent)
_ZIP_MAGIC = b"PK\x03\x04"
# `borrowed_safetensors` views read-only buffers (an upload's `bytes`) on purpose and never writes
# through them; torch warns (once per process) that it cannot mark such tensors read-only.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # relative to the data region
    end: int


def _bad(message: str) -> AdapterError:
    return AdapterError(INVALID_SAFETENSORS, message)


def _never_loaded(what: str) -> AdapterError:
    # 415: the bytes are a format we refuse on principle, not a broken safetensors file.
    return NeverLoadedFormat(f"{what} detected: pickle/zip is never loaded; upload adapter_model.safetensors")


def _looks_like_pickle(head: bytes) -> bool:
    # Protocol 2+ pickles (incl. legacy torch.save) start with PROTO opcode 0x80 and a version byte.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header_json(raw: bytes) -> dict[str, object]:
    if not raw.startswith(b"{"):
        raise _bad("header must be a JSON object starting with '{'")
    try:
        text = raw.decode("utf-8")  # strict: invalid UTF-8 is an error, never replaced
    except UnicodeDecodeError as exc:
        raise _bad(f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = loads_strict(text, "header", _bad)
    except AdapterError:
        raise
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise _bad(f"header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise _bad("header must be a JSON object")
    return header


def _check_metadata(meta: object) -> None:
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _bad("__metadata__ must map strings to strings")


def _parse_entry(name: str, spec: object, region_len: int, max_bytes: int) -> _Entry:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise _bad(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _KNOWN_DTYPES:
        raise _bad(f"tensor {name!r}: unknown dtype {str(dtype)[:32]!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise AdapterError(UNSUPPORTED_DTYPE, f"tensor {name!r}: dtype {dtype} not accepted "
                           f"(use one of {', '.join(SUPPORTED_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} non-negative ints")
    _check_extent(name, shape, dtype, max_bytes)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
        raise _bad(f"tensor {name!r}: data_offsets must be [start, end] integers")
    start, end = offsets
    if not 0 <= start <= end <= region_len:
        raise _bad(f"tensor {name!r}: data_offsets [{start}, {end}] outside data region of {region_len} bytes")
    # Python ints do not overflow, but a shape like [2**40, 2**40] must still be refused: the
    # byte count has to equal the (already bounded) span exactly.
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if nbytes != end - start:
        raise _bad(f"tensor {name!r}: shape {shape[:MAX_NDIM]} x {dtype} = {nbytes} bytes "
                   f"but data_offsets span {end - start} bytes")
    return _Entry(name, dtype, tuple(shape), start, end)


def _check_extent(name: str, shape: list[int], dtype: str, max_bytes: int) -> None:
    """Bound every dimension even when the tensor is empty.

    A zero dimension makes the byte count 0 whatever the others are, so `[2**40, 2**40, 0]` or
    `[2**63, 0]` would pass the span check and then overflow torch's int64 size/stride arithmetic
    (a 500 instead of a 4xx). Rule: each dim < 2**31 (torch and every kernel we run index with
    it), and with its empty dims counted as 1 the tensor must still fit the file-size cap: a
    shape is only as large as an upload could back.
    """
    if any(d > MAX_DIM for d in shape):
        raise _bad(f"tensor {name!r}: dimension {max(shape)} exceeds {MAX_DIM}")
    extent = _ITEMSIZE[dtype]
    for d in shape:  # at most MAX_NDIM factors of < 2**31: Python ints, stopped as soon as too big
        extent *= max(d, 1)
        if extent > max_bytes:
            raise _bad(f"tensor {name!r}: shape {shape} (empty dims counted as 1) needs more than the "
                       f"{max_bytes}-byte size cap")


def _check_tiling(entries: list[_Entry], region_len: int) -> None:
    """Offsets must cover the data region exactly: no overlap (aliasing), no gaps (hidden bytes)."""
    cursor = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start != cursor:
            kind = "overlaps the previous tensor" if e.start < cursor else "leaves a gap before it"
            raise _bad(f"tensor {e.name!r}: data_offsets start {e.start} {kind} (expected {cursor})")
        cursor = e.end
    if cursor != region_len:
        raise _bad(f"data region has {region_len - cursor} trailing bytes not owned by any tensor")


def _materialise(mv: memoryview, base: int, e: _Entry) -> torch.Tensor:
    dtype = SUPPORTED_DTYPES[e.dtype]
    if e.start == e.end:
        return torch.empty(e.shape, dtype=dtype)
    # bytearray() copies, so the result is independent of (and outlives) the caller's buffer.
    raw = bytearray(mv[base + e.start: base + e.end])
    if sys.byteorder == "little":
        flat = torch.frombuffer(raw, dtype=dtype)
    else:  # the format is little-endian; swap bytes within each element on big-endian hosts
        item = _ITEMSIZE[e.dtype]
        flat = torch.frombuffer(raw, dtype=torch.uint8).view(-1, item).flip(-1).contiguous().view(dtype)
    return flat.reshape(e.shape)


def read_safetensors(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int,
    max_header_bytes: int = 1 << 20,
    check_finite: bool = True,
) -> dict[str, torch.Tensor]:
    """Validate `data` as a safetensors file and return {name: tensor} (independent CPU copies).

    Raises AdapterError: adapter_too_large (413), invalid_safetensors (422; 415 for pickle/zip),
    unsupported_dtype (422), non_finite (422).
    """
    mv, base, region_len, entries = _validate(data, max_bytes, max_header_bytes)
    if sys.byteorder == "little":
        raw = bytearray(mv[base: base + region_len])  # independent of the caller's buffer
        return dict(_views(raw, entries, check_finite))
    return _materialise_swapped(mv, base, entries, check_finite)


def _materialise_swapped(mv: memoryview, base: int, entries: list[_Entry], check_finite: bool) -> dict:
    """Big-endian hosts: every tensor its own (byte-swapped) copy."""
    tensors: dict[str, torch.Tensor] = {}
    for e in sorted(entries, key=lambda e: e.name):
        t = _materialise(mv, base, e)
        if check_finite and not all_finite(t):
            raise AdapterError(NON_FINITE, f"tensor {e.name!r} contains NaN or Inf")
        tensors[e.name] = t
    return tensors


@contextmanager
def borrowed_safetensors(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int,
    max_header_bytes: int = 1 << 20,
    check_finite: bool = True,
) -> Iterator[Mapping[str, torch.Tensor]]:
    """The same validation and result as `read_safetensors`, without its copy: the tensors are
    read-only views, valid inside the `with` block only (a `RegionViews` for a single-dtype
    file). The caller copies what it keeps (the LoRA loader copies every tensor once anyway, into
    the transposed layout the serving matmuls read).

    Why: upload -> first token. The owned copy of a 7.4 MB upload costs ~4 ms, mostly faulting in
    fresh pages, and the LoRA loader then copied it again.

    Views are of `data` itself where every tensor starts at a multiple of its element size there
    (the usual case: safetensors pads its header to 8 bytes, and bytes objects are 16-aligned);
    otherwise (a file part at an odd offset of a multipart body) of one copy in a reused,
    already-resident scratch buffer. Never a misaligned float view: compiled loops may assume
    element alignment. Never write to them: they may alias an immutable `bytes` object.
    """
    mv, base, region_len, entries = _validate(data, max_bytes, max_header_bytes)
    if sys.byteorder != "little":
        yield _materialise_swapped(mv, base, entries, check_finite)
        return
    region = mv[base: base + region_len]
    if _aligned(region, entries):
        yield _views(region, entries, check_finite)
        return
    scratch = _SCRATCH.take(region_len)
    try:
        with memoryview(scratch) as whole:
            whole[:region_len] = region
        yield _views(scratch, entries, check_finite)
    finally:
        _SCRATCH.give_back(scratch)


def _aligned(region: memoryview, entries: list[_Entry]) -> bool:
    if not region.nbytes:
        return True
    address = np.frombuffer(region, dtype=np.uint8, count=1).ctypes.data
    return all((address + e.start) % _ITEMSIZE[e.dtype] == 0 for e in entries)


class _ScratchPool:
    """A few reused bytearrays for `borrowed_safetensors`' copies (resident after first use, so
    a copy costs the memcpy, not page faults). At most `keep` buffers of at most `max_bytes`
    each stay; a borrower beyond that gets a fresh one, dropped afterwards."""

    def __init__(self, keep: int = 2, max_bytes: int = 64 << 20):
        self.keep, self.max_bytes = keep, max_bytes
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= n:
                    return self._free.pop(i)
        return bytearray(max(n, 1))

    def give_back(self, buf: bytearray) -> None:
        if len(buf) > self.max_bytes:
            return
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)

    def nbytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._free)


_SCRATCH = _ScratchPool()


def scratch_bytes() -> int:
    """Bytes `borrowed_safetensors` keeps resident for its copies of misaligned uploads."""
    return _SCRATCH.nbytes()


def _validate(data, max_bytes: int, max_header_bytes: int) -> tuple[memoryview, int, int, list[_Entry]]:
    """Every check of the container, before any tensor exists -> (bytes, data region start,
    its length, its entries)."""
    mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    size = mv.nbytes
    if size > max_bytes:
        raise AdapterTooLarge(f"weights are {size} bytes, limit is {max_bytes}")
    head = bytes(mv[:8])
    if head.startswith(_ZIP_MAGIC):
        # A zip can never be a valid safetensors file (its magic read as u64 is > 67 MB of header).
        raise _never_loaded("zip archive (torch.save format)")
    if size < 8:
        raise _bad(f"file is {size} bytes, too short for the 8-byte header length")
    header_len = int.from_bytes(head, "little")  # unsigned: 2**64-1 stays a huge positive int
    limit = min(max_header_bytes, size - 8)
    if header_len > limit:
        if _looks_like_pickle(head):
            raise _never_loaded("pickle")
        what = "file size" if header_len > size - 8 else f"header cap {max_header_bytes}"
        raise _bad(f"header length {header_len} exceeds {what}")
    if header_len < 2:
        raise _bad("header too short to be a JSON object")

    base = 8 + header_len
    region_len = size - base
    raw = bytes(mv[8: base])
    parse = _layout_cached if len(raw) <= _CACHED_HEADER_BYTES else _layout
    return mv, base, region_len, list(parse(raw, region_len, max_bytes))


def _layout(raw: bytes, region_len: int, max_bytes: int) -> tuple[_Entry, ...]:
    """The header's entries, every check passed (a pure function of its arguments)."""
    header = _parse_header_json(raw)
    entries: list[_Entry] = []
    for name, spec in header.items():
        if name == "__metadata__":
            _check_metadata(spec)
            continue
        entries.append(_parse_entry(name, spec, region_len, max_bytes))
    _check_tiling(entries, region_len)
    return tuple(entries)


# Adapters of one configuration have byte-identical headers (names, shapes, offsets): a platform
# uploading many of them parses and checks each header once (~1.5 ms for the 240 tensors of an
# r16 q,k,v,o LoRA). Only successes are kept (an error is raised, not cached); small headers only.
_CACHED_HEADER_BYTES = 256 << 10
_layout_cached = functools.lru_cache(maxsize=16)(_layout)


def _views(raw, entries: list[_Entry], check_finite: bool) -> Mapping[str, torch.Tensor]:
    """Tensors viewing the (validated, contiguously tiled) data region at the start of `raw`:
    for the usual file (one dtype) a `RegionViews`, else a dict.

    Why one region and views: an upload's latency matters (upload -> first token). One copy at
    most (the caller's choice) and, when every tensor has the same dtype, one finiteness pass
    over the whole region replace hundreds of small copies and checks.
    """
    dtypes = {e.dtype for e in entries}
    region_len = sum(e.end - e.start for e in entries)
    if len(dtypes) == 1 and region_len:  # the usual file: every tensor views one [n] tensor's storage
        code = next(iter(dtypes))
        whole = torch.frombuffer(raw, dtype=SUPPORTED_DTYPES[code], count=region_len // _ITEMSIZE[code])
        if check_finite and not all_finite(whole):
            bad = next(e.name for e in sorted(entries, key=lambda e: e.name) if not all_finite(_view(raw, e)))
            raise AdapterError(NON_FINITE, f"tensor {bad!r} contains NaN or Inf")
        return RegionViews(whole, entries)
    tensors: dict[str, torch.Tensor] = {}
    for e in sorted(entries, key=lambda e: e.name):
        t = _view(raw, e)
        if check_finite and not all_finite(t):
            raise AdapterError(NON_FINITE, f"tensor {e.name!r} contains NaN or Inf")
        tensors[e.name] = t
    return tensors


class RegionViews(Mapping):
    """{name: tensor} over a single-dtype region (by name), each view made when first asked for.

    Why lazily: a reader that keeps a plan per layout (the LoRA loader) touches a few tensors of
    a layout it has seen, not all of them (240 for an r16 q,k,v,o LoRA, ~3 us each). `layout()`
    describes every tensor without making it: what `transposed_copy.layout_key` computes from
    the views themselves (a test holds the two equal)."""

    def __init__(self, whole: torch.Tensor, entries: list[_Entry]):
        self._whole = whole  # [n]: the region; every non-empty view shares its storage
        self._entries = {e.name: e for e in sorted(entries, key=lambda e: e.name)}
        self._made: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._made.get(name)
        if t is None:
            e = self._entries[name]
            t = self._made[name] = (_part(self._whole, e) if e.start != e.end
                                    else torch.empty(e.shape, dtype=self._whole.dtype))
        return t

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def layout(self) -> tuple:
        """(one shared storage?, per tensor (name, dtype, shape, storage offset, contiguous))."""
        item, dtype = self._whole.element_size(), self._whole.dtype
        shared = all(e.start != e.end for e in self._entries.values())  # an empty tensor has a storage of its own
        return shared, tuple((e.name, dtype, e.shape, e.start // item if e.start != e.end else 0, True)
                             for e in self._entries.values())


def _part(whole: torch.Tensor, e: _Entry) -> torch.Tensor:
    """Entry `e` of a single-dtype region as a view of `whole` (its storage: a reader may copy
    evenly spaced same-shape tensors as one strided block, adapters/lora.py). Offsets are multiples
    of the element size there: the region tiles exactly with whole elements."""
    strides, step = [], 1
    for d in reversed(e.shape):
        strides.append(step)
        step *= d
    return whole.as_strided(e.shape, strides[::-1], e.start // whole.element_size())


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or +-inf in a float tensor. min and max propagate NaN and +-inf, and one `aminmax`
    pass reads the data once with no temporary: ~25x faster than an elementwise isfinite on a
    CPU (0.23 vs 6 ms for 1.85M float32, one thread), and this is on the upload -> first token path."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _view(raw, e: _Entry) -> torch.Tensor:
    dtype = SUPPORTED_DTYPES[e.dtype]
    if e.start == e.end:
        return torch.empty(e.shape, dtype=dtype)
    count = (e.end - e.start) // _ITEMSIZE[e.dtype]
    return torch.frombuffer(raw, dtype=dtype, count=count, offset=e.start).reshape(e.shape)


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (contiguous CPU copies) to safetensors bytes, e.g. for tests and exports."""
    from safetensors.torch import save

    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(prepared, metadata=metadata)
