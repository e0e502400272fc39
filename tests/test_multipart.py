"""server/api/multipart.py: the in-memory form parser of POST /adapters.

Bodies are encoded by httpx (what clients send); each file part must come back byte-exact, as a
view into the body when it arrived in one piece (the point of the module), and every limit or
malformation must raise FormError (-> 400), never return a half-parsed form silently."""

from __future__ import annotations

import random

import httpx
import pytest

from peftserve.server.api.multipart import FilePart, FormError, parse_form


def encode(data: dict | None = None, files: dict | None = None) -> tuple[bytes, str]:
    req = httpx.Request("POST", "http://x/adapters", data=data, files=files)
    return req.read(), req.headers["content-type"]


def test_file_parts_are_views_into_the_body_and_fields_are_text():
    weights = random.Random(0).randbytes(3 << 20)
    body, ctype = encode({"name": "my-adapter", "replace": "true"},
                         {"adapter_config": ("adapter_config.json", b'{"r": 8}'),
                          "adapter_model": ("adapter_model.safetensors", weights)})
    form = parse_form(body, ctype, max_files=4, max_fields=4)
    assert form.get("name") == "my-adapter" and form.get("replace") == "true"
    model = form.get("adapter_model")
    assert isinstance(model, FilePart) and model.filename == "adapter_model.safetensors"
    assert isinstance(model.data, memoryview) and model.data.obj is body  # no copy
    assert bytes(model.data) == weights
    assert bytes(form.get("adapter_config").data) == b'{"r": 8}'
    assert form.keys() == {"name", "replace", "adapter_config", "adapter_model"}


@pytest.mark.parametrize("seed", range(20))
def test_contents_that_look_like_boundaries_come_back_exact(seed):
    """CR, LF and '--' runs inside a part make the parser hold bytes back (its lookbehind): the
    part may then arrive in pieces, which are joined; the bytes must be exactly the original."""
    rng = random.Random(seed)
    alphabet = [b"\r", b"\n", b"-", b"--", b"\r\n--", b"\r\n-", b"x", bytes([rng.randrange(256)])]
    content = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 5000)))
    body, ctype = encode({"name": "a"}, {"adapter_model": ("m.safetensors", content),
                                         "adapter_config": ("c.json", content[::-1])})
    form = parse_form(body, ctype, max_files=4, max_fields=4)
    assert bytes(form.get("adapter_model").data) == content
    assert bytes(form.get("adapter_config").data) == content[::-1]


def test_repeated_parts_are_all_kept_for_the_ambiguity_check():
    body, ctype = encode({"name": ["a", "b"]}, {"f": ("f.bin", b"x")})
    assert parse_form(body, ctype, max_files=4, max_fields=4).getlist("name") == ["a", "b"]


@pytest.mark.parametrize("case", ["files", "fields", "field_size", "no_boundary", "no_name"])
def test_limits_and_malformed_bodies_raise(case):
    files = {f"f{i}": (f"f{i}.bin", b"x") for i in range(3)}
    if case == "files":
        body, ctype = encode(None, files)
        kw = {"max_files": 2, "max_fields": 4}
    elif case == "fields":
        body, ctype = encode({f"k{i}": "v" for i in range(3)}, {"f": ("f.bin", b"x")})
        kw = {"max_files": 4, "max_fields": 2}
    elif case == "field_size":
        body, ctype = encode({"name": "n" * 2000}, {"f": ("f.bin", b"x")})
        kw = {"max_files": 4, "max_fields": 4, "max_field_bytes": 1000}
    elif case == "no_boundary":
        body, ctype = encode({"name": "n"}, {"f": ("f.bin", b"x")})
        ctype, kw = "multipart/form-data", {"max_files": 4, "max_fields": 4}
    elif case == "no_name":
        ctype = "multipart/form-data; boundary=XX"
        body = b'--XX\r\nContent-Disposition: form-data; filename="a"\r\n\r\ndata\r\n--XX--\r\n'
        kw = {"max_files": 4, "max_fields": 4}
    with pytest.raises(FormError):
        parse_form(body, ctype, **kw)


