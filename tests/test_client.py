"""The bundled Python client against a real uvicorn server with a registry (tiny model)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peftserve.clients import PeftServeClient, PeftServeError
from peftserve.server.api import adapters as adapters_api
from peftserve.server.api.app import create_app
from peftserve.server.api.metrics import Metrics
from peftserve.server.engine.async_engine import AsyncEngine
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.factory import build_serving
from peftserve.server.state import ServerSettings, ServerState


@pytest.fixture
def served(tiny_model, smollm_tokenizer, live_server, tmp_path):
    serving = build_serving(tiny_model(0), smollm_tokenizer, EngineConfig(max_batch_size=4, max_model_len=128,
                                                                          max_num_batched_tokens=64),
                            store=tmp_path / "store")
    engine = AsyncEngine(serving.engine, idle_wait_s=0.01)
    serving.registry.attach(engine)
    state = ServerState(engine, smollm_tokenizer, "tiny", registry=serving.registry,
                        settings=ServerSettings(admin_key="admin"), metrics=Metrics())
    state.slots = serving.slots
    engine.start()
    server = live_server(create_app(state, routers=[adapters_api.router]))
    yield server, serving
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
