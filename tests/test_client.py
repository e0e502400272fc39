"""The bundled Python client against a real uvicorn server with a registry (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peftserve.clients import PeftServeClient, PeftServeError
from peftserve.server.api import adapters as adapters_api
from peftserve.server.metrics import Metrics
from peftserve.server.engine.config import EngineConfig
from peftserve.server.build import build_server
from peftserve.server.state import ServerSettings


@pytest.fixture
def served(tiny_model, smollm_tokenizer, live_server, tmp_path):
    built = build_server(tiny_model(0), smollm_tokenizer, EngineConfig(max_batch_size=4, max_model_len=128,
                                                                        max_num_batched_tokens=64),
                         store=tmp_path / "store", model_name="tiny", settings=ServerSettings(admin_key="admin"),
                         metrics=Metrics(), routers=[adapters_api.router], idle_wait_s=0.01)
    engine = built.state.engine
    engine.start()
    server = live_server(built.app)
    yield server, built.serving
    engine.stop()


def test_client_roundtrip(served, tiny_model, tmp_path):
    server, serving = served
    torch.manual_seed(0)
    get_peft_model(tiny_model(0), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "lora")
    with PeftServeClient(server.url, admin_key="admin") as c:
        assert c.ready()
        with pytest.raises(PeftServeError) as err:
            PeftServeClient(server.url).upload_adapter("x", tmp_path / "lora")
        assert err.value.status == 401
        info = c.upload_adapter("mine", tmp_path / "lora")
        assert info["kind"] == "LORA" and info["rank"] == 4
        assert [a["name"] for a in c.list_adapters()] == ["mine"]
        out = c.generate(input_ids=[5, 6, 7], adapter="mine", max_new_tokens=5, ignore_eos=True)
        events = list(c.stream(input_ids=[5, 6, 7], adapter="mine", max_new_tokens=5, ignore_eos=True))
        assert events[-1]["finish_reason"] == "length"
        assert [e["token_id"] for e in events[:-1]] == out["token_ids"] == events[-1]["token_ids"]  # greedy: same
        assert c.delete_adapter("mine")["deleted"] == "mine"
        with pytest.raises(PeftServeError) as err:
            c.generate(input_ids=[5], adapter="mine")
        assert (err.value.status, err.value.code) == (404, "adapter_not_found")


# -- typed errors, retries ----------------------------------------------------------------------------------
def _scripted(answers: list, seen: list):
    """An httpx transport answering from a script: (status, headers, body) or an exception to raise."""
    import httpx

    def handler(request):
        seen.append((request.method, request.url.path))
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        status, headers, body = a
        return httpx.Response(status, headers=headers, json=body)

    return httpx.MockTransport(handler)


def _err(code):
    return {"error": {"code": code, "message": code.replace("_", " ")}}


def test_retries_honour_retry_after_and_errors_are_typed(monkeypatch):
    import httpx

    from peftserve.clients import (ConnectionFailed, InvalidRequestError, QueueFullError, RetryPolicy,
                                   ServiceUnavailableError)

    slept = []
    monkeypatch.setattr("peftserve.clients.client.time.sleep", slept.append)
    seen: list = []
    answers = [(429, {"Retry-After": "2"}, _err("queue_full")), (503, {"Retry-After": "0"}, _err("draining")),
               (200, {}, {"text": "ok"})]
    c = PeftServeClient("http://x", transport=_scripted(answers, seen), retry=RetryPolicy(max_retries=3))
    assert c.generate(prompt="hi") == {"text": "ok"}
    assert slept == [2.0, 0.0] and len(seen) == 3  # waited exactly what the server said
    # out of retries: the typed error carries the code and the Retry-After
    answers[:] = [(429, {"Retry-After": "1"}, _err("queue_full"))] * 2
    with pytest.raises(QueueFullError) as exc:
        PeftServeClient("http://x", transport=_scripted(answers, seen), retry=RetryPolicy(max_retries=1)).generate(
            prompt="hi")
    assert (exc.value.status, exc.value.code, exc.value.retry_after) == (429, "queue_full", 1.0)
    # client errors are never retried; an HTTP-date Retry-After is understood
    answers[:] = [(422, {}, _err("context_length_exceeded"))]
    with pytest.raises(InvalidRequestError) as exc:
        PeftServeClient("http://x", transport=_scripted(answers, seen)).generate(prompt="hi")
    assert exc.value.code == "context_length_exceeded" and not answers
    answers[:] = [(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, _err("draining"))]
    with pytest.raises(ServiceUnavailableError) as exc:
        PeftServeClient("http://x", transport=_scripted(answers, seen), retry=RetryPolicy(max_retries=0)).health()
    assert exc.value.retry_after == 0.0
    # a connection failure is retried for GET (idempotent), never for POST (it may have been accepted)
    slept.clear()
    answers[:] = [httpx.ConnectError("refused"), (200, {}, {"status": "ok"})]
    assert PeftServeClient("http://x", transport=_scripted(answers, seen)).health() == {"status": "ok"}
    assert len(slept) == 1 and 0 < slept[0] <= 8.0  # backoff with jitter
    answers[:] = [httpx.ConnectError("refused"), (200, {}, {"text": "twice"})]
    with pytest.raises(ConnectionFailed):
        PeftServeClient("http://x", transport=_scripted(answers, seen)).generate(prompt="hi")


def test_async_client_roundtrip(served, tiny_model, tmp_path):
    import asyncio

    from peftserve.clients import AsyncPeftServeClient, ConflictError, NotFoundError

    server, _ = served
    torch.manual_seed(1)
    get_peft_model(tiny_model(0), LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "lora")

    async def main():
        async with AsyncPeftServeClient(server.url, admin_key="admin") as c:
            assert await c.ready() and (await c.health())["status"] == "ok"
            first = await c.upload_adapter("a", tmp_path / "lora")
            with pytest.raises(ConflictError) as exc:
                await c.upload_adapter("a", tmp_path / "lora")
            assert exc.value.code == "adapter_exists"
            assert (await c.replace_adapter("a", tmp_path / "lora"))["version"] == first["version"]
            out = await c.generate(input_ids=[5, 6, 7], adapter="a", max_new_tokens=4, ignore_eos=True)
            events = [e async for e in c.stream(input_ids=[5, 6, 7], adapter="a", max_new_tokens=4,
                                                ignore_eos=True)]
            assert events[-1]["token_ids"] == out["token_ids"]
            assert "peftserve_generation_tokens_total" in await c.metrics()
            assert [a["name"] for a in await c.list_adapters()] == ["a"]
            await c.delete_adapter("a")
            with pytest.raises(NotFoundError) as exc:
                await c.get_adapter("a")
            assert exc.value.code == "adapter_not_found"

    asyncio.run(main())


# -- installable and usable without torch --------------------------------------------------------------------
HTTPX_ONLY = ("httpx", "httpcore", "anyio", "idna", "certifi", "h11", "sniffio", "typing_extensions")


def test_client_installs_and_runs_in_a_venv_holding_only_httpx(served, tmp_path):
    """pip builds clients/ as its own wheel (peftserve-client, requires only httpx), pip installs it
    into a fresh venv whose only other packages are httpx and its dependencies, and that venv's
    Python — where `import torch` fails — talks to the live server."""
    import importlib.util
    import os
    import subprocess
    import sys
    import textwrap
    import venv

    root = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                    str(root / "clients")], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("peftserve_client-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = tmp_path / "httpx-only"
    deps.mkdir()
    for name in HTTPX_ONLY:
        spec = importlib.util.find_spec(name)
        if spec is not None:
            src = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
            (deps / src.name).symlink_to(src)
    Path(site, "httpx_only.pth").write_text(str(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                   check=True, timeout=300, cwd=tmp_path)
    script = textwrap.dedent("""
        import importlib.util, sys
        assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("transformers") is None
        from peftserve.clients import PeftServeClient, NotFoundError
        with PeftServeClient({server_url!r}, admin_key="admin") as c:
            assert c.health() == {"status": "ok"}
            out = c.generate(input_ids=[5, 6, 7], max_new_tokens=3, ignore_eos=True)
            assert len(out["token_ids"]) == 3
            assert list(c.stream(input_ids=[5, 6, 7], max_new_tokens=3, ignore_eos=True))[-1]["token_ids"] == out["token_ids"]
            try:
                c.generate(input_ids=[5], adapter="nope")
            except NotFoundError as exc:
                assert exc.code == "adapter_not_found"
            else:
                raise AssertionError("no error")
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "fastapi", "numpy")]
        assert not bad, bad
        print("client-ok", PeftServeClient.__module__, sys.prefix)
    """).replace("{server_url!r}", repr(served[0].url))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run([str(py), "-I", "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "client-ok peftserve.clients.client" in res.stdout and str(env_dir) in res.stdout


def test_stream_protocol_raises_in_band_errors_with_their_code():
    """Both streams read events through one function: an in-band error after the stream started
    is raised with the server's code, [DONE] ends the stream, other SSE lines are skipped."""
    from peftserve.clients.client import ServerError, _stream_event

    assert _stream_event('data: {"token_id": 5, "text": "a"}') == {"token_id": 5, "text": "a"}
    assert _stream_event("data: [DONE]") == "[DONE]"
    assert _stream_event("") is None and _stream_event(": keep-alive") is None
    with pytest.raises(ServerError) as info:
        _stream_event('data: {"error": {"code": "numerical_error", "message": "non-finite"}}')
    assert info.value.code == "numerical_error" and info.value.status == 500
