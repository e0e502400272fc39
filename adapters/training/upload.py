"""`--upload URL`: POST a trained adapter to a running peftserve (multipart, httpx)."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class UploadError(RuntimeError):
    pass


def upload_adapter(adapter_dir: str | Path, url: str, *, name: str | None = None, admin_key: str | None = None,
                   timeout: float = 120.0) -> str:
    """POST URL/adapters with form field `name` and files `adapter_config`, `adapter_model`.
    The admin key goes in `Authorization: Bearer KEY` (and `X-Admin-Key`, for either convention)."""
    import httpx

    d = Path(adapter_dir)
    name = name or d.resolve().name
    key = admin_key or os.environ.get("PEFTSERVE_ADMIN_KEY")
    headers = {"Authorization": f"Bearer {key}", "X-Admin-Key": key} if key else {}
    endpoint = url.rstrip("/") + "/adapters"
    try:
        with open(d / CONFIG_FILE, "rb") as cfg, open(d / WEIGHTS_FILE, "rb") as weights:
            files = {"adapter_config": (CONFIG_FILE, cfg, "application/json"),
                     "adapter_model": (WEIGHTS_FILE, weights, "application/octet-stream")}
            resp = httpx.post(endpoint, data={"name": name}, files=files, headers=headers, timeout=timeout)
    except OSError as exc:
        raise UploadError(f"cannot read adapter files in {d}: {exc}") from None
    except httpx.HTTPError as exc:
        raise UploadError(f"POST {endpoint}: {exc}") from None
    if resp.status_code >= 300:
        raise UploadError(f"POST {endpoint} -> HTTP {resp.status_code}: {resp.text[:500]}")
    return f"uploaded {name!r} to {endpoint} (HTTP {resp.status_code})"
