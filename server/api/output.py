"""One engine sequence's output, accumulated from its events: the one accumulator behind both
`/generate` (a request = one sequence) and `/v1` (a request = `n` sequences, its choices)."""

from __future__ import annotations

from peftserve.server.engine.request import FinishReason


class SequenceOutput:
    def __init__(self, index: int = 0, prompt_tokens: int = 0):
        self.index, self.prompt_tokens = index, prompt_tokens  # the choice's index; its prompt length
        self.token_ids: list[int] = []
        self.parts: list[str] = []
        self.logprobs: list[tuple[int, float, list]] = []  # (token id, logprob, top), when asked for
        self.reason: FinishReason | None = None  # None until the sequence ends
        self.error: str | None = None  # internal detail: logged, never sent
        self.code = None  # ErrorCode of a failed sequence

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def failed(self) -> bool:
        return self.reason in (FinishReason.ERROR, FinishReason.ABORT)

    def add(self, ev) -> None:
        """One TokenEvent: a token (never the placeholder of a failed or aborted end), its text and
        logprobs, and at the end the finish reason with the error detail and code."""
        if ev.token_id is not None and ev.finish_reason not in (FinishReason.ERROR, FinishReason.ABORT):
            self.token_ids.append(ev.token_id)
            if ev.logprobs is not None:
                self.logprobs.append((ev.token_id, ev.logprobs[0], ev.logprobs[1]))
        if ev.text:
            self.parts.append(ev.text)
        if ev.finish_reason is not None:
            self.reason, self.error, self.code = ev.finish_reason, ev.error, ev.code
