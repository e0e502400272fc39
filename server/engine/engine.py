"""The engine step: scheduler -> runner -> model -> sampler -> per-request events.

`LLMEngine` is synchronous and single-threaded (only the engine thread touches it);
`server/engine/async_engine.py` runs it in a thread and bridges to asyncio.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Protocol

import torch

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .kv_cache import KVCache
from .logprobs import token_logprobs
from .model import PackedCausalLM
from .penalties import apply_penalties
from .request import FinishReason, Sequence, SeqStatus, TokenEvent
from .runner import ModelRunner
from .sampler import sample
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class AdapterRuntime(Protocol):
    """What the engine needs from the adapter registry (base-only: `NoAdapters`)."""

    layers: object | None  # shared adapter-layer context handed to the runner

    def reserve(self, seq: Sequence, running: list[Sequence]) -> bool: ...
    def on_admit(self, seq: Sequence, cache: KVCache) -> None: ...
    def release(self, seq: Sequence) -> None: ...


class NoAdapters:
    layers = None

    def reserve(self, seq, running):
        return seq.adapter is None

    def on_admit(self, seq, cache):
        pass

    def release(self, seq):
        pass


class EngineObserver(Protocol):
    def on_step(self, batch_size: int, num_tokens: int, seconds: float) -> None: ...
    def on_token(self, seq: Sequence, now: float) -> None: ...
    def on_finish(self, seq: Sequence, now: float) -> None: ...


def eos_ids(hf_model, tokenizer) -> set[int]:
    eos = getattr(hf_model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 KV on CPU for half-precision models: decode attention is many tiny batched
    matmuls, which torch's CPU bf16 path runs ~4x slower than float32 (measured: 4.1 vs 0.7 ms
    per layer at 32 rows x 768 positions); twice the KV memory buys a several-fold faster step."""
    if device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return model_dtype


