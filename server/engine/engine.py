"""The engine step: scheduler -> adapter runtime -> runner -> model -> sampler -> per-request events.

`LLMEngine` is synchronous and single-threaded (only the engine thread touches it);
`server/engine/async_engine.py` runs it in a thread and bridges to asyncio.

Failure isolation: everything in a step that concerns one request — its adapter activation
(weights install, KV prefix), its forward rows, its logits (NaN/inf), its sampling, detokenisation and stop
checks — fails that request alone (FinishReason.ERROR with an `ErrorCode`), never the step for
its batch-mates. What still escapes `step()` is a bug in shared state; the supervisor in
async_engine.py then resets the engine (`reset()`) and fails the requests it held.
"""

from __future__ import annotations

import enum
import logging
import random
import time

import torch

from .adapter_runtime import AdapterRuntime, NoAdapters
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, plain_decoder, token_pieces
from .kv_cache import KVCache, KVCacheFull, kv_bytes_per_token, pool_blocks
from .logprobs import token_logprobs
from .model import PackedCausalLM
from .observer import EngineObserver, EngineSnapshot, adapter_names, device_residency
from .penalties import apply_penalties
from .request import ErrorCode, FinishReason, Sequence, SeqStatus, TokenEvent
from .runner import ModelRunner
from .sampler import SampleFailure, confirm_nonfinite, sample_step, screen_rows
from .scheduler import Scheduler
from .static_decode import DecodeMode, StaticDecode, resolve_mode

log = logging.getLogger(__name__)


