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

from peftserve.adapters.artifact import ContentHasher


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
    """python-multipart callbacks -> the form's parts, one at a time, as pieces of the body: a
    (start, end) range of the whole body (the chunks joined) or, for the rare piece the parser
    hands over from its own lookbehind buffer, the bytes themselves."""

    def __init__(self, reader: "FormReader", max_files: int, max_fields: int, max_field_bytes: int):
        self.reader = reader
        self.max_files, self.max_fields, self.max_field_bytes = max_files, max_fields, max_field_bytes
        self.parts: list[tuple[str, str | None, list]] = []  # (name, filename or None, pieces)
        self.files = self.fields = 0
        self._reset()

    def _reset(self) -> None:
        self.header_name, self.header_value, self.disposition = b"", b"", b""
        self.name: str | None = None
        self.filename: str | None = None
        self.pieces: list[tuple[int, int] | bytes] = []
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
        self.reader.part_begins(self.name, self.filename is not None)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.filename is None and self.size > self.max_field_bytes:
            raise FormError(f"field {self.name!r} exceeds {self.max_field_bytes} bytes")
        chunk = self.reader.chunk
        if data is chunk:  # from the chunk itself: a range of the whole body
            at = self.reader.chunk_start
            self.pieces.append((at + start, at + end))
        else:  # from the parser's lookbehind buffer: a copy of the piece
            self.pieces.append(bytes(data[start:end]))
        self.reader.part_data(memoryview(data)[start:end])

    def on_part_end(self) -> None:
        self.parts.append((self.name, self.filename, self.pieces))
        self.reader.part_ends(self.name, self.filename is not None)


class FormReader:
    """A multipart/form-data body parsed as it arrives: `feed` each chunk, then `finish`.

    One parser pass yields the form (file parts as views into the joined body, as
    `parse_form` always did) and, optionally, the adapter's content hash
    (adapters/artifact.ContentHasher) over the very bytes the form hands out: when the
    `hash_parts` (config, weights) file parts come in that order, each once, the weights are
    hashed while the rest of the body is still on the wire, off the upload -> first token path.
    `digest()` is that hash, or None (another order, a repeat, no such parts).
    """

    def __init__(self, content_type: str, *, max_files: int, max_fields: int, max_field_bytes: int = 1 << 20,
                 hash_parts: tuple[str, str] | None = None):
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise FormError("missing boundary in multipart/form-data")
        self.collector = _Collector(self, max_files, max_fields, max_field_bytes)
        callbacks = {name: getattr(self.collector, name) for name in (
            "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end",
            "on_headers_finished")}
        try:
            self.parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:
            raise FormError(f"invalid multipart data: {exc}") from None
        self.chunks: list[bytes] = []
        self.chunk, self.chunk_start, self.size = b"", 0, 0
        self.hash_parts = hash_parts
        self._config: bytes | None = None  # the config part, once complete (hash_parts[0])
        self._hasher: ContentHasher | None = None  # while the weights part streams in
        self._digest: str | None = None
        self._spoiled = hash_parts is None  # an order or a repeat the digest cannot stand for

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.chunks.append(chunk)
        self.chunk, self.chunk_start = chunk, self.size
        self.size += len(chunk)
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise FormError(f"invalid multipart data: {exc}") from None

    def finish(self) -> FormData:
        """The parts of the whole body, as starlette's multidict (every repeat kept: the route
        refuses them). File parts: a read-only memoryview into the body (bytes: immutable, so
        views are safe) when they arrived in one piece of it, joined bytes otherwise."""
        try:
            self.parser.finalize()
        except FormParserError as exc:
            raise FormError(f"invalid multipart data: {exc}") from None
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = [body]
        view = memoryview(body)
        items: list[tuple[str, str | FilePart]] = []
        for name, filename, pieces in self.collector.parts:
            if len(pieces) == 1 and isinstance(pieces[0], tuple):
                value = view[pieces[0][0]: pieces[0][1]]
            else:
                value = b"".join(p if isinstance(p, bytes) else view[p[0]: p[1]] for p in pieces)
            items.append((name, _decode(bytes(value)) if filename is None else FilePart(filename, value)))
        return FormData(items)

    def digest(self) -> str | None:
        return None if self._spoiled else self._digest

    # -- the content hash, from the collector's callbacks ---------------------------------
    def part_begins(self, name: str, is_file: bool) -> None:
        if self._spoiled or name not in self.hash_parts:
            return
        config_name, weights_name = self.hash_parts
        if not is_file or self._digest is not None or self._hasher is not None:
            self._spoiled = True  # a plain field of that name, or a part after the weights
        elif name == weights_name:
            if self._config is None:
                self._spoiled = True  # the weights before the config: hashed after the body, elsewhere
            else:
                self._hasher = ContentHasher(self._config)
        elif self._config is not None:
            self._spoiled = True  # a second config

    def part_data(self, piece: memoryview) -> None:
        if self._hasher is not None:
            self._hasher.update(piece)

    def part_ends(self, name: str, is_file: bool) -> None:
        if self._spoiled or name not in self.hash_parts or not is_file:
            return
        if name == self.hash_parts[0]:
            self._config = self._part_bytes(self.collector.parts[-1][2])
        elif self._hasher is not None:
            self._digest, self._hasher = self._hasher.hexdigest(), None

    def _part_bytes(self, pieces: list) -> bytes:
        """A complete part's bytes before the body is joined (the config part: small)."""
        out = []
        for piece in pieces:
            if isinstance(piece, bytes):
                out.append(piece)
                continue
            start, end, at = piece[0], piece[1], 0
            for chunk in self.chunks:
                lo, hi = max(start, at), min(end, at + len(chunk))
                if lo < hi:
                    out.append(chunk[lo - at: hi - at])
                at += len(chunk)
        return b"".join(out)


def parse_form(body: bytes, content_type: str, *, max_files: int, max_fields: int,
               max_field_bytes: int = 1 << 20) -> FormData:
    """The parts of a whole multipart/form-data `body` (`FormReader` fed with one chunk)."""
    reader = FormReader(content_type, max_files=max_files, max_fields=max_fields, max_field_bytes=max_field_bytes)
    reader.feed(body)
    return reader.finish()
