"""vLLM operations: load/unload adapters from confined server paths, --lora-modules, served names."""

from __future__ import annotations

import os
import shutil

import pytest

from peftserve.server.api import vllm_ops
from peftserve.server.cli import build_parser, parse_lora_modules
from peftserve.server.state import ServerSettings
from tests.test_adapters_api import ADMIN, adapter_server, lib  # noqa: F401  (fixtures)
from tests.test_openai_params import assert_oai_error

pytestmark = pytest.mark.anyio
API = {"Authorization": "Bearer api-key"}


@pytest.fixture
def ops_server(adapter_server, tmp_path):
    def make(allowed=("allowed",), **kw):
        dirs = tuple(str(tmp_path / d) for d in allowed)
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        settings = ServerSettings(api_key="api-key", admin_key="admin-Key-123", allowed_adapter_dirs=dirs,
                                  served_model_names=("base-a", "base-b"), **kw)
        server = adapter_server(settings=settings)
        server.app.include_router(vllm_ops.router)
        return server
    return make


async def load(c, name, path, headers=ADMIN):
    return await c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=headers)


async def test_load_serve_list_unload(ops_server, lib, tmp_path):
    server = ops_server()
    shutil.copytree(lib.get("qv").dir, tmp_path / "allowed" / "qv")
    async with server.client() as c:
        r = await load(c, "mine", tmp_path / "allowed" / "qv")
        assert r.status_code == 200 and r.text.startswith("Success"), r.text
        models = (await c.get("/v1/models", headers=API)).json()["data"]
        assert [m["id"] for m in models] == ["base-a", "mine"] and models[1]["parent"] == "base-a"
        ref = (await c.post("/generate", json={"input_ids": [5, 6, 7], "adapter": "mine", "max_new_tokens": 4},
                            headers=API)).json()
        assert ref["token_ids"] == lib.ref("qv", [5, 6, 7], 4)  # PEFT's own output
        for base in ("base-a", "base-b"):  # every served name is the base model
            r = await c.post("/v1/completions", json={"model": base, "prompt": [5, 6, 7], "max_tokens": 4,
                                                      "temperature": 0, "ignore_eos": True}, headers=API)
            assert r.status_code == 200 and r.json()["model"] == base
        r = await c.post("/v1/completions", json={"model": "mine", "prompt": [5, 6, 7], "max_tokens": 4,
                                                  "temperature": 0, "ignore_eos": True}, headers=API)
        assert r.json()["choices"][0]["text"] == ref["text"]
        assert_oai_error(await load(c, "mine", tmp_path / "allowed" / "qv"), 409, "adapter_exists")
        assert_oai_error(await load(c, "base-b", tmp_path / "allowed" / "qv"), 400, "invalid_request", "lora_name")
        r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert [m["id"] for m in (await c.get("/v1/models", headers=API)).json()["data"]] == ["base-a"]
        assert_oai_error(await c.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}, headers=ADMIN), 404,
                         "adapter_not_found")
        assert_oai_error(await c.get("/v1/models/mine", headers=API), 404, "model_not_found")


async def test_paths_outside_the_allowed_dirs_are_refused(ops_server, lib, tmp_path):
    server = ops_server()
    outside = tmp_path / "outside" / "qv"
    shutil.copytree(lib.get("qv").dir, outside)
    allowed = tmp_path / "allowed"
    (allowed / "link").symlink_to(outside, target_is_directory=True)  # a symlinked dir leading out
    (allowed / "files").mkdir()
    (allowed / "files" / "adapter_config.json").write_bytes((outside / "adapter_config.json").read_bytes())
    (allowed / "files" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (tmp_path / "allowed-sibling").mkdir()  # a prefix of the allowed dir's name is not inside it
    async with server.client() as c:
        for path in (outside, allowed / ".." / "outside" / "qv", allowed / "link", tmp_path / "allowed-sibling",
                     allowed, "/etc"):
            assert_oai_error(await load(c, "x", path), 403, "path_not_allowed", "lora_path")
        assert_oai_error(await load(c, "x", allowed / "files"), 403, "path_not_allowed", "lora_path")
        assert_oai_error(await load(c, "x", allowed / "missing"), 404, "adapter_not_found")
        assert_oai_error(await load(c, "x", outside, headers=API), 403, "forbidden")  # API key is not admin
        assert_oai_error(await c.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 401, "unauthorized")
        assert_oai_error(await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(outside),
                                                                     "extra": 1}, headers=ADMIN),
                         400, "unknown_parameter", "extra")
        assert [m["id"] for m in (await c.get("/v1/models", headers=API)).json()["data"]] == ["base-a"]


async def test_loading_is_refused_without_allowed_dirs(ops_server, lib):
    server = ops_server(allowed=())
    async with server.client() as c:
        assert_oai_error(await load(c, "x", lib.get("qv").dir), 403, "adapter_loading_disabled", "lora_path")


def test_cli_flags_and_lora_modules_forms():
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "b", "--lora-modules", "x=/p/x",
                                      '{"name": "y", "path": "/p/y"}', "--allowed-adapter-dirs", "/srv/a"])
    assert args.served_model_name == ["a", "b"] and args.allowed_adapter_dirs == ["/srv/a"]
    assert parse_lora_modules(args.lora_modules) == [("x", "/p/x"), ("y", "/p/y")]
    for bad in ("noequals", "=path", "name=", '{"name": "x"}'):
        with pytest.raises(ValueError):
            parse_lora_modules([bad])
