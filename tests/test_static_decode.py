"""Fixed-shape decode steps (server/engine/static_decode.py) against the dynamic step and PEFT.

The fixed path is what a CUDA graph replays; on CPU it runs the same code eagerly
(`decode_mode="static"`). Its tokens must be the dynamic path's — greedy and seeded sampling,
padded batch buckets, LoRAs gathered from fixed stacks, slots reused by other adapters — and a
step it cannot serve (a LoRA above `max_lora_rank`) or that fails on it runs dynamically.
"""

from __future__ import annotations

import collections
import random
import types

import pytest
import torch

from peftserve.server.build import build_engine
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.request import SamplingParams, Sequence
from peftserve.server.engine.kv_cache import blocks_for
from peftserve.server.engine.static_decode import DecodeMode, StaticDecode, bucket_for, buckets, resolve_mode
from tests.test_lora_parity import NEW, StubTokenizer, _prompts, lora_dirs, reference  # noqa: F401  (fixtures)
from tests.tiny import tiny_llama

SMALL = ["r4-qv", "r8-mlp", "r2-all", "layer1"]  # ranks <= 8: all in the stacks at max_lora_rank=8


def _serving(tmp_path, lora_dirs, mode: str, slots=8, device="cpu", **kw):  # noqa: F811
    cfg = EngineConfig(max_batch_size=16, max_model_len=128, max_num_batched_tokens=64, max_adapters_per_batch=slots,
                       kv_block_size=8, decode_mode=mode, max_lora_rank=8, device=device, **kw)
    serving = build_engine(tiny_llama(0).to(device), StubTokenizer(), cfg, store=tmp_path / f"store-{mode}")
    for name, d in lora_dirs.items():
        serving.registry.import_dir(d, name)
    return serving


def _jobs():
    """(adapter | None, prompt index, sampling params): greedy and seeded sampled rows, 13 in all
    (a padded bucket of 16 while all run, smaller odd sizes as they finish)."""
    names = SMALL + [None]
    jobs = []
    for k in range(13):
        sampled = k % 3 == 1
        params = SamplingParams(max_new_tokens=NEW - (k % 4), ignore_eos=True, temperature=0.9 if sampled else 0.0,
                                top_p=0.9 if sampled else 1.0, top_k=5 if sampled else 0,
                                seed=1000 + k if sampled else None)
        jobs.append((names[k % len(names)], k % 6, params))
    return jobs


def _run(serving, jobs):
    prompts = _prompts()
    handles = [serving.registry.resolve(a) if a else None for a, _, _ in jobs]
    seqs = serving.engine.generate([prompts[i] for _, i, _ in jobs], [p for _, _, p in jobs], adapters=handles)
    return [s.output_ids for s in seqs]


MIRROR = ("ids", "positions", "write_blocks", "write_offsets", "adapter_slots", "widths", "table", "counts")


def check_every_fill(monkeypatch, static) -> collections.Counter:
    """From now on, every fill of `static` is checked against the reference: the same plan
    written fresh, every row from its sequence (`_rows = None`: nothing kept from the last
    fill). The buffers' first B rows must be equal, whole tables included. -> counts of what the
    fills did (rows advanced in place, fills that moved rows, blocks opened), so a test can
    show the persistent path ran and not only the fresh one."""
    seen: collections.Counter = collections.Counter()
    fill, advance = static.fill, static._advance

    def counted_advance(rows, src, seqs, own):
        seen["advanced"] += len(rows)
        seen["moved"] += rows != src
        seen["opened"] += sum(own[i] % static.cache.block_size == 0 for i in rows)
        return advance(rows, src, seqs, own)

    def checked(plan, bucket):
        fill(plan, bucket)
        b = bucket[0]
        got = [t[:b].clone() for t in static._h]
        widths, table, counts = got[5:]
        past = torch.arange(table.shape[1])[None, :] >= widths[:, None]  # [b, NBmax]: past each row's width
        if table[past].any() or counts[past].any():  # must be null entries with no keys, as far as the buffer goes
            seen["mismatch past the widths"] += 1
        pad = slice(len(plan), b)  # padding rows: token 0 at position 0 into the null block, one key there
        if (any(col[pad].any() for col in got[:5]) or (widths[pad] != 1).any()
                or (counts[pad, 0] != 1).any() or counts[pad, 1:].any()):
            seen["mismatch padding"] += 1
        rows, dirty = static._rows, static._table_dirty
        static._rows = None
        fill(plan, bucket)
        for name, g, want in zip(MIRROR, got, static._h):
            if not torch.equal(g, want[:b]):  # counted, not raised: the runner would retry the step dynamically
                seen[f"mismatch {name}"] += 1
            want[:b] = g  # back to the persistent fill's state, so what it got wrong is not mended for it
        static._rows, static._table_dirty = rows, dirty
        seen["fills"] += 1
        seen["rows"] += len(plan)

    monkeypatch.setattr(static, "_advance", counted_advance)
    monkeypatch.setattr(static, "fill", checked)
    return seen


