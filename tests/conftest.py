"""Shared fixtures: the default model's tokenizer, a tiny seeded Llama sized to it, servers around it.

`smollm_tokenizer` loads the SmolLM2 tokenizer from the cached converted checkpoint (the first
conversion ever takes ~25 s; later sessions load it in ~2 s). `tiny_model(seed)` builds a 2-layer
random Llama whose vocabulary matches that tokenizer, in well under a second.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch


TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)


def pytest_report_header(config):
    """The resolved stack, first thing in every run's output (CI logs included)."""
    import sys

    import fastapi
    import peft
    import transformers

    return (f"peftserve stack: python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft.__version__}, fastapi {fastapi.__version__}")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from peftserve.adapters.base_model import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir("default"))


def build_tiny_model(vocab_size: int, seed: int = 0, **overrides):
    try:
        from tests.tiny import tiny_llama
    except ImportError:  # conftest imported from tests/ on sys.path (subprocess scripts)
        from tiny import tiny_llama

    return tiny_llama(seed, **{**TINY_CONFIG, "vocab_size": vocab_size, **overrides}).requires_grad_(False)


@pytest.fixture
def tiny_model(smollm_tokenizer):
    """Factory: `tiny_model(seed=0, **config_overrides)` -> a fresh LlamaForCausalLM (float32, eval)."""

    def make(seed: int = 0, **overrides):
        return build_tiny_model(len(smollm_tokenizer), seed, **overrides)

    return make


class Server:
    """An engine + app around a tiny model (what `make_server` returns)."""

    def __init__(self, hf_model, tokenizer, config, settings=None, registry=None, start=True):
        from peftserve.server.build import build_server
        from peftserve.server.metrics import Metrics

        self.metrics = Metrics(base_model="tiny", dtype="float32", version="test")
        built = build_server(hf_model, tokenizer, config, store=None, model_name="tiny", settings=settings,
                             metrics=self.metrics, idle_wait_s=0.01)  # the base model only
        self.state, self.app = built.state, built.app
        self.engine = self.state.engine
        self.llm = self.engine.engine
        self.state.registry = registry  # a stand-in registry (tests of the HTTP layer), or None
        if start:
            self.engine.start()

    def client(self, **kw):
        import httpx

        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test", **kw)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """True once requests hold no KV block and nothing waits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.engine.snapshot
            if snap.kv_blocks_requests == 0 and self.engine.num_waiting == 0 and snap.running == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self):
        self.engine.stop()


@pytest.fixture
def make_server(tiny_model, smollm_tokenizer):
    """Factory: `make_server(seed=0, settings=None, registry=None, model=None, **EngineConfig kwargs)`."""
    from peftserve.server.engine.config import EngineConfig

    servers: list[Server] = []

    def make(seed: int = 0, settings=None, registry=None, model=None, start=True, **config):
        cfg = EngineConfig(**{"max_batch_size": 8, "max_model_len": 512, "max_num_batched_tokens": 128, **config})
        server = Server(model if model is not None else tiny_model(seed), smollm_tokenizer, cfg, settings,
                        registry, start)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (random port) in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def live_server():
    """Factory: `live_server(app)` -> LiveServer (stopped at teardown)."""
    started: list[LiveServer] = []

    def start(app):
        server = LiveServer(app)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
