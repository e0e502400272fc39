"""The exception types raised for any bad adapter artifact (or adapter combination).

Adapters come from untrusted users, so every rejection carries a stable machine-readable `code`
(for API clients and metrics) and a human `message`. This package knows nothing about HTTP: the
class says what kind of rejection it is, and the API edge maps each class to its HTTP status
in its one error table (`HTTP_ERRORS` in the server's errors module): an `AdapterError` is 422
(understood but semantically invalid), `AdapterTooLarge` 413, `NeverLoadedFormat` 415.
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
INVALID_COMBINATION = "invalid_adapter_combination"


class AdapterError(Exception):
    """A rejected adapter artifact. Never wraps a crash: callers can show `message` to the user."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class AdapterTooLarge(AdapterError):
    """A file or the weights exceed a configured size limit."""

    def __init__(self, message: str) -> None:
        super().__init__(ADAPTER_TOO_LARGE, message)


class NeverLoadedFormat(AdapterError):
    """Weights in a format peftserve never loads (pickle, torch zip): refused unopened."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_SAFETENSORS, message)


class InvalidCombination(AdapterError):
    """A per-request weighted combination of adapters that cannot be built."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_COMBINATION, message)