class _Batches:
    """Random continuous batching for the fixed buffers alone (no model): rows finish (short and
    long lives), join (own position 0-40, a KV prefix of 0-2 blocks ending anywhere in its last
    block), decode one token on (a fresh block when it opens one; no joins every other 40 steps, so
    tables grow past any width a fresh row brought), and now and then skip a step
    (a token computed elsewhere, like after a dynamic step) or come back one token on in another
    block list (preempted, recomputed). Plans come
    shuffled or sorted by slot, the batch bucket sometimes above the smallest that fits."""

    def __init__(self, rng: random.Random, static: StaticDecode, bs: int, limit: int):
        self.rng, self.static, self.bs, self.limit = rng, static, bs, limit
        self.rows: list[Sequence] = []
        self.finish_rate: dict[int, float] = {}
        self.next_block, self.steps = 1, 0

    def blocks(self, n: int) -> list[int]:
        self.next_block += n
        return list(range(self.next_block - n, self.next_block))

    def join(self) -> Sequence:
        rng, bs = self.rng, self.bs
        seq = Sequence([rng.randrange(1000) for _ in range(rng.randint(1, 30))], SamplingParams(), on_event=None)
        seq.output_ids = [rng.randrange(1000) for _ in range(rng.randint(0, 10))]
        seq.adapter_slot = rng.randrange(4)
        self.finish_rate[seq.seq_id] = rng.choice((0.3, 0.1, 0.01))  # per step: short and long lives
        npb = rng.choice((0, 0, 1, 2))
        seq.kv_prefix_blocks = self.blocks(npb)
        seq.kv_prefix_len = rng.randint((npb - 1) * bs + 1, npb * bs) if npb else 0
        seq.num_computed = seq.num_tokens - 1  # decodes its last token next
        seq.kv_blocks = self.blocks(blocks_for(seq.num_computed + 1, self.bs))
        return seq


    def on(self, seq: Sequence, tokens: int = 1) -> None:
        for _ in range(tokens):
            seq.output_ids.append(self.rng.randrange(1000))
            seq.num_computed += 1
        if len(seq.kv_blocks) * self.bs <= seq.num_computed:
            seq.kv_blocks += self.blocks(1)  # grown in place, as the scheduler does

    def step(self) -> None:
        rng, cap = self.rng, self.static.batch_buckets[-1]
        self.rows = [seq for seq in self.rows  # finished: by chance, or at the length limit
                     if rng.random() > self.finish_rate[seq.seq_id] and seq.kv_prefix_len + seq.num_tokens < self.limit - 2]
        for seq in self.rows:
            roll = rng.random()
            self.on(seq, 2 if roll < 0.03 else 1)
            if 0.03 <= roll < 0.06:  # preempted and resumed: one token on, in another block list
                seq.kv_blocks = self.blocks(len(seq.kv_blocks))
        self.steps += 1
        joining = (0,) if self.steps // 40 % 2 else (0, 0, 1, 3)  # quiet spells: only growth and finishes
        self.rows += [self.join() for _ in range(rng.choice(joining))][:cap - len(self.rows)]
        if not self.rows:
            self.rows.append(self.join())
        if rng.random() < 0.2:
            rng.shuffle(self.rows)
        plan = [(seq, 1) for seq in sorted(self.rows, key=lambda s: s.adapter_slot)]
        b = bucket_for(len(plan), self.static.batch_buckets)
        if rng.random() < 0.2:  # a larger batch bucket than needed: more padding rows
            b = rng.choice([x for x in self.static.batch_buckets if x >= b])
        widest = max(self.static.width(seq) for seq, _ in plan)
        self.static.fill(plan, (b, bucket_for(widest, self.static.block_buckets)))


