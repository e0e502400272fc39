"""Strict JSON for untrusted files: duplicate keys and NaN/Infinity constants are errors.

`json.loads` silently keeps the last duplicate key, so two readers of one file could disagree
on what it says; both the safetensors header and adapter_config.json are parsed through here.
"""

from __future__ import annotations

import json
from typing import Any, Callable


def loads_strict(text: str, what: str, error: Callable[[str], Exception]) -> Any:
    """Parse `text`; raise `error(message)` on duplicate keys (any nesting level) or NaN/Infinity."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"duplicate key {key!r} in {what}")
            out[key] = value
        return out

    def reject_constant(name: str) -> Any:
        raise error(f"non-standard JSON constant {name} in {what}")

    return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=reject_constant)