class LLMEngine:
    def __init__(self, hf_model, tokenizer, config: EngineConfig, adapters: AdapterRuntime | None = None,
                 observer: EngineObserver | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.model = PackedCausalLM(hf_model)
        m = self.model
        self.cache = KVCache(m.num_layers, config.max_batch_size, m.kv_heads, config.max_model_len, m.head_dim,
                             cache_dtype(m.dtype, m.device), m.device)
        self.adapters = adapters or NoAdapters()
        self.runner = ModelRunner(m, self.cache, self.adapters.layers)
        self.scheduler = Scheduler(config, self.adapters.reserve)
        self.observer = observer
        self.eos = eos_ids(hf_model, tokenizer)

    # -- requests -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, seq.params.stop)
        if not seq.prompt_ids or len(seq.prompt_ids) >= self.config.max_model_len:
            # The API refuses these with a 422; direct engine users get an error event instead
            # of a step that would fail every batch-mate.
            self._finish(seq, FinishReason.ERROR, error="prompt empty or longer than max_model_len")
            return
        if seq.params.seed is not None or not seq.params.greedy:
            seed = seq.params.seed if seq.params.seed is not None else random.getrandbits(63)
            seq.generator = torch.Generator().manual_seed(seed)
        self.scheduler.add(seq)

    def abort(self, seq: Sequence, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        self._finish(seq, reason, error=error)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- one iteration --------------------------------------------------------------------
    def step(self) -> int:
        """Run one iteration; returns the number of tokens processed (0 = nothing to do)."""
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self._finish(seq, FinishReason.ABORT)
        plan, admitted = self.scheduler.schedule(self.cache.slots.num_free)
        for seq, exc in self.scheduler.rejected:
            log.error("adapter admission failed", extra={"seq": seq.seq_id, "error": repr(exc)})
            self._finish(seq, FinishReason.ERROR, error=f"adapter could not be loaded: {type(exc).__name__}")
        self.scheduler.rejected.clear()
        now = time.monotonic()
        for seq in admitted:
            seq.kv_slot = self.cache.slots.alloc()
            seq.first_scheduled = now
            self.adapters.on_admit(seq, self.cache)
        if not plan:
            return 0
        t0 = time.perf_counter()
        try:
            logits = self.runner.execute(plan)
        except Exception:  # a failed step never kills the engine; retry rows one by one
            log.exception("engine step failed; isolating the failing rows of %d", len(plan))
            plan, logits = self._execute_isolated(plan)
            if not plan:
                return 0
        samplers = []
        for seq, n in plan:
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                samplers.append(seq)
        params = [s.params for s in samplers]
        # penalties/min_tokens on a copy (only when a row asks); logprobs from the raw logits
        tokens = sample(apply_penalties(logits, samplers, sorted(self.eos)), params, [s.generator for s in samplers])
        logprobs = token_logprobs(logits, params, tokens)
        now = time.monotonic()
        for seq, tok, lp in zip(samplers, tokens, logprobs):
            self._append_token(seq, tok, now, lp)
        if self.observer:
            self.observer.on_step(len(plan), sum(n for _, n in plan), time.perf_counter() - t0)
        return sum(n for _, n in plan)

    def _execute_isolated(self, plan: list[tuple[Sequence, int]]) -> tuple[list[tuple[Sequence, int]], torch.Tensor]:
        """Run each row alone (their K/V writes are idempotent: nothing advanced yet); fail only
        the rows that fail by themselves, so batch-mates of a poisoned request survive."""
        kept, rows = [], []
        for seq, n in plan:
            try:
                out = self.runner.execute([(seq, n)])
            except Exception as exc:
                self._finish(seq, FinishReason.ERROR, error=f"generation failed: {type(exc).__name__}")
                continue
            kept.append((seq, n))
            rows.append(out)
        vocab = self.model.vocab_size
        return kept, (torch.cat(rows) if rows else torch.empty(0, vocab))

    def _append_token(self, seq: Sequence, tok: int, now: float, logprobs: tuple | None = None) -> None:
        seq.output_ids.append(tok)
        if seq.first_token_at is None:
            seq.first_token_at = now
        if self.observer:
            self.observer.on_token(seq, now)
        seq.last_token_at = now
        stopped = seq.detok.add(tok, check_stop=len(seq.output_ids) > seq.params.min_tokens)
        reason = None
        if tok in self.eos and not seq.params.ignore_eos:
            reason = FinishReason.EOS
        elif stopped:
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.context_len + 1 >= self.config.max_model_len:
            reason = FinishReason.LENGTH
        if reason is None:
            seq.on_event(TokenEvent(tok, seq.detok.take(final=False), logprobs=logprobs))
        else:
            self._finish(seq, reason, last_token=tok, logprobs=logprobs)

    def _finish(self, seq: Sequence, reason: FinishReason, last_token: int | None = None,
                error: str | None = None, logprobs: tuple | None = None) -> None:
        was_running = seq.status is SeqStatus.RUNNING
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if was_running and seq.kv_slot >= 0:
            self.cache.slots.free(seq.kv_slot)
            seq.kv_slot = -1
        self.adapters.release(seq)
        if self.observer:
            self.observer.on_finish(seq, time.monotonic())
        text = seq.detok.take(final=True) if seq.detok else ""
        seq.on_event(TokenEvent(last_token, text, finish_reason=reason, error=error, logprobs=logprobs))

    # -- synchronous convenience (tests, offline use) ------------------------------------
    def generate(self, prompts: list[list[int]], params, adapters: list | None = None) -> list[Sequence]:
        """Run prompts to completion in one continuous batch; returns the finished sequences."""
        from .request import SamplingParams

        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        seqs = [Sequence(list(p), sp, on_event=lambda ev: None, adapter=(adapters[i] if adapters else None))
                for i, (p, sp) in enumerate(zip(prompts, params))]
        for seq in seqs:
            self.add(seq)
        while any(s.status is not SeqStatus.FINISHED for s in seqs):
            self.step()
        return seqs