def _bare_static(block_size: int, max_model_len: int, max_batch: int = 12) -> StaticDecode:
    """The fixed buffers and their fill alone: no model, cache or adapters behind them."""
    return StaticDecode(types.SimpleNamespace(device=torch.device("cpu")), types.SimpleNamespace(block_size=block_size),
                        types.SimpleNamespace(gather_generation=0), max_batch=max_batch, max_model_len=max_model_len,
                        mode=DecodeMode.STATIC)


def test_a_table_grown_in_place_moves_whole(monkeypatch):
    """A row whose table grows in place past every width written fresh so far, then moves up
    when the row before it finishes: its new entry moves with it (random batches rarely do this
    before a fresh row widens the tables anyway)."""
    static = _bare_static(block_size=4, max_model_len=64)
    seen = check_every_fill(monkeypatch, static)
    x = Sequence([5], SamplingParams(), on_event=None, kv_blocks=[1])
    a = Sequence(list(range(8)), SamplingParams(), on_event=None, kv_blocks=[2, 3], num_computed=7)
    static.fill([(x, 1), (a, 1)], (2, 2))  # fresh: a's table is 2 entries wide
    x.output_ids.append(6)
    a.output_ids.append(9)
    x.num_computed, a.num_computed = 1, 8
    a.kv_blocks.append(4)  # a's new token opens its third block
    static.fill([(x, 1), (a, 1)], (2, 4))
    a.output_ids.append(10)
    a.num_computed = 9
    static.fill([(a, 1)], (1, 4))  # x finished: a moves up, with 3 entries
    assert seen["advanced"] == 3 and seen["moved"] == 1 and seen["opened"] == 1, seen
    assert not [k for k in seen if k.startswith("mismatch")], seen
    assert static._np[6][0, :3].tolist() == [2, 3, 4] and static._np[7][0, :4].tolist() == [4, 4, 2, 0]


@pytest.mark.parametrize("seed", range(4))
def test_fills_over_random_batches_equal_fresh_fills(seed, monkeypatch):
    """The persistent mirror's bookkeeping alone, over 300 random steps: every fill equals the
    same plan written fresh, and the entries past each row's width stay null."""
    bs, limit = 4, 96
    static = _bare_static(bs, limit)
    seen = check_every_fill(monkeypatch, static)
    batches = _Batches(random.Random(seed), static, bs, limit)
    for _ in range(300):
        batches.step()
    assert not [k for k in seen if k.startswith("mismatch")], seen
    assert seen["fills"] == 300 and seen["advanced"] > seen["rows"] // 2 and seen["moved"] > 50 and seen["opened"] > 50, seen


# (adapter, prompt index, new tokens) arriving in waves, `steps` decode steps apart. Prompts of
# 1-47 tokens in 8-token blocks: the first wave's two long rows (6-7 table entries) finish first,
# and the next waves' short rows take their places while the widest table is 1-2 entries, then
# grow by a block in place; rows finish at different steps throughout (the kept rows move up).
WAVES = (((None, 5, 3), ("r4-qv", 4, 3), (None, 1, 12), ("r8-mlp", 0, 12)),
         (("r2-all", 0, 10), (None, 1, 9), ("layer1", 0, 4)),
         (("r4-qv", 2, 6), (None, 3, 11), ("r8-mlp", 1, 5)))


