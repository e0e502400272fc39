"""Strict safetensors reader: valid files round-trip; every malformed or hostile file is an
AdapterError with the right code/status, never a crash, hang or huge allocation."""

from __future__ import annotations

import json
import pickle
import random
import struct
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from peftserve.adapters.errors import AdapterError
from peftserve.adapters.safetensors_io import borrowed_safetensors, read_safetensors, write_safetensors
from peftserve.server.errors import http_status

MB = 1 << 20


READER = "owned"


@pytest.fixture(autouse=True, params=["owned", "borrowed"])
def reader(request, monkeypatch):
    """Every test runs against both readers: `read_safetensors` (owned copies) and
    `borrowed_safetensors` (views, valid inside its block): the same checks, the same result."""
    monkeypatch.setattr(sys.modules[__name__], "READER", request.param)
    return request.param


def read(data, **kw):
    kw.setdefault("max_bytes", 16 * MB)
    if READER == "owned":
        return read_safetensors(data, **kw)
    with borrowed_safetensors(data, **kw) as tensors:
        return {k: v.clone() for k, v in tensors.items()}


def raw_file(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """Hand-build a safetensors file: [u64 header length][header bytes][data]."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if header_len is None else header_len
    return struct.pack("<Q", n) + hb + data


def f32_entry(shape, start, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def expect(data, code: str, status: int = 422, **kw) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        read(data, **kw)
    assert info.value.code == code, info.value
    assert http_status(info.value) == status, info.value  # the API edge's one error table
    return info.value


# ------------------------------------------------------------------------------------------
# valid files


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip_dtypes(dtype):
    tensors = {"a": torch.randn(3, 4).to(dtype), "b.c": torch.randn(5).to(dtype),
               "empty": torch.zeros(0, 2, dtype=dtype)}
    out = read(write_safetensors(tensors, metadata={"format": "pt"}))
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        assert out[k].dtype == dtype and out[k].shape == v.shape
        assert torch.equal(out[k], v)


def test_matches_reference_library_and_memoryview_input():
    tensors = {f"t{i}": torch.randn(i + 1, 3) for i in range(5)}
    blob = write_safetensors(tensors)
    ours, ref = read(memoryview(blob)), st_load(blob)
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_result_is_independent_of_input_buffer():
    buf = bytearray(write_safetensors({"x": torch.ones(4)}))
    out = read(buf)
    buf[-16:] = b"\x00" * 16  # caller reuses / frees its buffer
    assert torch.equal(out["x"], torch.ones(4))


def test_header_padding_and_scalar_tensor_are_fine():
    data = struct.pack("<f", 2.5)
    header = json.dumps({"s": f32_entry([], 0, 4)}).encode() + b"    "  # spaces: alignment padding
    assert read(raw_file(header, data))["s"].item() == 2.5


# ------------------------------------------------------------------------------------------
# size / length field


def test_too_large_is_413():
    expect(write_safetensors({"x": torch.zeros(100)}), "adapter_too_large", 413, max_bytes=100)


@pytest.mark.parametrize("blob", [b"", b"\x01\x00", b"\x00" * 7])
def test_shorter_than_length_field(blob):
    expect(blob, "invalid_safetensors")


def test_header_length_beyond_file():
    expect(raw_file(b"{}", header_len=1000), "invalid_safetensors")


def test_header_length_u64_max_is_rejected_before_allocating():
    expect(struct.pack("<Q", (1 << 64) - 1) + b"{}", "invalid_safetensors")
    expect(struct.pack("<Q", 1 << 63) + b"{}", "invalid_safetensors")


def test_header_over_cap():
    header = {"__metadata__": {"pad": "x" * 5000}}
    err = expect(raw_file(header), "invalid_safetensors", max_header_bytes=1024)
    assert "cap" in err.message


@pytest.mark.parametrize("n", [0, 1])
def test_header_too_short(n):
    expect(raw_file(b"{}"[:n]), "invalid_safetensors")


# ------------------------------------------------------------------------------------------
# header JSON


@pytest.mark.parametrize("header", [b"not json", b"{not json}", b'{"a": ', b"[]", b" {}", b'"{}"',
                                    b'{"a": NaN}', b"{" * 5000 + b"}" * 5000])
def test_bad_json_header(header):
    expect(raw_file(header), "invalid_safetensors")


def test_invalid_utf8_header():
    expect(raw_file(b'{"\xff\xfe": 1}'), "invalid_safetensors")


def test_duplicate_tensor_keys():
    entry = json.dumps(f32_entry([1], 0, 4))
    header = ('{"x": %s, "x": %s}' % (entry, entry)).encode()
    err = expect(raw_file(header, b"\x00" * 4), "invalid_safetensors")
    assert "duplicate" in err.message


def test_duplicate_nested_keys():
    header = b'{"x": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    expect(raw_file(header, b"\x00" * 4), "invalid_safetensors")


@pytest.mark.parametrize("meta", [{"a": 1}, ["a"], "x", {"a": None}])
def test_metadata_must_be_str_to_str(meta):
    expect(raw_file({"__metadata__": meta}), "invalid_safetensors")


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [1]},  # no offsets
    {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1},
    {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]},
    {"dtype": 7, "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "FLOAT", "shape": [1], "data_offsets": [0, 4]},
    [],
])
def test_malformed_entries(entry):
    expect(raw_file({"x": entry}, b"\x00" * 4), "invalid_safetensors")


# ------------------------------------------------------------------------------------------
# offsets and sizes


@pytest.mark.parametrize("offsets,data_len", [
    ([0, 8], 4),  # end beyond the data region
    ([-4, 0], 4),  # negative
    ([4, 0], 4),  # end < start
    ([2**70, 2**70 + 4], 4),  # absurdly large
])
def test_offsets_out_of_range(offsets, data_len):
    expect(raw_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}, b"\x00" * data_len),
           "invalid_safetensors")


def test_overlapping_offsets_alias_rejected():
    header = {"a": f32_entry([2], 0, 8), "b": f32_entry([2], 4, 12)}
    err = expect(raw_file(header, b"\x00" * 12), "invalid_safetensors")
    assert "overlap" in err.message


def test_same_bytes_for_two_tensors_rejected():
    header = {"a": f32_entry([2], 0, 8), "b": f32_entry([2], 0, 8)}
    expect(raw_file(header, b"\x00" * 8), "invalid_safetensors")


def test_gap_between_tensors_rejected():
    header = {"a": f32_entry([1], 0, 4), "b": f32_entry([1], 8, 12)}
    err = expect(raw_file(header, b"\x00" * 12), "invalid_safetensors")
    assert "gap" in err.message


def test_trailing_unowned_bytes_rejected():
    expect(raw_file({"a": f32_entry([1], 0, 4)}, b"\x00" * 8), "invalid_safetensors")


def test_shape_times_dtype_must_equal_span():
    expect(raw_file({"a": f32_entry([3], 0, 8)}, b"\x00" * 8), "invalid_safetensors")
    expect(raw_file({"a": f32_entry([2], 0, 8, dtype="F16")}, b"\x00" * 8), "invalid_safetensors")


def test_overflowing_shape_rejected():
    # A 64-bit product would wrap around to 0 == span; Python ints do not, so this must fail.
    expect(raw_file({"a": f32_entry([2**62, 2**62], 0, 0)}), "invalid_safetensors")
    expect(raw_file({"a": f32_entry([2**32, 2**32, 0], 0, 4)}, b"\x00" * 4), "invalid_safetensors")


@pytest.mark.parametrize("dtype,itemsize", [("I64", 8), ("BOOL", 1), ("F64", 8), ("I8", 1), ("F8_E4M3", 1)])
def test_non_float_dtypes_refused(dtype, itemsize):
    header = {"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2 * itemsize]}}
    expect(raw_file(header, b"\x00" * (2 * itemsize)), "unsupported_dtype")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_values(bad, dtype):
    t = torch.zeros(6, dtype=dtype)
    t[3] = bad
    expect(write_safetensors({"w": t}), "non_finite")


# ------------------------------------------------------------------------------------------
# pickle / zip are never loaded


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))  # unpickling would create the file


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_bytes_are_415_and_never_unpickled(tmp_path, protocol):
    sentinel = tmp_path / "pwned"
    blob = pickle.dumps({"w": _Boom(str(sentinel))}, protocol=protocol)
    expect(blob, "invalid_safetensors", 415)
    assert not sentinel.exists()


def test_torch_zip_is_415(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"w": torch.ones(2)}, path)
    expect(path.read_bytes(), "invalid_safetensors", 415)


def test_legacy_torch_pickle_is_415(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    expect(path.read_bytes(), "invalid_safetensors", 415)


def test_pickle_prefix_with_valid_length_is_still_parsed_as_safetensors():
    # 0x80 0x02 is also a legitimate header length (640): such a file must not be misclassified.
    pad = " " * (640 - len(json.dumps({"x": f32_entry([1], 0, 4)})))
    header = (json.dumps({"x": f32_entry([1], 0, 4)}) + pad).encode()
    blob = raw_file(header, struct.pack("<f", 1.0))
    assert blob[:2] == b"\x80\x02"
    assert read(blob)["x"].item() == 1.0


# ------------------------------------------------------------------------------------------
# fuzz: random corruption of a valid file only ever yields AdapterError


def test_random_corruption_never_crashes():
    rng = random.Random(1234)
    valid = write_safetensors({"a": torch.randn(4, 4), "b": torch.randn(3).half(), "c": torch.zeros(0)})
    for _ in range(400):
        blob = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(blob))
            blob[i] = rng.randrange(256)
        if rng.random() < 0.2:
            blob = blob[: rng.randrange(len(blob))]
        try:
            out = read(bytes(blob))
        except AdapterError as exc:
            assert http_status(exc) in (413, 415, 422)
        else:
            assert all(torch.isfinite(t).all() for t in out.values())


# ------------------------------------------------------------------------------------------
# borrowed views: where they point


def _inside(t: torch.Tensor, buf) -> bool:
    start = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    return start <= t.data_ptr() < start + len(memoryview(buf).cast("B"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_borrowed_views_alias_an_aligned_buffer_and_equal_the_owned_copies(dtype):
    tensors = {"a": torch.randn(3, 4).to(dtype), "b": torch.randn(7).to(dtype)}
    data = write_safetensors(tensors)
    owned = read_safetensors(data, max_bytes=MB)
    with borrowed_safetensors(data, max_bytes=MB) as views:
        assert all(_inside(v, data) for v in views.values())  # no copy was made
        assert all(torch.equal(views[k], owned[k]) for k in tensors)
    assert not any(_inside(v, data) for v in owned.values())  # guard: owned copies really are copies


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_borrowed_views_of_a_misaligned_buffer_are_aligned_copies(shift):
    """A file part at an odd offset of a multipart body: never a misaligned float view (compiled
    loops may assume element alignment), so the region is copied once into scratch memory."""
    tensors = {"a": torch.randn(5, 3), "b": torch.randn(2, 2).to(torch.bfloat16)}
    body = bytearray(b"#" * (64 + shift) + write_safetensors(tensors) + b"--")
    data = memoryview(body)[64 + shift: len(body) - 2]
    assert np.frombuffer(data, dtype=np.uint8).ctypes.data % 4 != 0  # guard: really misaligned
    with borrowed_safetensors(data, max_bytes=MB) as views:
        assert views and all(v.data_ptr() % v.element_size() == 0 for v in views.values())
        assert not any(_inside(v, body) for v in views.values())
        assert all(torch.equal(views[k], tensors[k]) for k in tensors)


def test_borrowed_scratch_reuse_never_changes_what_an_owner_copied():
    """Two misaligned reads in a row share the scratch buffer: copies taken from the first
    block stay as they were."""
    first, second = {"w": torch.randn(64, 8)}, {"w": torch.randn(64, 8)}
    kept = []
    for tensors in (first, second):
        body = b"x" + write_safetensors(tensors)
        with borrowed_safetensors(memoryview(body)[1:], max_bytes=MB) as views:
            kept.append(views["w"].clone())
    assert torch.equal(kept[0], first["w"]) and torch.equal(kept[1], second["w"])


def test_a_header_seen_before_is_not_parsed_again_and_errors_are_never_remembered(monkeypatch):
    import peftserve.adapters.safetensors_io as sio

    sio._layout_cached.cache_clear()
    parsed = []
    real = sio._parse_entry
    monkeypatch.setattr(sio, "_parse_entry", lambda *a: parsed.append(a[0]) or real(*a))
    data = write_safetensors({"a": torch.randn(3, 4), "b": torch.randn(5)})
    first = read(data)
    assert sorted(parsed) == ["a", "b"]
    again = read(data[:8] + data[8:-4] + struct.pack("<f", 7.0))  # same header, other values
    assert sorted(parsed) == ["a", "b"]  # not parsed again ...
    assert torch.equal(again["a"], first["a"]) and again["b"][-1] == 7.0  # ... and the values are the new file's
    expect(data + b"\0" * 4, "invalid_safetensors")  # same header, a longer region: checked again (tiling)
    expect(data + b"\0" * 4, "invalid_safetensors")  # and still refused: the error was not kept
    assert parsed.count("a") >= 3
