"""The environment `make test` runs in is the one deploy/requirements.lock describes.

`make test` exports PEFTSERVE_LOCK; a plain `pytest` in another environment (a library user's)
skips this file, since its versions are deliberately theirs.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

LOCK = os.environ.get("PEFTSERVE_LOCK")
pytestmark = pytest.mark.skipif(not LOCK, reason="not run through `make test` (PEFTSERVE_LOCK unset)")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def _locked() -> dict[str, str]:
    pins = {}
    for line in Path(LOCK).read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _public(v: str) -> str:
    return v.split("+", 1)[0]  # torch 2.13.0+cpu is the lock's torch==2.13.0


def test_lock_pins_the_oracle_and_the_server_stack():
    pins = _locked()
    for name in ("torch", "transformers", "peft", "fastapi", "uvicorn", "pydantic", "safetensors"):
        assert name in pins, f"{name} is not pinned in {LOCK}"


def test_installed_versions_equal_the_lock():
    wrong = []
    for name, pinned in _locked().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            continue  # platform-specific pins (e.g. a CUDA runtime) need not be installed
        if _public(got) != pinned:
            wrong.append(f"{name} {got} (lock: {pinned})")
    assert not wrong, "installed versions differ from the lock: " + ", ".join(wrong) + " -- run `make install`"