def test_the_persistent_mirror_equals_a_fresh_fill_every_step(tmp_path, lora_dirs, reference, monkeypatch):  # noqa: F811
    """Continuous batching around the fixed buffers: requests arrive while others decode, finish
    at different steps, cross block boundaries. Each fill's buffers equal the same plan written
    fresh, and every row's tokens are still PEFT's."""
    serving = _serving(tmp_path, lora_dirs, "static")
    engine = serving.engine
    seen = check_every_fill(monkeypatch, engine.runner.static)
    prompts, jobs = _prompts(), []
    for wave in WAVES:
        for name, i, n in wave:
            seq = Sequence(prompts[i], SamplingParams(max_new_tokens=n, ignore_eos=True), on_event=lambda ev: None,
                           adapter=serving.registry.resolve(name) if name else None)
            jobs.append((name, i, seq))
            engine.add(seq)
        for _ in range(6):
            engine.step()
    while engine.has_work():
        engine.step()
    for name, i, seq in jobs:
        assert seq.output_ids == reference[name, i][:seq.params.max_new_tokens], (name, i)
    assert not [k for k in seen if k.startswith("mismatch")], seen
    assert seen["fills"] >= NEW and seen["advanced"] > seen["rows"] // 2  # most rows advanced in place
    assert seen["moved"] > 0 and seen["opened"] > 0, seen  # rows moved up; tables grew in place


