"""Incremental detokenisation and stop-string detection.

Decoding token by token breaks multi-byte characters and BPE merges, so we decode a short
window of recent tokens and emit only the text that is new and complete (the vLLM approach):
`prefix_offset..read_offset` is what was already emitted, `..end` is what is new.

Most tokens need neither decode: with a byte-level decoder (GPT-2, Llama 3, Qwen, SmolLM2) a token
whose bytes are valid UTF-8 on their own appends exactly its own text (`token_pieces`).
"""

from __future__ import annotations

from collections.abc import Callable


def plain_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`.

    For transformers' tokenizers.Tokenizer-backed class, whose decode with those arguments is
    exactly its Rust backend's `decode(ids, skip_special_tokens=True)`, the backend is called
    directly: ~1.8 us a call instead of ~5.3 through transformers' layers, and a generated token
    without a piece (`token_pieces`) takes two calls on the engine thread. Any other tokenizer, or
    a subclass overriding how it decodes, goes through
    `decode` itself. tests/test_detokenizer_sampler.py holds the two equal on random ids."""
    backend = _backend(tokenizer)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _backend(tokenizer):
    """The tokenizers.Tokenizer that `tokenizer.decode(ids, skip_special_tokens=True,
    clean_up_tokenization_spaces=False)` comes down to exactly, or None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the general path
        return None
    cls = type(tokenizer)
    if (isinstance(tokenizer, TokenizersBackend) and isinstance(backend, Tokenizer)
            and cls.decode is TokenizersBackend.decode and cls._decode is TokenizersBackend._decode):
        return backend
    return None


class _Pieces(dict):
    """token id -> the text it appends, or None where the token needs the decoding path; each
    id worked out on first sight (a dict hit afterwards: ~50 ns, where two decodes cost ~1.5 us)."""

    def __init__(self, backend, added: frozenset[int]):
        super().__init__()
        self._backend, self._added = backend, added
        self._vocab = backend.get_vocab_size(with_added_tokens=False)

    def __missing__(self, tok: int) -> str | None:
        text = None
        if tok not in self._added and 0 <= tok < self._vocab:
            text = self._backend.decode([tok], skip_special_tokens=True)
            if not text or "\ufffd" in text:
                text = None  # no text, or bytes that are not UTF-8 alone (part of a character)
        self[tok] = text
        return text


def token_pieces(tokenizer) -> dict[int, str | None] | None:
    """For a tokenizer whose `plain_decoder` is its Rust backend and whose decoder is exactly
    byte-level: a mapping token id -> the text that token appends to any window, or None.

    Why it is exact: a byte-level decoder maps every token to its bytes, joins them and decodes
    the whole once, replacing each invalid sequence with U+FFFD (`String::from_utf8_lossy`, which
    replaces maximal invalid subparts). If a token's bytes B are valid UTF-8 alone, B starts with
    no continuation byte, so nothing before it can extend into it and nothing in it depends on
    what came before: decode(window + [tok]) == decode(window) + decode([tok]) for every window.
    Tokens whose own decode is empty or holds U+FFFD (a byte of a character split over tokens,
    a special token) and added tokens (kept apart from the byte-level pass) get None: they go
    through the two decodes. tests/test_detokenizer_sampler.py holds both paths' pieces equal on
    random streams over the whole vocabulary."""
    backend = _backend(tokenizer)
    if backend is None:
        return None
    from tokenizers import decoders  # importable: _backend found a tokenizers.Tokenizer

    if type(backend.decoder) is not decoders.ByteLevel:
        return None
    return _Pieces(backend, frozenset(backend.get_added_tokens_decoder()))


class IncrementalDetokenizer:
    """One request's text, token by token. `add` decodes and checks stop strings; `take` hands
    out what is safe to show. Only the text not yet handed out is kept (`pending`): a stop
    string is looked for where it could end in the new text (as vLLM), and while running the
    last `max_stop - 1` characters are held back, so the part of a stop that is old text is
    always still pending, and the work per token does not grow with the text."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = (),
                 decode: Callable[[list[int]], str] | None = None, pieces: dict[int, str | None] | None = None):
        self._decode = decode or plain_decoder(tokenizer)  # engines pass theirs: built once
        self._pieces = pieces  # token_pieces(tokenizer), built once by the engine; None: always decode
        self.ids: list[int] = list(prompt_ids[-6:])  # a little context for leading-space merges
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.pending = ""  # decoded text not yet handed out by `take`
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that could begin a stop string

    def add(self, token_id: int, check_stop: bool = True) -> bool:
        """Append one token; return True when a stop string appeared (text is cut before it).
        `check_stop=False` (before min_tokens, as vLLM) only appends; a stop string that ended
        in text added so is never matched later."""
        ids = self.ids
        ids.append(token_id)
        # A known piece is what `full[len(prefix):]` below would be, when nothing is pending
        # (read_offset at the token before): `full` is then `prefix` + the piece.
        new = self._pieces[token_id] if self._pieces is not None and self.read_offset == len(ids) - 1 else None
        if new is None:
            prefix = self._decode(ids[self.prefix_offset:self.read_offset])
            full = self._decode(ids[self.prefix_offset:])
            if full.endswith("\ufffd") or len(full) <= len(prefix):
                return False  # incomplete UTF-8 sequence or a special token: wait for more
            new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        old = self.pending
        self.pending = old + new
        if not self.stop or not check_stop:
            return False
        # the first stop that ends in the new text: it may begin up to len(s) - 1 chars back
        hits = [i for s in self.stop if (i := self.pending.find(s, max(0, len(old) - len(s) + 1))) != -1]
        if hits:
            self.pending = self.pending[:min(hits)]
        return bool(hits)

    def take(self, final: bool) -> str:
        """Text not yet handed out. While running, hold back what could still begin a stop string."""
        pending = self.pending
        cut = len(pending) if final else len(pending) - self.hold
        if cut <= 0:
            return ""
        self.pending = pending[cut:]
        return pending[:cut]
