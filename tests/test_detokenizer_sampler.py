"""Sampler filtering against a direct computation; incremental detokenisation and stop strings."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from peftserve.server.engine.detokenizer import IncrementalDetokenizer, plain_decoder, token_pieces
from peftserve.server.engine.request import SamplingParams
from peftserve.server.engine.sampler import argmax_rows, filter_logits, sample, sample_step, screen_rows


# -- sampler ---------------------------------------------------------------------------------------
def kept(filtered: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(filtered)).flatten().tolist())


def direct_top_k(logits: list[float], k: int) -> set[int]:
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    return set(order[:k])


def direct_top_p(logits: list[float], p: float, candidates: set[int] | None = None) -> set[int]:
    """Smallest set of most likely tokens whose probability mass reaches p (over `candidates`)."""
    idx = sorted(candidates if candidates is not None else range(len(logits)), key=lambda i: -logits[i])
    m = max(logits[i] for i in idx)
    z = sum(math.exp(logits[i] - m) for i in idx)
    out, mass = set(), 0.0
    for i in idx:
        out.add(i)
        mass += math.exp(logits[i] - m) / z
        if mass >= p:
            break
    return out


@pytest.fixture
def logits():
    return torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("k", [1, 2, 10, 999])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_keeps_exactly_the_k_largest(logits, k, temperature):
    out = filter_logits(logits, SamplingParams(temperature=temperature, top_k=k))
    assert kept(out) == direct_top_k(logits.tolist(), k)
    idx = sorted(kept(out))
    torch.testing.assert_close(out[idx], logits[idx] / temperature)


def test_top_k_zero_or_at_least_vocab_disables(logits):
    for k in (0, 1000, 5000):
        assert kept(filter_logits(logits, SamplingParams(temperature=1.0, top_k=k))) == set(range(1000))


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_top_p_keeps_the_smallest_nucleus(logits, p, temperature):
    out = filter_logits(logits, SamplingParams(temperature=temperature, top_p=p))
    scaled = (logits / temperature).tolist()
    assert kept(out) == direct_top_p(scaled, p)


def test_top_p_tiny_keeps_only_argmax(logits):
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    assert kept(out) == {int(torch.argmax(logits))}


@pytest.mark.parametrize("k,p", [(50, 0.5), (5, 0.9), (200, 0.3)])
def test_top_k_then_top_p_over_the_renormalised_top_k(logits, k, p):
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=k, top_p=p))
    lg = logits.tolist()
    assert kept(out) == direct_top_p(lg, p, direct_top_k(lg, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_argmax_rows_equals_torch_argmax_ties_included(dtype):
    """The numpy path (CPU float32) and torch's agree on the first maximal index: random rows,
    rows of ties (a small value range), -0.0 against 0.0, strided views, inference tensors."""
    gen = torch.Generator().manual_seed(6)
    for _ in range(30):
        logits = torch.randint(-3, 3, (9, 77), generator=gen).to(dtype)  # many ties
        logits[0] = 0.0
        logits[1, :5] = -0.0
        logits[2] = torch.randn(77, generator=gen).to(dtype)
        with torch.inference_mode():
            frozen = logits.clone()
        for view in (logits, logits[::2], logits[:, 1:], logits.T.contiguous().T, frozen):
            assert torch.equal(argmax_rows(view), torch.argmax(view, dim=-1))
    assert argmax_rows(torch.empty(0, 5)).shape == (0,)


def test_a_step_fetches_ids_and_screen_flags_in_one_copy(monkeypatch):
    """What the engine runs per step (screen on the device, then sample_step with the flags):
    one `tolist` (the ids with the flags), no other host read for greedy rows; the flags equal
    the screen's, the ids `sample`'s. (Sampled rows on CPU add one cheap overflow check per
    chunk; on an accelerator that check is not asked: filter_logits_batch.)"""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 50, generator=gen)
    logits[2, 7] = float("nan")
    logits[4, :2] = 3e38  # finite, but its sum overflows: flagged, for confirm_nonfinite to clear
    greedy = [SamplingParams()] * 6
    reads = {"tolist": 0, "bool": 0, "item": 0}
    for name, key in (("tolist", "tolist"), ("__bool__", "bool"), ("item", "item")):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _key=key, **k):
            reads[_key] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    flags = screen_rows(logits)
    tokens, flagged = sample_step(logits, greedy, [None] * 6, flags)
    assert reads == {"tolist": 1, "bool": 0, "item": 0}
    monkeypatch.undo()
    assert flagged == [False, False, True, False, True, False]
    assert tokens == torch.argmax(logits, dim=-1).tolist()
    hot = [SamplingParams(temperature=0.8, seed=i) if i % 2 else SamplingParams() for i in range(6)]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    want = sample(logits, hot, [torch.Generator().manual_seed(i) for i in range(6)])
    got, flagged = sample_step(logits, hot, gens, flags)
    assert flagged[2] and flagged[4]
    assert [t for r, t in enumerate(got) if r not in (2, 4)] == [t for r, t in enumerate(want) if r not in (2, 4)]


def test_sample_greedy_rows_take_argmax_and_seeded_rows_repeat():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 500, generator=g)
    greedy = SamplingParams()
    hot = SamplingParams(temperature=1.0, top_k=20)

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    first = sample(logits, [greedy, hot, greedy, hot], [None, gen(7), None, gen(8)])
    again = sample(logits, [greedy, hot, greedy, hot], [None, gen(7), None, gen(8)])
    assert first == again
    assert first[0] == int(torch.argmax(logits[0])) and first[2] == int(torch.argmax(logits[2]))
    # a row's draw depends only on its own generator, not on the other rows
    alone = sample(logits[1:2], [hot], [gen(7)])
    assert alone == [first[1]]


def test_sampled_tokens_stay_inside_the_filtered_set():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.3, top_k=30, top_p=0.6)
    scaled = (logits / 1.3).tolist()
    allowed = direct_top_p(scaled, 0.6, direct_top_k(scaled, 30))
    gen = torch.Generator().manual_seed(3)
    draws = [sample(logits[None], [params], [gen])[0] for _ in range(300)]
    assert set(draws) <= allowed


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([0.0, math.log(3.0), -1e9])  # p = 0.25, 0.75, 0
    gen = torch.Generator().manual_seed(4)
    params = SamplingParams(temperature=1.0)
    draws = [sample(logits[None], [params], [gen])[0] for _ in range(2000)]
    assert 2 not in draws
    assert abs(draws.count(1) / 2000 - 0.75) < 0.04


# -- detokenizer ---------------------------------------------------------------------------------------
def feed(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool, int]:
    """Feed tokens like the engine does; returns (emitted pieces, stopped, tokens consumed)."""
    pieces = []
    for n, tok in enumerate(ids, 1):
        stopped = detok.add(tok)
        if stopped:
            pieces.append(detok.take(final=True))
            return pieces, True, n
        pieces.append(detok.take(final=False))
    pieces.append(detok.take(final=True))
    return pieces, False, len(ids)


@pytest.mark.parametrize("text", [
    "héllo 日本語 😀 naïve",
    "😀😀🎉 — “quoted” ∑ x² ≤ ∞",
    "plain ascii words, with punctuation!",
    "emoji at the end 🦀",
])
def test_incremental_text_equals_full_decode_without_replacement_chars(smollm_tokenizer, text):
    prompt = smollm_tokenizer("Say:").input_ids
    ids = smollm_tokenizer(text).input_ids
    pieces, stopped, _ = feed(IncrementalDetokenizer(smollm_tokenizer, prompt), ids)
    assert not stopped
    assert "".join(pieces) == smollm_tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_character_split_over_tokens_waits_until_complete(smollm_tokenizer):
    ids = smollm_tokenizer("😀").input_ids
    assert len(ids) == 3  # one emoji, three byte-level tokens
    detok = IncrementalDetokenizer(smollm_tokenizer, [])
    assert [detok.add(t) or detok.take(final=False) for t in ids] == ["", "", "😀"]


def test_leading_space_after_the_prompt_is_kept(smollm_tokenizer):
    prompt = smollm_tokenizer("Hello").input_ids
    ids = smollm_tokenizer(" world").input_ids
    pieces, _, _ = feed(IncrementalDetokenizer(smollm_tokenizer, prompt), ids)
    assert "".join(pieces) == " world"


def test_special_tokens_produce_no_text(smollm_tokenizer):
    ids = smollm_tokenizer("ok").input_ids + [smollm_tokenizer.eos_token_id]
    pieces, _, _ = feed(IncrementalDetokenizer(smollm_tokenizer, []), ids)
    assert "".join(pieces) == "ok"


def _general(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_plain_decoder_calls_the_backend_and_equals_decode(smollm_tokenizer, monkeypatch):
    """The direct backend call equals transformers' decode on random windows of ids (special
    and byte-level tokens among them), and is what the default tokenizer gets."""
    fast, general = plain_decoder(smollm_tokenizer), _general(smollm_tokenizer)
    gen = torch.Generator().manual_seed(3)
    specials = list(smollm_tokenizer.all_special_ids)
    for _ in range(300):
        ids = torch.randint(0, len(smollm_tokenizer), (int(torch.randint(1, 12, (1,), generator=gen)),),
                            generator=gen).tolist()
        if ids[0] % 3 == 0:
            ids[len(ids) // 2] = specials[ids[0] % len(specials)]
        assert fast(ids) == general(ids), ids
    want = general([105, 3312])
    monkeypatch.setattr(smollm_tokenizer, "decode", lambda *a, **k: pytest.fail("went through decode"))
    assert fast([105, 3312]) == want


def test_plain_decoder_keeps_a_subclass_override(smollm_tokenizer):
    class Shouting(type(smollm_tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    shouting = copy.copy(smollm_tokenizer)
    shouting.__class__ = Shouting
    ids = smollm_tokenizer("quiet words").input_ids
    assert plain_decoder(shouting)(ids) == "QUIET WORDS"


def test_incremental_pieces_are_the_same_with_either_decode(smollm_tokenizer):
    """Whole streams, random ids (multi-byte splits, special tokens) and a stop string: the
    backend path and the general path hand out the same pieces and stop at the same token."""
    gen = torch.Generator().manual_seed(4)
    stopped = 0
    text_ids = smollm_tokenizer("naïve 日本語 😀 stop here, x² ≤ ∞ — “q”").input_ids
    for trial in range(40):
        ids = torch.randint(0, len(smollm_tokenizer), (30,), generator=gen).tolist()
        ids[5:5 + len(text_ids)] = text_ids if trial % 2 else ids[5:5 + len(text_ids)]
        stop = ("stop",) if trial % 4 == 1 else ()
        prompt = ids[:3]
        got = feed(IncrementalDetokenizer(smollm_tokenizer, prompt, stop, plain_decoder(smollm_tokenizer)), ids[3:])
        want = feed(IncrementalDetokenizer(smollm_tokenizer, prompt, stop, _general(smollm_tokenizer)), ids[3:])
        assert got == want, trial
        stopped += want[1]
    assert stopped >= 5  # the stop path was exercised


SENTENCE = "Hello world, this is a test of stop strings."


@pytest.mark.parametrize("stop", [
    "ld, th",  # straddles ' world' ',' ' this'
    "world",  # exactly one token (with its leading space not included)
    "is a te",  # spans three tokens
    "s.",  # at the very end
    "Hello",  # at the very start
])
def test_stop_string_straddling_tokens(smollm_tokenizer, stop):
    ids = smollm_tokenizer(SENTENCE).input_ids
    pieces, stopped, n = feed(IncrementalDetokenizer(smollm_tokenizer, [], (stop,)), ids)
    assert stopped
    cut = SENTENCE.index(stop)
    assert "".join(pieces) == SENTENCE[:cut]
    # it stopped on the token that completed the stop string, not later
    assert stop in smollm_tokenizer.decode(ids[:n]) and stop not in smollm_tokenizer.decode(ids[:n - 1])


def test_earliest_of_several_stop_strings_wins(smollm_tokenizer):
    ids = smollm_tokenizer(SENTENCE).input_ids
    pieces, stopped, _ = feed(IncrementalDetokenizer(smollm_tokenizer, [], ("strings", "this is", "test")), ids)
    assert stopped and "".join(pieces) == "Hello world, "


def test_text_that_could_start_a_stop_string_is_held_back(smollm_tokenizer):
    ids = smollm_tokenizer(SENTENCE).input_ids
    detok = IncrementalDetokenizer(smollm_tokenizer, [], ("test of X",))
    emitted = ""
    for n, tok in enumerate(ids, 1):
        assert not detok.add(tok)
        emitted += detok.take(final=False)
        assert emitted + detok.pending == smollm_tokenizer.decode(ids[:n])
        assert len(detok.pending) == min(len("test of X") - 1, len(emitted + detok.pending))
    assert emitted + detok.take(final=True) == SENTENCE  # never found: everything comes out at the end


def test_a_stop_string_completed_before_min_tokens_is_not_matched_later(smollm_tokenizer):
    """As vLLM: a stop string counts where it ends in text added while stops are checked (here
    nothing is taken in between, so the old text is all still pending)."""
    ids = smollm_tokenizer(SENTENCE).input_ids
    detok = IncrementalDetokenizer(smollm_tokenizer, [], ("world",))
    for n, tok in enumerate(ids):
        assert not detok.add(tok, check_stop=n >= 2)  # "world" ends the text when checks begin
    assert detok.take(final=True) == SENTENCE


def test_stop_string_with_multibyte_characters(smollm_tokenizer):
    text = "abc 日本語 def"
    ids = smollm_tokenizer(text).input_ids
    pieces, stopped, _ = feed(IncrementalDetokenizer(smollm_tokenizer, [], ("本語",)), ids)
    assert stopped and "".join(pieces) == "abc 日"


def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_probability_tokens():
    from peftserve.server.engine.sampler import draw_tokens

    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25, 0.0])  # exact in binary: edges are exact too
    edges = torch.tensor([0.0, 0.5 - 1e-12, 0.5, 0.75, 1.0 - 1e-12], dtype=torch.float64)
    assert draw_tokens(probs.expand(5, -1), edges).tolist() == [1, 1, 3, 4, 4]
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(draw_tokens(probs.expand(n, -1), u), minlength=6).double() / n
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts.float(), probs, atol=0.015, rtol=0)


def test_batched_filtering_equals_each_row_alone():
    """Rows with different temperature / top-k / top-p in one batch get exactly what they would
    get alone (no parameter leaks across rows)."""
    from peftserve.server.engine.sampler import filter_logits_batch

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 300, generator=g) * 4
    logits[3, 7] = 3e38  # a row that overflows at its small temperature
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=1e-3, top_k=2, top_p=0.9),
              SamplingParams(temperature=2.0, top_k=400, top_p=1.0)]
    batch = filter_logits_batch(logits, params)
    for row, p in enumerate(params):
        assert torch.equal(batch[row], filter_logits_batch(logits[row:row + 1], [p])[0]), row
        assert kept(batch[row]) and torch.isfinite(torch.softmax(batch[row], -1)).all()
    assert kept(batch[1]) == direct_top_k((logits[1] / 1.3).tolist(), 5)


# -- the single-token pieces -----------------------------------------------------------------------
def _fragments(tokenizer) -> list[int]:
    """Byte-level tokens that are part of a character: no piece, their text waits for more."""
    return [t for t in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([t])][:400]


def test_pieces_hand_out_the_same_text_as_decoding(smollm_tokenizer):
    """Random streams over the whole vocabulary, rich in what has no piece (bytes of split
    characters, special tokens), with and without stop strings and min_tokens: the same pieces
    and the same stop with the single-token texts as with two decodes a token."""
    pieces = token_pieces(smollm_tokenizer)
    assert pieces is not None
    fragments, specials = _fragments(smollm_tokenizer), list(smollm_tokenizer.all_special_ids)
    assert len(fragments) > 50
    text_ids = smollm_tokenizer("naïve 日本語 😀 stop here, x² ≤ ∞ — “q” 🦀").input_ids
    gen = torch.Generator().manual_seed(5)
    used = stopped = 0
    for trial in range(300):
        r = torch.randint(0, 1000, (60,), generator=gen).tolist()
        ids = [fragments[x % len(fragments)] if x < 300 else specials[x % len(specials)] if x < 340
               else int(torch.randint(0, len(smollm_tokenizer), (1,), generator=gen)) for x in r]
        if trial % 3 == 0:
            ids[10:10 + len(text_ids)] = text_ids
        stop = [(), ("stop",), ("e", "本語 "), ("\ufffd",)][trial % 4]
        min_tokens = trial % 5
        both = []
        for p in (pieces, None):
            detok = IncrementalDetokenizer(smollm_tokenizer, ids[:4], stop, plain_decoder(smollm_tokenizer), p)
            out = []
            for n, tok in enumerate(ids[4:], 1):
                if detok.add(tok, check_stop=n > min_tokens):
                    out.append(("stop", detok.take(final=True)))
                    break
                out.append(detok.take(final=False))
            else:
                out.append(detok.take(final=True))
            both.append(out)
        assert both[0] == both[1], trial
        stopped += isinstance(both[1][-1], tuple)
        used += sum(pieces.get(t) is not None for t in ids)
    assert stopped >= 30 and used >= 1000  # both paths were exercised


def test_pieces_are_single_token_texts_that_need_no_context(smollm_tokenizer):
    pieces = token_pieces(smollm_tokenizer)
    world = smollm_tokenizer(" world").input_ids[0]
    assert pieces[world] == " world"
    assert all(pieces[t] is None for t in _fragments(smollm_tokenizer)[:50])
    assert all(pieces[t] is None for t in smollm_tokenizer.all_special_ids)
    assert pieces[len(smollm_tokenizer) + 5] is None  # past the vocabulary (a padded embedding)
    marked = copy.deepcopy(smollm_tokenizer)
    marked.add_tokens(["<plain added>"])  # not special: decoded, but apart from the byte-level pass
    added = marked.convert_tokens_to_ids("<plain added>")
    assert marked.decode([added]) == "<plain added>" and token_pieces(marked)[added] is None


def test_no_pieces_where_decoding_is_not_plain_byte_level(smollm_tokenizer):
    """Another decoder (here Metaspace, where a leading space is dropped at the start of a
    window, so a token's text depends on its place), or a subclass overriding how it decodes:
    every token goes through decode."""
    from tokenizers import decoders

    class Shouting(type(smollm_tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    shouting = copy.copy(smollm_tokenizer)
    shouting.__class__ = Shouting
    assert token_pieces(shouting) is None
    other = copy.deepcopy(smollm_tokenizer)
    other._tokenizer.decoder = decoders.Metaspace()
    assert plain_decoder(other) is not None and token_pieces(other) is None
