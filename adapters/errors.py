"""The one exception type raised for any bad adapter artifact.

Adapters come from untrusted users, so every rejection carries a stable machine-readable `code`
(for API clients and metrics), a human `message`, and an HTTP `status` hint for the server layer.
This module deliberately knows nothing about HTTP frameworks.
"""

from __future__ import annotations

# Machine-readable codes (snake_case). Other modules and the server may rely on these strings.
INVALID_SAFETENSORS = "invalid_safetensors"
INVALID_CONFIG = "invalid_config"
UNSUPPORTED_ADAPTER = "unsupported_adapter"
UNSUPPORTED_DTYPE = "unsupported_dtype"
SHAPE_MISMATCH = "shape_mismatch"
UNKNOWN_MODULE = "unknown_module"
MISSING_WEIGHTS = "missing_weights"
ADAPTER_TOO_LARGE = "adapter_too_large"
NON_FINITE = "non_finite"
BASE_MODEL_MISMATCH = "base_model_mismatch"
INVALID_ARTIFACT = "invalid_artifact"  # directory layout problems (missing files, symlinks out, ...)
NUMERICALLY_UNSTABLE = "adapter_numerically_unstable"  # finite weights that must overflow when served

# HTTP status hints: 422 = understood but semantically invalid, 413 = too large,
# 415 = a media type we never load (pickle / torch zip).
_DEFAULT_STATUS = {ADAPTER_TOO_LARGE: 413}


class AdapterError(Exception):
    """A rejected adapter artifact. Never wraps a crash: callers can show `message` to the user."""

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else _DEFAULT_STATUS.get(code, 422)

    def __repr__(self) -> str:
        return f"AdapterError(code={self.code!r}, status={self.status}, message={self.message!r})"

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form for API error bodies."""
        return {"code": self.code, "message": self.message, "status": self.status}
