"""Ambiguous uploads are refused, and a base-model mismatch is told to the uploader.

Issue 9: a multipart upload with two `name` parts was accepted (last wins, 201); an adapter whose
config names another base model was accepted with only a server-side log line.
"""

from __future__ import annotations

import dataclasses

import pytest

from peftserve.server.cli import build_parser
from tests.test_adapters_api import (  # noqa: F401  (fixtures)
    P,
    adapter_server,
    edit_config,
    expect_refused,
    lib,
    tokens,
    upload,
)

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]
SERVED = "SmolLM2-135M-Instruct"


def multipart(parts: list[tuple[str, object]]) -> list:
    """httpx `files=` as a list keeps repeated part names (a dict cannot)."""
    out = []
    for name, value in parts:
        out.append((name, (None, value) if isinstance(value, str) else value))
    return out


@pytest.mark.parametrize("dup", ["name", "replace", "adapter_config", "adapter_model"])
async def test_repeated_part_is_422_and_nothing_stored(adapter_server, lib, dup):
    server = adapter_server()
    art, other = lib.get("qv"), lib.get("qv2")
    files = art.files()
    values = {"name": ["first", "second"], "replace": ["false", "true"],
              "adapter_config": [files["adapter_config"], files["adapter_config"]],
              "adapter_model": [files["adapter_model"], other.files()["adapter_model"]]}
    parts = []
    for field in ("name", "replace", "adapter_config", "adapter_model"):
        for value in values[field] if field == dup else values[field][:1]:
            parts.append((field, value))
    async with server.client() as client:
        await expect_refused(server, client, lambda: client.post("/adapters", files=multipart(parts)),
                             422, "invalid_request")


async def test_base_model_mismatch_is_a_warning_in_the_201_body(adapter_server, lib):
    server = adapter_server()
    server.registry.spec = dataclasses.replace(server.registry.spec, name_or_path=SERVED)
    art = lib.get("qv")
    async with server.client() as client:
        other = edit_config(art, base_model_name_or_path="meta-llama/Llama-3.2-1B")
        resp = await upload(client, "other", art, config=other)
        assert resp.status_code == 201, resp.text
        assert len(resp.json()["warnings"]) == 1 and "Llama-3.2-1B" in resp.json()["warnings"][0]
        assert (await client.get("/adapters/other")).json()["warnings"] == resp.json()["warnings"]
        # hub id vs local path of the same model: the last path component, case-insensitively
        for same in (f"HuggingFaceTB/{SERVED}", f"/models/{SERVED.lower()}/", SERVED):
            resp = await upload(client, "same", art, replace=True, config=edit_config(art, base_model_name_or_path=same))
            assert resp.status_code == 201 and resp.json()["warnings"] == [], (same, resp.text)
        assert await tokens(client, P[0], "other") == lib.ref("qv", P[0])


async def test_strict_base_refuses_a_mismatch(adapter_server, lib):
    server = adapter_server(registry_settings={"strict_base": True})
    server.registry.spec = dataclasses.replace(server.registry.spec, name_or_path=SERVED)
    art = lib.get("qv")
    async with server.client() as client:
        other = edit_config(art, base_model_name_or_path="meta-llama/Llama-3.2-1B")
        await expect_refused(server, client, lambda: upload(client, "other", art, config=other),
                             422, "base_model_mismatch")
        same = edit_config(art, base_model_name_or_path=f"HuggingFaceTB/{SERVED}")
        assert (await upload(client, "same", art, config=same)).status_code == 201


def test_cli_flags_reach_the_registry_settings():
    args = build_parser().parse_args(["serve", "--strict-base", "--max-combinations", "3"])
    assert args.strict_base is True and args.max_combinations == 3
    args = build_parser().parse_args(["serve"])
    assert args.strict_base is False and args.max_combinations == 16