def test_fixed_shape_steps_give_the_dynamic_steps_tokens(tmp_path, lora_dirs, reference):  # noqa: F811
    jobs = _jobs()
    dynamic = _serving(tmp_path, lora_dirs, "dynamic")
    static = _serving(tmp_path, lora_dirs, "static")
    want, got = _run(dynamic, jobs), _run(static, jobs)
    assert got == want
    assert dynamic.engine.runner.static is None and dynamic.engine.runner.static_steps == 0
    assert static.engine.runner.static_steps >= NEW - 4  # the decode-only steps ran fixed-shape
    for (name, i, params), out in zip(jobs, got):  # and the greedy rows are PEFT's tokens
        if params.greedy:
            assert out == reference[name, i][:params.max_new_tokens], (name, i)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_pool_full_of_nan_still_gives_the_oracles_tokens(tmp_path, lora_dirs, reference, mode):  # noqa: F811
    """Every block a step reads was zeroed first, whoever held it before: with NaN in every block
    of the pool but the null block, both step kinds give PEFT's tokens (8-token blocks: rows grow
    by several blocks, each zeroed with the step's others before the forward)."""
    serving = _serving(tmp_path, lora_dirs, mode)
    cache = serving.engine.cache
    for t in cache.k + cache.v:
        t[1:] = float("nan")
    jobs = [(name, i, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for i in (0, 4, 5) for name in SMALL[:2] + [None]]
    for (name, i, _), out in zip(jobs, _run(serving, jobs)):
        assert out == reference[name, i], (name, i)


def test_slots_reused_by_other_adapters_rewrite_their_stacks(tmp_path, lora_dirs, reference):  # noqa: F811
    """2 slots for 4 adapters: adapters wait, evict and install into slots another adapter used;
    the stacks (what a graph reads) must hold the new owner, with no stale rank columns."""
    serving = _serving(tmp_path, lora_dirs, "static", slots=2)
    jobs = [(name, i, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for i in (0, 3) for name in SMALL]
    for (name, i, _), out in zip(jobs, _run(serving, jobs)):
        assert out == reference[name, i], (name, i)
    assert serving.runtime.stats["evictions"] >= 2 and serving.engine.runner.static_steps > 0


def test_a_lora_above_the_stacks_rank_runs_dynamic_steps_and_matches_peft(tmp_path, lora_dirs, reference):  # noqa: F811
    serving = _serving(tmp_path, lora_dirs, "static")
    jobs = [(name, 2, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for name in ("r16-rslora", "pattern", "r4-qv")]
    for (name, i, _), out in zip(jobs, _run(serving, jobs)):
        assert out == reference[name, i], name
    runtime = serving.runtime
    big = runtime.slots.key_slot[serving.registry.resolve("r16-rslora").key]
    small = runtime.slots.key_slot[serving.registry.resolve("r4-qv").key]
    assert not runtime.gather_ready({0, big}) and runtime.gather_ready({0, small})
    assert serving.engine.runner.static_steps == 0  # every decode step had a rank-16/12 row


def test_a_failing_fixed_step_reruns_dynamically(tmp_path, lora_dirs, reference, monkeypatch):  # noqa: F811
    serving = _serving(tmp_path, lora_dirs, "static")
    static = serving.engine.runner.static

    def broken(plan):
        raise RuntimeError("injected fault in the fixed-shape step")

    monkeypatch.setattr(static, "run", broken)
    jobs = [(name, 1, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for name in ("r4-qv", None)]
    for (name, i, _), out in zip(jobs, _run(serving, jobs)):
        assert out == reference[name, i]
    runner = serving.engine.runner
    assert runner.static_steps == 0
    assert runner.static is None  # failing every time: switched off after MAX_STATIC_FAILURES, not retried forever


def test_modes_and_buckets():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode("auto", cpu) is DecodeMode.DYNAMIC and resolve_mode("auto", cuda) is DecodeMode.GRAPH
    assert resolve_mode("static", cpu) is DecodeMode.STATIC
    with pytest.raises(ValueError, match="CUDA"):
        resolve_mode("graph", cpu)
    with pytest.raises(ValueError):
        EngineConfig(decode_mode="fast")
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48] and buckets(1) == [1]
    assert bucket_for(5, buckets(48)) == 8 and bucket_for(33, buckets(48)) == 48


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_steps_give_the_eager_steps_tokens(tmp_path, lora_dirs):  # noqa: F811
    """Graph replay vs the dynamic eager step on the GPU: identical tokens, greedy and seeded."""
    jobs = _jobs()
    eager = _serving(tmp_path, lora_dirs, "dynamic", device="cuda")
    graph = _serving(tmp_path, lora_dirs, "graph", device="cuda")
    static = graph.engine.runner.static
    assert static.mode is DecodeMode.GRAPH
    assert len(static.graphs) == len(static.batch_buckets) * len(static.block_buckets)
    assert _run(graph, jobs) == _run(eager, jobs)
    assert graph.engine.runner.static_steps >= NEW - 4
    assert static.recaptures > 0  # the LoRAs' stacks made the start-up graphs stale: buckets recorded again
    assert _run(graph, jobs) == _run(eager, jobs)  # and replayed from those, with the adapters installed


def test_every_bucket_a_graph_would_capture_runs_on_padding_and_touches_only_the_null_block(tmp_path, lora_dirs):  # noqa: F811
    """What `capture` records, run eagerly for every (batch, blocks) bucket with LoRAs installed:
    the shapes hold for each bucket, the padding rows' logits are finite, and they write nowhere
    but the null block (a graph captured at start-up must not touch live KV)."""
    serving = _serving(tmp_path, lora_dirs, "static")
    _run(serving, [("r4-qv", 0, SamplingParams(max_new_tokens=2, ignore_eos=True))])  # install a LoRA first
    engine = serving.engine
    static, cache = engine.runner.static, engine.cache
    before = [t[1:].clone() for t in cache.k + cache.v]  # every block but the null block
    buckets_run = 0
    for b, nb in static.all_buckets():
        logits = static.run_padding(b, nb)
        assert logits.shape == (b, engine.model.vocab_size) and torch.isfinite(logits).all()
        buckets_run += 1
    assert buckets_run == len(static.batch_buckets) * len(static.block_buckets) > 10
    assert all(torch.equal(t[1:], old) for t, old in zip(cache.k + cache.v, before))


def test_stacks_exist_only_where_an_installed_adapter_reaches_and_growth_is_counted(tmp_path, lora_dirs):  # noqa: F811
    """Modules no adapter targets cost no stack and no gathered op; each growth bumps the
    generation that tells captured graphs they are stale (and nothing else does)."""
    serving = _serving(tmp_path, lora_dirs, "static")
    runtime = serving.runtime
    assert runtime.gather_generation == 0 and not any(lin.gathered for lin in runtime.layers.linears.values())
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)

    def stacked() -> set[str]:
        return {path.rsplit(".", 1)[-1] for path, lin in runtime.layers.linears.items() if lin.gathered}

    _run(serving, [("r4-qv", 0, params)])
    assert stacked() == {"q_proj", "v_proj"} and runtime.gather_generation == 1
    _run(serving, [("r4-qv", 1, params)])
    assert runtime.gather_generation == 1  # installed already: nothing new
    _run(serving, [("r8-mlp", 0, params)])
    assert stacked() == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} and runtime.gather_generation == 2
