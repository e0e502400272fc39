"""multipart/form-data of `POST /adapters`, parsed in memory as the (size-bounded) body arrives.

Why not starlette's form parser: it copies every file part three times (a slice of each chunk,
the spooled file, the read back), each into fresh memory, and on the upload -> first token path
those page faults cost ~13 ms for a 7.4 MB adapter. This drives the same state machine
(python-multipart's `MultipartParser`) over the body once; a file part's bytes come back as a
read-only memoryview into the body (no copy) when the parser hands them over in one piece from
the body itself, which is the normal case, and are joined otherwise (a part split around the
parser's boundary lookbehind).

`FormParser` is fed the body chunk by chunk as it arrives (`parse_form` feeds a whole body at
once). One file field may be given a *sink* (`sink_field`, `open_sink`): that part's bytes go
to the sink as they arrive (the registry's streamed upload: into an aligned buffer, hashed and
written to disk during the transfer), and the part's value is then `sink.view()`. Other parts
are kept as views into the chunks they came in (joined at the part's end when split).

Limits as starlette applies them: at most `max_files` file parts and `max_fields` plain fields,
a plain field at most `max_field_bytes`, at most 8 headers of 4224 bytes per part (the parser's
own bounds). Every violation, and any malformed body (one cut short included), raises `FormError`
(-> 400 bad_request).
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.datastructures import FormData


class FormError(ValueError):
    pass


@dataclass
class FilePart:
    """A file part: its bytes (`data`, a memoryview into the body or joined bytes) and filename."""

    filename: str
    data: memoryview | bytes


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Collector:
    """python-multipart callbacks -> the (name, value) items of the form, one part at a time."""

    def __init__(self, max_files: int, max_fields: int, max_field_bytes: int, sink_field: str | None, open_sink):
        self.max_files, self.max_fields, self.max_field_bytes = max_files, max_fields, max_field_bytes
        self.sink_field, self.open_sink = sink_field, open_sink
        self.chunk: bytes = b""  # the chunk being parsed: data handed over from it can be viewed
        self.items: list[tuple[str, str | FilePart]] = []
        self.files = self.fields = 0
        self.sink = None  # the sink in use: only the first part of `sink_field` gets one
        self._reset()

    def _reset(self) -> None:
        self.header_name, self.header_value, self.disposition = b"", b"", b""
        self.name: str | None = None
        self.filename: str | None = None
        self.pieces: list[memoryview | bytes] = []
        self.size = 0
        self.sinking = False

    def on_part_begin(self) -> None:
        self._reset()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise FormError('a multipart part lacks the Content-Disposition "name"')
        self.name = _decode(options[b"name"])
        if b"filename" in options:
            self.files += 1
            if self.files > self.max_files:
                raise FormError(f"too many file parts (at most {self.max_files})")
            self.filename = _decode(options[b"filename"])
            if self.name == self.sink_field and self.sink is None:
                self.sink, self.sinking = self.open_sink(self.items), True
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise FormError(f"too many fields (at most {self.max_fields})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.filename is None and self.size > self.max_field_bytes:
            raise FormError(f"field {self.name!r} exceeds {self.max_field_bytes} bytes")
        if self.sinking:
            self.sink.extend(memoryview(data)[start:end])
            return
        # from the chunk itself: a view; from the parser's lookbehind buffer: a copy of the piece
        self.pieces.append(memoryview(data)[start:end] if data is self.chunk else bytes(data[start:end]))

    def on_part_end(self) -> None:
        if self.sinking:
            value = self.sink.view()
        elif len(self.pieces) == 1 and isinstance(self.pieces[0], memoryview):
            value = self.pieces[0]
        else:
            value = b"".join(self.pieces)
        if self.filename is None:
            self.items.append((self.name, _decode(bytes(value))))
        else:
            self.items.append((self.name, FilePart(self.filename, value)))


_CALLBACKS = ("on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end",
              "on_headers_finished")


class FormParser:
    """Feed a multipart/form-data body in chunks (`feed`, in order), then `finish()` -> its parts
    as starlette's multidict (every repeat kept: the route refuses them). Chunks must be
    immutable (bytes): file parts may be views into them.

    `sink_field` / `open_sink(items_so_far) -> sink`: the first file part of that field streams
    into the sink (`sink.extend(view)` per piece, `sink.view()` its value; see the module's
    docstring). An exception from the sink propagates from `feed` as it is."""

    def __init__(self, content_type: str, *, max_files: int, max_fields: int, max_field_bytes: int = 1 << 20,
                 sink_field: str | None = None, open_sink=None):
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise FormError("missing boundary in multipart/form-data")
        self._collector = _Collector(max_files, max_fields, max_field_bytes, sink_field, open_sink)
        try:
            self._parser = MultipartParser(boundary, {name: getattr(self._collector, name) for name in _CALLBACKS})
        except FormParserError as exc:
            raise FormError(f"invalid multipart data: {exc}") from None

    def feed(self, chunk: bytes) -> None:
        self._collector.chunk = chunk
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise FormError(f"invalid multipart data: {exc}") from None
        finally:
            self._collector.chunk = b""

    def finish(self) -> FormData:
        try:
            self._parser.finalize()
        except FormParserError as exc:
            raise FormError(f"invalid multipart data: {exc}") from None
        # python-multipart ends wherever the bytes do: a body cut short (a client that stopped
        # sending, a proxy's limit) would come out as a form missing its last parts, refused
        # for something it did not do (its name "missing", say)
        if self._parser.state is not MultipartState.END:
            raise FormError("invalid multipart data: the body ended before its closing boundary")
        return FormData(self._collector.items)


def parse_form(body: bytes, content_type: str, *, max_files: int, max_fields: int,
               max_field_bytes: int = 1 << 20) -> FormData:
    """The parts of a whole multipart/form-data `body` (bytes: immutable, so views into it are
    safe), as starlette's multidict (every repeat kept: the route refuses them)."""
    parser = FormParser(content_type, max_files=max_files, max_fields=max_fields, max_field_bytes=max_field_bytes)
    parser.feed(body)
    return parser.finish()
