"""Schema-driven fuzzing of every route (schemathesis, in-process over ASGI), bounded for CI.

The app is the full `peftserve serve` wiring around the tiny model (generation, probes, metrics,
adapter management with a registry). For each operation in the served OpenAPI schema,
schemathesis generates requests that fit the schema (positive) and requests that break it
(negative). Invariants: never a 5xx; every 4xx is a JSON `{"error": {"code", "message"}}`; the
engine is alive (health 200, no restart) and idle afterwards. ~550 requests, ~25 s on 2 cores.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from peftserve.server.state import ServerSettings
from tests.conftest import build_tiny_model
from tests.test_adapters_api import AdapterServer

EXAMPLES = {"/generate": 200}  # per operation and generation mode; the rest get DEFAULT_EXAMPLES
DEFAULT_EXAMPLES = 25


@pytest.fixture
def fuzz_server(tmp_path, smollm_tokenizer):
    # manage_engine=False: schemathesis' ASGI client runs the lifespan, the server owns the engine
    server = AdapterServer(build_tiny_model(len(smollm_tokenizer), 0), smollm_tokenizer, tmp_path / "store",
                           settings=ServerSettings(manage_engine=False), max_model_len=64)
    yield server
    server.close()


def check_response(case, resp, failures: list) -> None:
    where = f"{case.operation.method.upper()} {case.operation.path}"
    if resp.status_code >= 500:
        failures.append((where, resp.status_code, case.body if hasattr(case, "body") else None, resp.text[:300]))
        return
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            ok = isinstance(err["code"], str) and err["code"] and isinstance(err["message"], str)
        except Exception:
            ok = False
        if not ok:
            failures.append((where, resp.status_code, "4xx without a JSON error code", resp.text[:300]))


def test_schemathesis_every_route_no_5xx(fuzz_server):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_server.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert {("POST", "/generate"), ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"),
            ("POST", "/adapters"), ("GET", "/adapters"), ("GET", "/adapters/{name}"),
            ("DELETE", "/adapters/{name}")} <= paths, paths
    failures: list = []
    counts: dict[int, int] = {}
    started = time.monotonic()
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            n = EXAMPLES.get(op.path, DEFAULT_EXAMPLES)

            @settings(max_examples=n, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                resp = case.call(timeout=30)
                counts[resp.status_code] = counts.get(resp.status_code, 0) + 1
                check_response(case, resp, failures)

            try:
                run()
            except Unsatisfiable:  # nothing to break: the operation takes no parameters or body
                assert mode is GenerationMode.NEGATIVE, op.path
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    print(f"\nschemathesis: {total} requests over {len(operations)} operations in {elapsed:.1f}s; "
          f"statuses {dict(sorted(counts.items()))}")
    assert not failures, failures[:5]
    assert total >= 300 and counts.get(200, 0) > 0 and counts.get(422, 0) > 0, counts
    assert fuzz_server.engine.running and fuzz_server.engine.restarts == 0
    from fastapi.testclient import TestClient

    assert TestClient(fuzz_server.app).get("/health").status_code == 200
    assert fuzz_server.idle()