def test_a_body_cut_short_anywhere_is_refused():
    """A body that ends before its closing boundary is malformed, wherever it was cut (inside a
    part, between parts, inside the closing delimiter): refused, never a form missing its last
    parts (the route would then blame the client for a field it did send)."""
    body, ctype = encode({"name": "a"}, {"adapter_model": ("m.safetensors", b"w" * 5000)})
    assert body.endswith(b"--\r\n")
    cuts = [*range(0, 200), *range(200, len(body) - 60, 97), *range(len(body) - 60, len(body) - 2)]
    for cut in cuts:
        with pytest.raises(FormError, match="closing boundary|invalid multipart"):
            parse_form(body[:cut], ctype, max_files=4, max_fields=4)
    # complete: with or without the final CRLF, and with an epilogue after it (RFC 2046)
    for whole in (body, body[:-2], body + b"epilogue"):
        form = parse_form(whole, ctype, max_files=4, max_fields=4)
        assert form["name"] == "a" and bytes(form["adapter_model"].data) == b"w" * 5000


class _Sink:
    def __init__(self, items_before):
        self.items_before = [k for k, _ in items_before]
        self.data = bytearray()

    def extend(self, piece: memoryview) -> None:
        self.data += piece

    def view(self) -> memoryview:
        return memoryview(bytes(self.data))


@pytest.mark.parametrize("seed", range(12))
def test_fed_in_any_chunks_the_form_is_the_same_and_the_sink_gets_its_part_exactly(seed):
    """What the route does with a declared length: chunks as they arrive, the weights part into
    a sink. Chunk cuts fall anywhere (inside headers, boundaries, CRLF runs)."""
    from peftserve.server.api.multipart import FormParser

    rng = random.Random(100 + seed)
    alphabet = [b"\r", b"\n", b"--", b"\r\n--", b"x" * 50, bytes([rng.randrange(256)])]
    weights = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 3000)))
    config = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
    parts = [("adapter_config", ("c.json", config)), ("adapter_model", ("m.safetensors", weights))]
    if seed % 2:
        parts.reverse()
    body, ctype = encode({"name": "a"}, dict(parts))
    sinks = []
    parser = FormParser(ctype, max_files=4, max_fields=4, sink_field="adapter_model",
                        open_sink=lambda items: sinks.append(_Sink(items)) or sinks[-1])
    i = 0
    while i < len(body):
        n = rng.choice([1, 2, 3, 17, 64, 1000])
        parser.feed(body[i:i + n])
        i += n
    form = parser.finish()
    whole = parse_form(body, ctype, max_files=4, max_fields=4)
    assert len(sinks) == 1 and bytes(sinks[0].data) == weights
    assert sinks[0].items_before == (["name", "adapter_config"] if seed % 2 == 0 else ["name"])
    assert [(k, bytes(v.data) if isinstance(v, FilePart) else v) for k, v in form.multi_items()] == \
        [(k, bytes(v.data) if isinstance(v, FilePart) else v) for k, v in whole.multi_items()]


def test_only_the_first_part_of_the_sink_field_streams():
    from peftserve.server.api.multipart import FormParser

    body, ctype = encode(None, [("adapter_model", ("a", b"first")), ("adapter_model", ("b", b"second"))])
    sinks = []
    parser = FormParser(ctype, max_files=4, max_fields=4, sink_field="adapter_model",
                        open_sink=lambda items: sinks.append(_Sink(items)) or sinks[-1])
    parser.feed(body)
    form = parser.finish()
    assert len(sinks) == 1 and bytes(sinks[0].data) == b"first"
    assert [bytes(p.data) for p in form.getlist("adapter_model")] == [b"first", b"second"]
