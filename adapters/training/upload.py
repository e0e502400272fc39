"""`--upload URL`: POST a trained adapter to a running peftserve.

One upload implementation: the output directory is checked with the one adapter-directory
reader (`adapters.artifact.read_adapter_dir`, what preload uses), then sent by
`peftserve.clients.PeftServeClient.upload_adapter` (retries on 429/503 honouring Retry-After,
typed errors carrying the server's code), wrapped so the trainer's
CLI gets one `UploadError` with a readable message.
"""

from __future__ import annotations

import os
from pathlib import Path


class UploadError(RuntimeError):
    pass


def upload_adapter(adapter_dir: str | Path, url: str, *, name: str | None = None, admin_key: str | None = None,
                   replace: bool = False, timeout: float = 120.0) -> str:
    """POST URL/adapters (multipart `name`, `adapter_config`, `adapter_model`) with the admin key
    (`--admin-key` or env PEFTSERVE_ADMIN_KEY) as a Bearer token."""
    from peftserve.adapters.artifact import read_adapter_dir
    from peftserve.adapters.errors import AdapterError
    from peftserve.clients import PeftServeClient, PeftServeError

    d = Path(adapter_dir)
    try:  # the output check: the one directory reader (preload's), so nothing preload would refuse is sent
        read_adapter_dir(d)
    except AdapterError as exc:
        raise UploadError(f"cannot read adapter files in {d}: [{exc.code}] {exc.message}") from None
    name = name or d.resolve().name
    key = admin_key or os.environ.get("PEFTSERVE_ADMIN_KEY")
    try:
        with PeftServeClient(url, admin_key=key, timeout=timeout) as client:
            info = client.upload_adapter(name, d, replace=replace)
    except OSError as exc:
        raise UploadError(f"cannot read adapter files in {d}: {exc}") from None
    except PeftServeError as exc:
        raise UploadError(f"POST {url.rstrip('/')}/adapters -> {exc}") from None
    warnings = info.get("warnings") or []
    note = f"; warnings: {'; '.join(warnings)}" if warnings else ""
    return f"uploaded {info.get('name', name)!r} version {info.get('version')} ({info.get('kind')}) to {url}{note}"
