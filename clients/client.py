"""A small synchronous + streaming client for the peftserve HTTP API (httpx).

    from peftserve.clients import PeftServeClient
    c = PeftServeClient("http://127.0.0.1:8000", api_key=None, admin_key=None)
    c.upload_adapter("my-lora", "out/")                 # PEFT dir: adapter_config.json + .safetensors
    print(c.generate(prompt="Hello", adapter="my-lora")["text"])
    for event in c.stream(messages=[{"role": "user", "content": "Hi"}]):
        print(event.get("text", ""), end="")
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class PeftServeError(RuntimeError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class PeftServeClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 300.0):
        self.base_url = base_url.rstrip("/")
        self.api_key, self.admin_key = api_key, admin_key
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _auth(key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    @staticmethod
    def _check(resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                raise PeftServeError(resp.status_code, err.get("code", "error"), err.get("message", ""))
            except (ValueError, KeyError, TypeError):
                raise PeftServeError(resp.status_code, "http_error", resp.text[:200]) from None
        return resp.json()

    # -- generation ------------------------------------------------------------------------
    def generate(self, **body: Any) -> dict:
        """POST /generate; keyword arguments are the request fields (prompt, adapter, ...)."""
        body.pop("stream", None)
        return self._check(self._http.post("/generate", json=body, headers=self._auth(self.api_key)))

    def stream(self, **body: Any) -> Iterator[dict]:
        """POST /generate with stream=true; yields each SSE event's JSON (the last has finish_reason)."""
        body["stream"] = True
        with self._http.stream("POST", "/generate", json=body, headers=self._auth(self.api_key)) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                yield json.loads(data)

    # -- adapters --------------------------------------------------------------------------
    def upload_adapter(self, name: str, adapter_dir: str | Path, replace: bool = False) -> dict:
        d = Path(adapter_dir)
        with open(d / "adapter_config.json", "rb") as cfg, open(d / "adapter_model.safetensors", "rb") as weights:
            files = {"adapter_config": ("adapter_config.json", cfg, "application/json"),
                     "adapter_model": ("adapter_model.safetensors", weights, "application/octet-stream")}
            data = {"name": name, "replace": "true" if replace else "false"}
            return self._check(self._http.post("/adapters", data=data, files=files,
                                               headers=self._auth(self.admin_key or self.api_key)))

    def list_adapters(self) -> list[dict]:
        return self._check(self._http.get("/adapters", headers=self._auth(self.admin_key or self.api_key)))["adapters"]

    def get_adapter(self, name: str) -> dict:
        return self._check(self._http.get(f"/adapters/{name}", headers=self._auth(self.admin_key or self.api_key)))

    def delete_adapter(self, name: str) -> dict:
        return self._check(self._http.delete(f"/adapters/{name}", headers=self._auth(self.admin_key or self.api_key)))

    def ready(self) -> bool:
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.HTTPError:
            return False