def eos_ids(hf_model, tokenizer) -> set[int]:
    eos = getattr(hf_model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


class EmitTiming(str, enum.Enum):
    """When a step's tokens become text and events.

    IMMEDIATE: at the end of the step that sampled them. OVERLAPPED: a token that does not end
    its request (by EOS or length) is detokenized, stop-checked and handed to its consumer in the
    next step, after that step's forward has been launched, so on an asynchronous device this
    host work runs while the device computes (~6 us a row on the engine thread: 1.6 ms of a
    256-row step). A request whose text reaches a stop string then has one more row computed
    in that step, which is dropped; tokens, texts and events are the same as IMMEDIATE's."""

    IMMEDIATE = "immediate"
    OVERLAPPED = "overlapped"


def resolve_emit_timing(requested: str, device: torch.device) -> EmitTiming:
    """"auto" = OVERLAPPED where the device runs steps asynchronously (CUDA), else IMMEDIATE:
    on CPU the forward runs on this thread, so deferring only delays the events."""
    if requested == "auto":
        return EmitTiming.OVERLAPPED if device.type == "cuda" else EmitTiming.IMMEDIATE
    return EmitTiming(requested)


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
        self._decode = plain_decoder(tokenizer)  # the detokenizers' decode, chosen once
        self._pieces = token_pieces(tokenizer)  # and the texts single tokens append (shared)
        self.model = PackedCausalLM(hf_model)
        m = self.model
        dtype = cache_dtype(m.dtype, m.device)
        blocks = pool_blocks(config.kv_cache_bytes, config.max_batch_size, config.max_model_len,
                             config.kv_block_size, kv_bytes_per_token(m.num_layers, m.kv_heads, m.head_dim, dtype))
        self.cache = KVCache(m.num_layers, blocks, config.kv_block_size, m.kv_heads, m.head_dim, dtype, m.device)
        log.info("KV cache", extra={"blocks": blocks - 1, "block_size": config.kv_block_size,
                                    "tokens": self.cache.capacity_tokens, "bytes": self.cache.nbytes})
        self.adapters = adapters or NoAdapters()
        self.runner = ModelRunner(m, self.cache, self.adapters, self._static_decode(config))
        self.scheduler = self._new_scheduler()
        self.observer = observer
        self.eos = eos_ids(hf_model, tokenizer)
        self.preemptions = 0
        self.emit_timing = resolve_emit_timing(config.emit_timing, m.device)
        self._unemitted: list[tuple[Sequence, int, tuple | None]] = []  # OVERLAPPED: (seq, token, logprobs)

    def _static_decode(self, config: EngineConfig) -> StaticDecode | None:
        """The fixed-shape decode path for the configured mode (graphs captured here, logged)."""
        mode = resolve_mode(config.decode_mode, self.model.device)
        if mode is DecodeMode.DYNAMIC:
            return None
        self.adapters.enable_gather(config.max_lora_rank, config.max_bottleneck_size)
        static = StaticDecode(self.model, self.cache, self.adapters, config.max_batch_size, config.max_model_len, mode)
        if mode is DecodeMode.GRAPH:
            try:
                static.capture()
            except Exception:  # a model whose forward cannot be captured still serves, eagerly
                log.exception("CUDA graph capture failed; decode steps run eagerly on the fixed buffers")
                static.graphs.clear()
                static.mode = DecodeMode.STATIC
        return static

    # -- requests -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not seq.prompt_ids or len(seq.prompt_ids) >= self.config.max_model_len:
            # The API refuses these with a 422; direct engine users get an error event instead
            # of a step that would fail every batch-mate.
            self.fail(seq, ErrorCode.INVALID_REQUEST, "prompt empty or longer than max_model_len")
            return
        try:
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, seq.params.stop, self._decode,
                                               self._pieces)
            if seq.params.seed is not None or not seq.params.greedy:
                seed = seq.params.seed if seq.params.seed is not None else random.getrandbits(63)
                seq.generator = torch.Generator().manual_seed(seed)
        except Exception as exc:
            self.fail(seq, ErrorCode.INTERNAL_ERROR, f"request setup failed: {exc!r}")
            return
        self.scheduler.add(seq)

    def abort(self, seq: Sequence, reason: FinishReason = FinishReason.ABORT, error: str | None = None,
              code: ErrorCode | None = None) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        if self._unemitted:
            self._emit_deferred(only=seq)
            if seq.status is SeqStatus.FINISHED:  # its last text reached a stop string
                return
        self._finish(seq, reason, error=error, code=code)

    def fail(self, seq: Sequence, code: ErrorCode, detail: str) -> None:
        """End one request with FinishReason.ERROR; the detail goes to the log, the code to the client."""
        if seq.status is SeqStatus.FINISHED:
            return
        log.error("request failed in the engine", extra={"seq": seq.seq_id, "code": code.value, "error": detail})
        self._finish(seq, FinishReason.ERROR, error=detail, code=code)

    def reset(self) -> list[Sequence]:
        """Forget every request and all per-request state; return the requests it held.

        For the supervisor after `step()` raised out of the loop: the scheduler, the KV block
        tables and the adapter pins may be half-updated, so they are rebuilt rather than
        unwound: every KV block is free again (prefix blocks too; the runtime forgets its
        prefixes). The model, the KV tensors (blocks are zeroed when handed out again) and the
        adapter registry are kept. The caller fails the returned
        requests; nothing here calls back into them.
        """
        held = list(self.scheduler.running) + list(self.scheduler.waiting)
        self._unemitted = []
        for seq in held:
            seq.status = SeqStatus.FINISHED
            seq.kv_blocks, seq.kv_prefix_blocks = [], []
        self.cache.reset()
        self.adapters.reset()
        self.scheduler = self._new_scheduler()
        return held

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.config, self.cache, self.adapters.reserve, self.adapters.reclaim_kv)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def snapshot(self, steps: int = 0, resets: int = 0) -> EngineSnapshot:
        """The state other threads may read, as of now. Engine thread only (it walks the
        queues and the adapter tier); `AsyncEngine` publishes the result (observer.py)."""
        sched, pool = self.scheduler, self.cache.pool
        return EngineSnapshot(
            running=len(sched.running), waiting=len(sched.waiting),
            kv_blocks_free=pool.num_free, kv_blocks_total=pool.capacity, kv_block_size=self.cache.block_size,
            preemptions=self.preemptions,
            running_adapters=adapter_names(sched.running), waiting_adapters=adapter_names(sched.waiting),
            max_adapters_per_batch=self.config.max_adapters_per_batch,
            steps=steps, resets=resets, **device_residency(self.adapters.residency()))

    # -- one iteration --------------------------------------------------------------------
    def step(self) -> int:
        """Run one iteration; returns the number of tokens processed (0 = nothing to do)."""
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self.abort(seq)
        plan, admitted, preempted = self.scheduler.schedule()
        for seq in preempted:
            self._on_preempted(seq)
        self._activate(admitted)
        plan = [(seq, n) for seq, n in plan if seq.status is SeqStatus.RUNNING]
        if not plan:
            self._emit_deferred()
            return 0
        t0 = time.perf_counter()
        try:
            logits = self.runner.execute(plan)  # on a GPU: launched, still running
        except Exception:  # a failed step never kills the engine; retry rows one by one
            log.exception("engine step failed; isolating the failing rows of %d", len(plan))
            plan, logits = self._execute_isolated(plan)
        self._emit_deferred()  # the previous step's text and events, while the device computes
        if not plan:
            return 0
        samplers = []
        for seq, n in plan:
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                samplers.append(seq)
        samplers, logits = _drop_finished(samplers, logits)  # stopped by the text just emitted
        self._sample_and_emit(samplers, logits)
        if self.observer:
            try:
                self.observer.on_step(len(plan), sum(n for _, n in plan), time.perf_counter() - t0)
            except Exception:  # metrics are no request's fault: log, and the engine goes on
                log.exception("engine observer failed at the end of a step")
        return sum(n for _, n in plan)

    def _on_preempted(self, seq: Sequence) -> None:
        """The scheduler took its KV blocks back (and its prefix and slot references): its
        adapter pins go too, re-reserved on readmission."""
        self.preemptions += 1
        log.info("request preempted: KV cache full", extra={"seq": seq.seq_id, "tokens": seq.num_tokens})
        self.adapters.release(seq)

    def _activate(self, admitted: list[Sequence]) -> None:
        """Let the adapter runtime install weights and attach KV prefixes for the newly admitted
        sequences (the scheduler gave them their blocks); a sequence whose activation fails is
        failed alone, or waits again when it only found the KV pool full."""
        now = time.monotonic()
        for seq in admitted:
            if seq.first_scheduled is None:
                seq.first_scheduled = now
        try:
            failures = self.adapters.activate(admitted, self.runner)
        except Exception as exc:  # a bug in the runtime: fail the adapter rows, keep the base ones
            failures = [(seq, exc) for seq in admitted if seq.adapter is not None]
        for seq, exc in failures:
            if isinstance(exc, KVCacheFull):  # no room for its prefix now: not its fault
                self.scheduler.requeue(seq)
                continue
            self.fail(seq, ErrorCode.ADAPTER_UNAVAILABLE, f"adapter activation failed: {exc!r}")

    def _sample_and_emit(self, samplers: list[Sequence], logits: torch.Tensor) -> None:
        """logits: [R, V], one row per sampling sequence. Rows with NaN/inf are failed, not
        emitted: the screen runs on the device and its flags come back with the sampled ids in
        the step's one device->host copy; only flagged rows are checked element-wise."""
        params = [s.params for s in samplers]
        screened = screen_rows(logits)  # [R] bool, on the device
        # penalties/min_tokens on a copy (only when a row asks); logprobs from the raw logits
        tokens, flagged = sample_step(apply_penalties(logits, samplers, sorted(self.eos)), params,
                                      [s.generator for s in samplers], screened)
        for row in confirm_nonfinite(logits, [r for r, f in enumerate(flagged) if f]):
            self.fail(samplers[row], ErrorCode.NUMERICAL_ERROR, "non-finite logits (NaN/inf)")
        drawn = [0 if isinstance(t, SampleFailure) else t for t in tokens]  # failed rows: placeholder id
        logprobs = token_logprobs(logits, params, drawn)
        now = time.monotonic()
        for seq, tok, lp in zip(samplers, tokens, logprobs):
            if seq.status is SeqStatus.FINISHED:  # failed above: its token is never used
                continue
            if isinstance(tok, SampleFailure):
                self.fail(seq, tok.code, tok.detail)
                continue
            try:
                self._append_token(seq, tok, now, lp)
            except Exception as exc:  # detokeniser, stop check, observer: this row only
                self.fail(seq, ErrorCode.GENERATION_FAILED, f"token {tok} could not be emitted: {exc!r}")

    def _emit_deferred(self, only: Sequence | None = None) -> None:
        """OVERLAPPED: text and events of the last step's tokens that did not end their request
        (`only`: that request's, before it is aborted, so its last text still goes out)."""
        if only is None:
            pending, self._unemitted = self._unemitted, []
        else:
            pending = [item for item in self._unemitted if item[0] is only]
            self._unemitted = [item for item in self._unemitted if item[0] is not only]
        for seq, tok, lp in pending:
            if seq.status is SeqStatus.FINISHED:  # aborted or failed since
                continue
            try:
                self._emit(seq, tok, lp, None)
            except Exception as exc:  # detokeniser, stop check: this row only
                self.fail(seq, ErrorCode.GENERATION_FAILED, f"token {tok} could not be emitted: {exc!r}")

    def _execute_isolated(self, plan: list[tuple[Sequence, int]]) -> tuple[list[tuple[Sequence, int]], torch.Tensor]:
        """Run each row alone (their K/V writes are idempotent: nothing advanced yet); fail only
        the rows that fail by themselves, so batch-mates of a poisoned request survive."""
        kept, rows = [], []
        for seq, n in plan:
            try:
                out = self.runner.execute([(seq, n)])
            except Exception as exc:
                self.fail(seq, ErrorCode.GENERATION_FAILED, f"forward pass failed: {exc!r}")
                continue
            kept.append((seq, n))
            rows.append(out)
        vocab = self.model.vocab_size
        return kept, (torch.cat(rows) if rows else torch.empty(0, vocab))

    def _append_token(self, seq: Sequence, tok: int, now: float, logprobs: tuple | None = None) -> None:
        """Accept a sampled token: the request's ids and timings now; its text and event now
        (IMMEDIATE, or when the token ends the request by EOS or length) or in the next step
        (OVERLAPPED, `_emit_deferred`)."""
        seq.output_ids.append(tok)
        if seq.first_token_at is None:
            seq.first_token_at = now
        if self.observer:
            self.observer.on_token(seq, now)
        seq.last_token_at = now
        reason = None
        if tok in self.eos and not seq.params.ignore_eos:
            reason = FinishReason.EOS
        elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.context_len + 1 >= self.config.max_model_len:
            reason = FinishReason.LENGTH
        if reason is None and self.emit_timing is EmitTiming.OVERLAPPED:
            self._unemitted.append((seq, tok, logprobs))
        else:
            self._emit(seq, tok, logprobs, reason)

    def _emit(self, seq: Sequence, tok: int, logprobs: tuple | None, reason: FinishReason | None) -> None:
        """The token's text (detokenizer), the stop check, then its event or the request's end.
        A stop string ends the request unless EOS already did (EOS first, then stop, then length)."""
        stopped = seq.detok.add(tok, check_stop=len(seq.output_ids) > seq.params.min_tokens)
        if stopped and reason is not FinishReason.EOS:
            reason = FinishReason.STOP
        if reason is None:
            seq.on_event(TokenEvent(tok, seq.detok.take(final=False), logprobs=logprobs))
        else:
            self._finish(seq, reason, last_token=tok, logprobs=logprobs)

    def _finish(self, seq: Sequence, reason: FinishReason, last_token: int | None = None,
                error: str | None = None, code: ErrorCode | None = None, logprobs: tuple | None = None) -> None:
        """Free the request's resources and deliver its last event. Exception-safe: whatever
        fails on the way (adapter release, metrics, final text) is logged, and the event is
        still delivered, so no consumer waits forever."""
        was_running = seq.status is SeqStatus.RUNNING
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if was_running:
            self.cache.free(seq.kv_blocks)
        seq.kv_blocks, seq.kv_prefix_blocks = [], []
        text = ""
        try:
            self.adapters.release(seq)
            if self.observer:
                self.observer.on_finish(seq, time.monotonic())
            if seq.detok and reason is not FinishReason.ERROR:
                text = seq.detok.take(final=True)
        except Exception:
            log.exception("finishing a request failed", extra={"seq": seq.seq_id})
        if reason is FinishReason.ERROR and code is None:
            code = ErrorCode.INTERNAL_ERROR
        seq.on_event(TokenEvent(last_token, text, finish_reason=reason, error=error, code=code, logprobs=logprobs))

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


def _drop_finished(samplers: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
    """The sampling rows still running, with their logits rows [R', V] (all of them: as given)."""
    keep = [i for i, seq in enumerate(samplers) if seq.status is not SeqStatus.FINISHED]
    if len(keep) == len(samplers):
        return samplers, logits
    return [samplers[i] for i in keep], logits[keep]
