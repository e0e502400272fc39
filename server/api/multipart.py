"""multipart/form-data of `POST /adapters`, parsed in memory from the whole (size-bounded) body.

Why not starlette's form parser: it copies every file part three times (a slice of each chunk,
the spooled file, the read back), each into fresh memory, and on the upload -> first token path
those page faults cost ~13 ms for a 7.4 MB adapter. This drives the same state machine
(python-multipart's `MultipartParser`) over the body once; a file part's bytes come back as a
read-only memoryview into the body (no copy) when the parser hands them over in one piece from
the body itself, which is the normal case, and are joined otherwise (a part split around the
parser's boundary lookbehind).

Limits as starlette applies them: at most `max_files` file parts and `max_fields` plain fields,
a plain field at most `max_field_bytes`, at most 8 headers of 4224 bytes per part (the parser's
own bounds). Every violation, and any malformed body, raises `FormError` (-> 400 bad_request).
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
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

    def __init__(self, body: bytes, max_files: int, max_fields: int, max_field_bytes: int):
        self.body, self.view = body, memoryview(body)
        self.max_files, self.max_fields, self.max_field_bytes = max_files, max_fields, max_field_bytes
        self.items: list[tuple[str, str | FilePart]] = []
        self.files = self.fields = 0
        self._reset()

    def _reset(self) -> None:
        self.header_name, self.header_value, self.disposition = b"", b"", b""
        self.name: str | None = None
        self.filename: str | None = None
        self.pieces: list[memoryview | bytes] = []
        self.size = 0

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
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise FormError(f"too many fields (at most {self.max_fields})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.filename is None and self.size > self.max_field_bytes:
            raise FormError(f"field {self.name!r} exceeds {self.max_field_bytes} bytes")
        # from the body itself: a view; from the parser's lookbehind buffer: a copy of the piece
        self.pieces.append(self.view[start:end] if data is self.body else bytes(data[start:end]))

    def on_part_end(self) -> None:
        if len(self.pieces) == 1 and isinstance(self.pieces[0], memoryview):
            value = self.pieces[0]
        else:
            value = b"".join(self.pieces)
        if self.filename is None:
            self.items.append((self.name, _decode(bytes(value))))
        else:
            self.items.append((self.name, FilePart(self.filename, value)))


def parse_form(body: bytes, content_type: str, *, max_files: int, max_fields: int,
               max_field_bytes: int = 1 << 20) -> FormData:
    """The parts of a multipart/form-data `body` (bytes: immutable, so views into it are safe), as
    starlette's multidict (every repeat kept: the route refuses them)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise FormError("missing boundary in multipart/form-data")
    collector = _Collector(body, max_files, max_fields, max_field_bytes)
    callbacks = {name: getattr(collector, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end",
        "on_headers_finished")}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise FormError(f"invalid multipart data: {exc}") from None
    return FormData(collector.items)
