"""The OpenAI-compatible API with the real `openai` package against a live uvicorn server.

One module-scoped server (the `serve` wiring around the tiny model with the default tokenizer)
holds a LoRA, a soft prompt, a prefix-tuning and an (IA)3 adapter. `/generate` is the oracle:
it is tested against transformers/PEFT elsewhere, so `/v1` must give exactly its tokens for the
same prompt, adapter and seed — base and every adapter kind, streaming or not, alone or in a
concurrent mixed batch.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from peftserve.server.state import ServerSettings
from tests.conftest import LiveServer, build_tiny_model
from tests.test_adapters_api import ADMIN, AdapterServer, lib  # noqa: F401  (session fixture)

KEY = "sk-test-123"
KINDS = ("qv", "soft", "prefix", "ia3")  # LoRA, prompt tuning, prefix tuning, (IA)3


def _extra_adapters(root, vocab):
    """Prefix tuning and (IA)3 made with PEFT on the tiny base (randomised so they matter)."""
    from peft import IA3Config, PrefixTuningConfig, get_peft_model

    out = {}
    for i, (name, cfg) in enumerate({
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
    }.items()):
        model = build_tiny_model(vocab, 0)
        torch.manual_seed(900 + i)
        pm = get_peft_model(model, cfg)
        g = torch.Generator().manual_seed(910 + i)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if p.requires_grad:
                    p.copy_((1.0 + 0.5 * torch.randn(p.shape, generator=g)) if "ia3" in pname
                            else torch.randn(p.shape, generator=g))
        pm.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory, smollm_tokenizer, lib):
    root = tmp_path_factory.mktemp("openai")
    server = AdapterServer(build_tiny_model(len(smollm_tokenizer), 0), smollm_tokenizer, root / "store",
                           settings=ServerSettings(api_key=KEY, admin_key="admin-Key-123"),
                           max_batch_size=16, max_model_len=256)
    for key in ("qv", "soft"):
        server.registry.import_dir(lib.get(key).dir, key)
    for name, d in _extra_adapters(root, len(smollm_tokenizer)).items():
        server.registry.import_dir(d, name)
    live = LiveServer(server.app)
    server.url = live.url
    yield server
    live.stop()
    server.close()


def oai(srv, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def generate(srv, **body) -> dict:
    r = httpx.post(srv.url + "/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


# -- parity with /generate ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [None, *KINDS])
def test_completion_matches_generate_for_base_and_every_kind(srv, model):
    client = oai(srv)
    name = model or "tiny"
    ref = generate(srv, prompt=PROMPT, adapter=model, max_new_tokens=8, temperature=0.9, seed=4, ignore_eos=True)
    out = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=4,
                                    extra_body={"ignore_eos": True})
    assert out.model == name and out.object == "text_completion"
    assert out.choices[0].text == ref["text"] and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=4,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize("model", [None, "qv", "soft", "prefix", "ia3"])
def test_chat_matches_generate_for_base_and_every_kind(srv, model):
    client = oai(srv)
    name = model or "tiny"
    ref = generate(srv, messages=CHAT, adapter=model, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    out = client.chat.completions.create(model=name, messages=CHAT, max_completion_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.model == name
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref["text"]
    assert out.usage.prompt_tokens == ref["usage"]["prompt_tokens"] and out.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=name, messages=CHAT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"  # role first, then content, then finish_reason
    assert "".join(d.content or "" for d in deltas) == ref["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


# Tests that compare a seeded request across batch shapes (in a batch vs alone) sample at top-k 3:
# the logits may differ in the last bit there, which full-vocabulary or top-p sampling turns into
# another token on some CPU (docs/openai.md, "seed"; benchmarks/seed_flips.py).
def test_mixed_concurrent_batch_matches_generate(srv):
    client = oai(srv)
    jobs = [(m, seed) for seed in (1, 2) for m in (None, *KINDS)]

    def v1(job):
        m, seed = job
        return client.completions.create(model=m or "tiny", prompt=PROMPT, max_tokens=10, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True, "top_k": 3}).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:  # all in flight together: one mixed batch
        got = list(pool.map(v1, jobs))
    for (m, seed), text in zip(jobs, got):
        assert text == generate(srv, prompt=PROMPT, adapter=m, max_new_tokens=10, temperature=1.0, seed=seed,
                                top_k=3, ignore_eos=True)["text"], (m, seed)
    assert len(set(got)) > len(jobs) // 2  # adapters and seeds really differ


def test_adapter_id_and_weighted_combination_extras(srv):
    client = oai(srv)
    ref = generate(srv, prompt=PROMPT, adapter="qv", max_new_tokens=5, ignore_eos=True)["text"]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"adapter_id": "qv", "ignore_eos": True})
    assert out.choices[0].text == ref
    mix = [{"name": "qv", "weight": 0.5}]
    ref = generate(srv, prompt=PROMPT, adapter=mix, max_new_tokens=5, ignore_eos=True)["text"]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"adapter": mix, "ignore_eos": True})
    assert out.choices[0].text == ref
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="soft", prompt=PROMPT, extra_body={"adapter_id": "qv"})
    assert exc.value.body["param"] == "adapter_id"


# -- n, stop, logprobs, echo, penalties -------------------------------------------------------------------
@pytest.mark.parametrize("model", [None, "qv", "prefix"])
def test_n_choices_are_seed_plus_j_and_reproducible(srv, model):
    client = oai(srv)
    kw = dict(model=model or "tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=3,
              extra_body={"ignore_eos": True, "top_k": 3})
    first = client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in client.completions.create(**kw).choices]
    for j, text in enumerate(texts):
        assert text == generate(srv, prompt=PROMPT, adapter=model, max_new_tokens=8, temperature=1.0, seed=11 + j,
                                top_k=3, ignore_eos=True)["text"]
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens == 24
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[j] for j in range(3)] == texts
    chat = client.chat.completions.create(model=model or "tiny", messages=CHAT, n=2, seed=5, temperature=1.0,
                                          max_tokens=6, extra_body={"ignore_eos": True, "top_k": 3})
    assert [c.message.content for c in chat.choices] == [
        generate(srv, messages=CHAT, adapter=model, max_new_tokens=6, temperature=1.0, seed=5 + j,
                 top_k=3, ignore_eos=True)["text"] for j in range(2)]


def test_batch_of_prompts_orders_choices_prompt_major(srv, smollm_tokenizer):
    client = oai(srv)
    ids = smollm_tokenizer("Hello there").input_ids
    out = client.completions.create(model="tiny", prompt=[PROMPT, "Hello there"], n=2, max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[2].text == out.choices[3].text == generate(srv, input_ids=ids, max_new_tokens=4,
                                                                  ignore_eos=True)["text"]
    tok = client.completions.create(model="tiny", prompt=[ids], max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert tok.choices[0].text == out.choices[2].text and tok.usage.prompt_tokens == len(ids)


def test_stop_strings_end_with_stop(srv):
    client = oai(srv)
    full = client.completions.create(model="qv", prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    word = full[len(full) // 2:len(full) // 2 + 3]
    assert word.strip()
    out = client.completions.create(model="qv", prompt=PROMPT, max_tokens=12, temperature=0, stop=[word, "zzzq"],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and out.text == full[:full.index(word)]
    single = client.completions.create(model="qv", prompt=PROMPT, max_tokens=12, temperature=0, stop=word,
                                       extra_body={"ignore_eos": True}).choices[0]
    assert single.text == out.text


def test_logprobs_in_both_formats(srv):
    client = oai(srv)
    out = client.completions.create(model="soft", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True}).choices[0]
    lp = out.logprobs
    assert "".join(lp.tokens) == out.text and len(lp.token_logprobs) == 6
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and value <= 0
        assert top[token] == pytest.approx(value) and value == pytest.approx(max(top.values()))  # greedy
    chat = client.chat.completions.create(model="soft", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    content = chat.logprobs.content
    assert "".join(c.token for c in content) == chat.message.content and len(content) == 5
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert bytes(c.bytes).decode() == c.token
    # streaming carries the same logprobs
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model="soft", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [e.logprob for s in streamed for e in s.content] == pytest.approx([c.logprob for c in content])


def test_echo_and_default_max_tokens(srv):
    client = oai(srv)
    out = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text.startswith(PROMPT) and out.usage.completion_tokens == 16  # OpenAI's default


def test_penalties_change_output_and_match_generate_of_same_seed_without_them(srv):
    client = oai(srv)
    plain = client.completions.create(model="ia3", prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    # the random tiny model rarely repeats itself: a negative presence penalty makes it (+2 to seen tokens)
    pen = client.completions.create(model="ia3", prompt=PROMPT, max_tokens=16, temperature=0, presence_penalty=-2.0,
                                    logprobs=0, extra_body={"ignore_eos": True, "repetition_penalty": 1.0})
    tokens = pen.choices[0].logprobs.tokens
    assert pen.choices[0].text != plain and len(set(tokens)) < len(tokens)
    freq = client.completions.create(model="ia3", prompt=PROMPT, max_tokens=16, temperature=0, presence_penalty=-2.0,
                                     frequency_penalty=2.0, logprobs=0, extra_body={"ignore_eos": True})
    assert freq.choices[0].text != pen.choices[0].text  # +2 per repeat cancels the presence bonus
    assert plain == generate(srv, prompt=PROMPT, adapter="ia3", max_new_tokens=16, ignore_eos=True)["text"]


# -- models -------------------------------------------------------------------------------------------------
def test_models_list_uploads_and_drops_deletions(srv, lib):
    client = oai(srv)
    ids = {m.id: m for m in client.models.list()}
    assert set(ids) == {"tiny", *KINDS}
    assert ids["tiny"].model_extra["parent"] is None
    for name in KINDS:
        assert ids[name].model_extra["parent"] == "tiny" and ids[name].owned_by == "peftserve"
    assert ids["soft"].model_extra["peftserve"]["kind"] == srv.registry.get("soft").kind.value
    art = lib.get("mlp")
    r = httpx.post(srv.url + "/adapters", data={"name": "uploaded"}, files=art.files(), headers=ADMIN, timeout=60)
    assert r.status_code == 201, r.text
    card = client.models.retrieve("uploaded")
    assert card.id == "uploaded" and card.model_extra["peftserve"]["version"] == r.json()["version"]
    assert client.completions.create(model="uploaded", prompt=PROMPT, max_tokens=3).usage.completion_tokens >= 1
    assert httpx.delete(srv.url + "/adapters/uploaded", headers=ADMIN).status_code in (200, 204)
    assert "uploaded" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("uploaded")
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="uploaded", prompt=PROMPT)


# -- errors --------------------------------------------------------------------------------------------------
def test_errors_in_openai_shape_through_the_client(srv):
    client = oai(srv)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert exc.value.body == {"message": "the model 'nope' does not exist", "type": "not_found_error",
                              "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=PROMPT, suffix="!")
    assert exc.value.body["param"] == "suffix" and exc.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=CHAT, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}}}])
    assert exc.value.body["param"] == "tools"
    r = httpx.get(srv.url + "/v1/models")  # no key at all: 401 in the same shape
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oai(srv, key="wrong").models.list()
    assert exc.value.body["code"] == "forbidden"
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10_000)
    assert exc.value.body["code"] == "context_length_exceeded"


# -- a third-party OpenAI client ---------------------------------------------------------------------------------
def test_langchain_chat_openai(srv):
    """LangChain's ChatOpenAI (sends its own defaults: stream_options, n, ...) works unchanged.
    langchain-openai is in the test extra (deploy/requirements.lock)."""
    lc = pytest.importorskip("langchain_openai")
    chat = lc.ChatOpenAI(base_url=srv.url + "/v1", api_key=KEY, model="prefix", temperature=0, max_tokens=5,
                         max_retries=0, extra_body={"ignore_eos": True})
    ref = generate(srv, messages=[{"role": "user", "content": "Say something."}], adapter="prefix",
                   max_new_tokens=5, ignore_eos=True)["text"]
    msg = chat.invoke("Say something.")
    assert msg.content == ref and msg.usage_metadata["output_tokens"] == 5
    assert "".join(chunk.content for chunk in chat.stream("Say something.")) == ref
    llm = lc.OpenAI(base_url=srv.url + "/v1", api_key=KEY, model="qv", temperature=0, max_tokens=4, max_retries=0,
                    model_kwargs={"extra_body": {"ignore_eos": True}})
    assert llm.invoke(PROMPT) == generate(srv, prompt=PROMPT, adapter="qv", max_new_tokens=4, ignore_eos=True)["text"]
