"""Ray Serve deployment (server/ray_serve) end to end on a local 2-CPU Ray cluster.

One application for the whole module (starting Ray + Serve + two engine replicas is most of the
cost): a tiny seeded Llama saved as a HF dir, two `PeftReplica`s behind `PeftIngress`, one shared
adapter store. The oracle is the single-process server (the `peftserve serve` wiring of
tests/test_adapters_api.py, around the same weights) and PEFT itself.

Which replica answered is read from the `x-peftserve-replica` header every replica adds, and
whether the adapter was already resident there from `x-peftserve-adapter-residency` (hit/load).
To reach *every* replica regardless of affinity, tests call the replica deployment's handle
without a multiplexed model id (Ray balances those) until each replica id has answered.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve tests need the optional extra: pip install 'peftserve[ray]'")
serve = pytest.importorskip("ray.serve")

from tests.test_adapters_api import P, AdapterServer, lib  # noqa: E402,F401  (lib: session fixture)
from tests.test_api import assert_error  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

APP = "peftserve-test"
NEW = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayApp:
    def __init__(self, url: str, store: Path, ref: AdapterServer):
        self.url, self.store, self.ref = url, store, ref
        self.replica_handle = serve.get_deployment_handle("PeftReplica", app_name=APP)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=120)

    async def direct(self, body: dict | None, route: str | None, path: str = "/generate") -> dict:
        """One request through the replica deployment handle, without affinity (GET if no body)."""
        import json

        req = {"method": "POST" if body is not None else "GET", "path": path, "query": b"",
               "body": json.dumps(body).encode() if body is not None else b"",
               "headers": [(b"content-type", b"application/json")], "route": route,
               "adapters": [route] if route else [], "manage": False}
        return await self.replica_handle.handle.remote(req)

    async def on_every_replica(self, body: dict | None, route: str | None, replicas: int = 2, tries: int = 60,
                               path: str = "/generate") -> dict:
        """replica id -> its answer, once each of `replicas` replicas answered (bounded)."""
        import json

        seen: dict[str, dict] = {}
        for _ in range(tries):
            out = await self.direct(body, route, path)
            rid = dict(out["headers"])[b"x-peftserve-replica"].decode()
            parsed = json.loads(out["body"]) if body is not None else out["body"].decode()
            seen.setdefault(rid, {"status": out["status"], "body": parsed})
            if len(seen) >= replicas:
                return seen
        raise AssertionError(f"only replicas {sorted(seen)} answered in {tries} tries")


# -- no cluster needed ------------------------------------------------------------------------
def test_routing_reads_adapter_of_generate_and_model_of_v1():
    from peftserve.server.ray_serve.ingress import routing_of

    js = "application/json"
    assert routing_of("POST", "/generate", js, b'{"prompt": "x", "adapter": "a1"}') == ("a1", ["a1"], False)
    assert routing_of("POST", "/v1/chat/completions", js, b'{"model": "m", "stream": true}') == ("m", ["m"], True)
    assert routing_of("POST", "/generate", js, b'{"adapter": [{"name": "a", "weight": 1}, {"name": "b"}]}') == \
        (None, ["a", "b"], False)
    assert routing_of("POST", "/generate", js, b"{") == (None, [], False)  # the replica answers 422
    assert routing_of("POST", "/generate", "text/plain", b'{"adapter": "a1"}') == (None, [], False)
    assert routing_of("POST", "/generate", js, b'{"adapter": "../etc"}') == (None, [], False)
    assert routing_of("GET", "/adapters", "", b"") == (None, [], False)


def test_serve_yaml_is_a_valid_serve_config_of_known_settings():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from peftserve.server.ray_serve.config import RayConfigError, RayServeConfig

    raw = yaml.safe_load((Path(__file__).parents[1] / "deploy/ray/serve.yaml").read_text())
    ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(raw)
    cfg = RayServeConfig.from_dict(raw["applications"][0]["args"])
    assert cfg.deployment_options()["num_replicas"] == cfg.replicas
    auto = RayServeConfig.from_dict({"autoscale": True, "max_batch_size": 4}).deployment_options()
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 4.0 and "num_replicas" not in auto
    with pytest.raises(RayConfigError, match="unknown"):
        RayServeConfig.from_dict({"replica": 2})
    with pytest.raises(RayConfigError):
        RayServeConfig.from_dict({"max_resident_adapters": 0})


def test_serve_ray_cli_takes_every_serve_flag():
    from peftserve.server.cli import build_parser
    from peftserve.server.ray_serve.config import RayServeConfig
    from peftserve.server.ray_serve.launch import config_from_args

    args = build_parser().parse_args(["serve-ray", "--replicas", "3", "--max-resident-adapters", "5",
                                      "--max-batch-size", "4", "--adapter-store", "/s", "--no-affinity"])
    cfg = RayServeConfig.from_dict(config_from_args(args))
    assert (cfg.replicas, cfg.max_resident_adapters, cfg.max_batch_size, cfg.adapter_store, cfg.affinity) == \
        (3, 5, 4, "/s", False)
    args = build_parser().parse_args(["serve-ray", "--kv-cache-bytes", "1GiB", "--kv-block-size", "32",
                                      "--max-adapter-bytes", "512MiB"])
    cfg = RayServeConfig.from_dict(config_from_args(args))
    assert (cfg.kv_cache_bytes, cfg.kv_block_size, cfg.max_adapter_bytes) == (1 << 30, 32, 512 << 20)


def test_no_serve_flag_is_silently_dropped_by_serve_ray():
    """Every `serve` flag either reaches the replicas' config or is one serve-ray handles itself
    (or refuses): a new engine flag forgotten here would be accepted and ignored."""
    from peftserve.server.cli import build_parser
    from peftserve.server.ray_serve.launch import _NOT_ON_RAY, _SHARED, serve_ray, unsupported_flags

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    serve_flags = {a.dest for a in sub.choices["serve"]._actions if a.dest != "help"}
    handled_by_launch = {"host", "port", "log_level", "adapters"}  # Ray's HTTP, logging; --adapters refused
    assert serve_flags - set(_SHARED) - handled_by_launch - set(_NOT_ON_RAY) == set()
    args = build_parser().parse_args(["serve-ray", "--served-model-name", "x", "--drain-timeout", "3"])
    assert unsupported_flags(args) == ["--drain-timeout", "--served-model-name"]
    assert serve_ray(args) == 2  # refused before Ray is touched
    assert unsupported_flags(build_parser().parse_args(["serve-ray"])) == []


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory, smollm_tokenizer):
    from tests.conftest import build_tiny_model

    from peftserve.server.ray_serve.app import build_app

    root = tmp_path_factory.mktemp("ray")
    model_dir = root / "model"
    build_tiny_model(len(smollm_tokenizer), 0).save_pretrained(model_dir, safe_serialization=True)
    smollm_tokenizer.save_pretrained(model_dir)
    store = root / "store"
    ref = AdapterServer(build_tiny_model(len(smollm_tokenizer), 0), smollm_tokenizer, root / "ref-store")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="peftserve-test")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({
            "model": str(model_dir), "dtype": "float32", "adapter_store": str(store), "replicas": 2,
            "num_cpus_per_replica": 0.5, "threads": 1, "max_batch_size": 8, "max_model_len": 256,
            "max_num_batched_tokens": 128, "max_adapters_per_batch": 4, "max_resident_adapters": 3,
            "retries": 3,
        }), name=APP, route_prefix="/")
        yield RayApp(f"http://127.0.0.1:{port}", store, ref)
    finally:
        ref.close()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


async def upload(client: httpx.AsyncClient, name: str, art, replace: bool = False) -> dict:
    r = await client.post("/adapters", data={"name": name, "replace": str(replace).lower()}, files=art.files())
    assert r.status_code == 201, r.text
    return r.json()


def gen(prompt: list[int], adapter=None, **kw) -> dict:
    body = {"input_ids": prompt, "max_new_tokens": NEW, **kw}
    if adapter is not None:
        body["adapter"] = adapter
    return body


async def sse_tokens(client: httpx.AsyncClient, body: dict) -> tuple[list[int], dict, httpx.Headers]:
    import json

    tokens, final = [], None
    async with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "token_id" in ev:
                tokens.append(ev["token_id"])
            else:
                final = ev
        return tokens, final, r.headers


async def test_parity_base_lora_prompt_tuning(ray_app, lib):
    """Same tokens through Ray (JSON and SSE) as through the single-process server and PEFT."""
    async with ray_app.client() as c, ray_app.ref.client() as rc:
        for name in ("qv", "soft"):  # a LoRA and a prompt-tuning adapter, uploaded through the ingress
            info = await upload(c, name, lib.get(name))
            await upload(rc, name, lib.get(name))
            assert info["name"] == name and info["kind"].lower() in ("lora", "prompt_tuning")
        for adapter in (None, "qv", "soft"):
            for prompt in P:
                want = lib.ref(adapter, prompt, NEW)
                ref = (await rc.post("/generate", json=gen(prompt, adapter))).json()
                r = await c.post("/generate", json=gen(prompt, adapter))
                assert r.status_code == 200, r.text
                assert ref["token_ids"] == want, (adapter, "single-process server vs PEFT")
                assert r.json()["token_ids"] == want, (adapter, "Ray vs PEFT")
                assert r.json()["text"] == ref["text"]
            tokens, final, headers = await sse_tokens(c, gen(P[0], adapter))
            assert tokens == final["token_ids"] == lib.ref(adapter, P[0], NEW), adapter
            assert "x-peftserve-replica" in headers
        # the rest of the API through the ingress: same bodies as the single process
        assert (await c.get("/health")).json() == {"status": "ok"}
        assert (await c.get("/ready")).status_code == 200
        assert "peftserve_" in (await c.get("/metrics")).text
        names = sorted(a["name"] for a in (await c.get("/adapters")).json()["adapters"])
        assert names == ["qv", "soft"]
        assert_error(await c.post("/generate", json=gen(P[0], "missing")), 404, "adapter_not_found")
        assert_error(await c.post("/generate", content=b"{", headers={"content-type": "application/json"}),
                     422, "invalid_request")
        assert_error(await c.get("/no/such/route"), 404, "not_found")


async def test_affinity_repeated_requests_land_on_the_holding_replica(ray_app, lib):
    async with ray_app.client() as c:
        await upload(c, "rs", lib.get("rs"))
        first = await c.post("/generate", json=gen(P[0], "rs"))
        assert first.status_code == 200, first.text
        holder = first.headers["x-peftserve-replica"]
        assert first.headers["x-peftserve-adapter-residency"] == "load"
        await asyncio.sleep(1.0)  # replicas push their resident ids to Serve's routers every 0.1 s
        residency, replicas = [], []
        for prompt in (P * 5):
            r = await c.post("/generate", json=gen(prompt, "rs"))
            assert r.status_code == 200
            replicas.append(r.headers["x-peftserve-replica"])
            residency.append(r.headers["x-peftserve-adapter-residency"])
        assert replicas == [holder] * len(replicas), replicas
        assert residency == ["hit"] * len(residency), residency
        # the same, from each replica's own /metrics
        scraped = await ray_app.on_every_replica(None, None, path="/metrics")
        assert set(scraped) >= {holder}
        for rid, answer in scraped.items():
            text = answer["body"]
            assert f'peftserve_replica_info{{replica="{rid}"}} 1.0' in text
            hits = _sample(text, 'peftserve_replica_adapter_residency_total{adapter="rs",result="hit"}')
            loads = _sample(text, 'peftserve_replica_adapter_residency_total{adapter="rs",result="load"}')
            assert (hits, loads) == ((len(residency), 1) if rid == holder else (0, 0)), (rid, hits, loads)
            resident = _sample(text, "peftserve_replica_resident_adapters")
            assert (1 if rid == holder else 0) <= resident <= 3, (rid, resident)  # K = 3


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0


async def test_upload_replace_delete_consistent_on_every_replica(ray_app, lib):
    """An upload through the ingress serves on both replicas; a replace is never served stale
    (each replica checks the store's CURRENT per request); a delete is 404 on both."""
    async with ray_app.client() as c:
        v1 = await upload(c, "shared", lib.get("ou"))
        body = gen(P[1], "shared")
        want1 = lib.ref("ou", P[1], NEW)
        seen = await ray_app.on_every_replica(body, "shared")
        assert {rid: a["body"]["token_ids"] for rid, a in seen.items()} == {rid: want1 for rid in seen}
        v2 = await upload(c, "shared", lib.get("mlp"), replace=True)
        assert v2["version"] != v1["version"]
        want2 = lib.ref("mlp", P[1], NEW)
        assert want2 != want1
        seen = await ray_app.on_every_replica(body, "shared")  # both held v1 resident a moment ago
        assert {rid: a["body"]["token_ids"] for rid, a in seen.items()} == {rid: want2 for rid in seen}
        r = await c.delete("/adapters/shared")
        assert r.status_code == 200 and r.json()["version"] == v2["version"], r.text
        seen = await ray_app.on_every_replica(body, "shared")
        for rid, answer in seen.items():
            assert answer["status"] == 404 and answer["body"]["error"]["code"] == "adapter_not_found", (rid, answer)
        assert_error(await c.post("/generate", json=body), 404, "adapter_not_found")
        assert_error(await c.get("/adapters/shared"), 404, "adapter_not_found")
        assert not (ray_app.store / "shared").exists()


async def test_killing_a_replica_loses_no_accepted_request(ray_app, lib):
    """Requests in flight on a replica that dies are re-sent by the ingress to the other one;
    the survivor keeps serving while Serve replaces the dead replica."""
    async with ray_app.client() as c:
        long = {"input_ids": P[0], "max_new_tokens": 240, "adapter": "qv"}
        warm = await c.post("/generate", json={**long, "max_new_tokens": 1})
        victim = warm.headers["x-peftserve-replica"]
        await asyncio.sleep(0.5)
        want = lib.ref("qv", P[0], 240)
        tasks = [asyncio.ensure_future(c.post("/generate", json=long)) for _ in range(6)]
        await asyncio.sleep(0.3)  # accepted and running on the victim (affinity)
        actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#PeftReplica#") and a["name"].endswith(victim)]
        assert len(actors) == 1, actors
        assert not all(t.done() for t in tasks), "requests finished before the kill: make them longer"
        ray.kill(ray.get_actor(actors[0], namespace="serve"), no_restart=True)
        t0 = time.monotonic()
        results = await asyncio.gather(*tasks)
        for r in results:
            assert r.status_code == 200, r.text
            assert r.json()["token_ids"] == want
        answered_by = {r.headers["x-peftserve-replica"] for r in results}
        assert victim not in answered_by, "a killed replica cannot have answered"
        for prompt in P:  # the survivor keeps serving base and adapter traffic
            for adapter in (None, "soft"):
                r = await c.post("/generate", json=gen(prompt, adapter))
                assert r.status_code == 200 and r.json()["token_ids"] == lib.ref(adapter, prompt, NEW)
        assert time.monotonic() - t0 < 60
