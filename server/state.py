"""Process-wide server state shared by the HTTP routes (no web framework imports here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: no import cycle, no framework import at run time
    from .engine.async_engine import AsyncEngine
    from .metrics import Metrics
    from .registry import AdapterRegistry

MiB = 1024 * 1024


@dataclass
class ServerSettings:
    api_key: str | None = None  # bearer token for /generate (None = open)
    admin_key: str | None = None  # bearer token for adapter management (None = falls back to api_key)
    max_body_bytes: int = 1 * MiB  # default request-body cap (/generate and everything else)
    # per-path-prefix caps (longest prefix wins); adapter uploads get a much larger one
    body_limits: dict[str, int] = field(default_factory=lambda: {"/adapters": 256 * MiB})
    body_drain_bytes: int = 8 * MiB  # after a 413, read & discard this much more so the client sees it
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    manage_engine: bool = True  # the app's lifespan starts/stops the AsyncEngine
    docs: bool = True  # serve /openapi.json, /docs, /redoc (behind the API key when one is set)
    dtype: str = "float32"  # for build_info
    version: str = ""
    ui: bool = True  # serve the playground page at /ui (`--no-ui` turns it off)
    served_model_names: tuple[str, ...] = ()  # /v1 ids of the base model (first is listed); () = model_name
    allowed_adapter_dirs: tuple[str, ...] = ()  # where POST /v1/load_lora_adapter may read (none = refused)

    def body_limit_table(self) -> dict[str, int]:
        return {"": self.max_body_bytes, **self.body_limits}


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Any  # a Hugging Face tokenizer
    model_name: str
    registry: AdapterRegistry | None = None  # `resolve(spec) -> handle`; None = base model only
    settings: ServerSettings = field(default_factory=ServerSettings)
    metrics: Metrics | None = None  # create_app makes one when None
    draining: bool = False  # set on SIGTERM: /ready -> 503, new requests -> 503 draining
    inflight: int = 0  # accepted generate requests whose response has not finished

    @property
    def vocab_size(self) -> int:
        """Token ids a request may carry: the model's embedding rows."""
        return int(self.engine.engine.model.vocab_size)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.engine.config.max_model_len)


def get_state(request) -> ServerState:
    """FastAPI dependency (duck-typed so this module needs no FastAPI import)."""
    return request.app.state.peft
