"""Entry points: untrusted adapter artifact (config bytes + safetensors bytes, or a directory)
-> LoadedAdapter with validated, typed, float32 CPU weights. No serving math here."""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .admission import check_numerics
from .config import (
    DEFAULT_MAX_RANK,
    DEFAULT_MAX_VIRTUAL_TOKENS,
    MAX_CONFIG_BYTES,
    PROMPT_LEARNING_KINDS,
    AdapterKind,
    parse_adapter_config,
)
from .errors import (
    BASE_MODEL_MISMATCH,
    INVALID_ARTIFACT,
    UNSUPPORTED_ADAPTER,
    AdapterError,
    AdapterTooLarge,
    NeverLoadedFormat,
)
from .ia3 import load_ia3
from .lora import load_lora
from .prompt_learning import load_prompt_learning
from .safetensors_io import borrowed_safetensors, read_safetensors
from .spec import BaseModelSpec

# The two files of an adapter directory (PEFT's save_pretrained names): the one definition.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Pickle-based weight files PEFT/torch may write. Their presence never leads to loading them.
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")


@dataclass(frozen=True)
class AdapterLimits:
    max_bytes: int = 256 * 1024 * 1024  # adapter_model.safetensors size
    max_config_bytes: int = MAX_CONFIG_BYTES
    max_header_bytes: int = 1 << 20  # safetensors JSON header
    max_rank: int = DEFAULT_MAX_RANK
    max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS
    regex_budget_s: float = 1.0  # total time for evaluating config regexes (ReDoS guard)


@dataclass(frozen=True, eq=False)  # holds tensors: identity semantics
class LoadedAdapter:
    kind: AdapterKind
    config: Any  # LoraConfig | PromptLearningConfig | IA3Config | BottleneckConfig
    weights: Any  # LoraAdapterWeights | SoftPromptWeights | PrefixWeights | IA3Weights | BottleneckWeights
    content_hash: str  # hex sha256 over (config bytes, weights bytes); see content_hash()
    nbytes: int  # bytes of the materialised weights
    warnings: tuple[str, ...] = ()


def content_hash(config_bytes: bytes, weights_bytes: bytes | memoryview) -> str:
    """sha256 of the config length (8 bytes LE), the config, then the weights: the length prefix
    makes the (config, weights) split unambiguous."""
    h = content_hasher(config_bytes)
    h.update(weights_bytes)
    return h.hexdigest()


def content_hasher(config_bytes: bytes):
    """The sha256 of `content_hash` fed up to the weights (which may then be fed in pieces)."""
    h = hashlib.sha256()
    h.update(len(config_bytes).to_bytes(8, "little"))
    h.update(config_bytes)
    return h


def _short_name(name: str) -> str:
    # "org/Model" and "/models/Model/" both name "model": compare the last path component.
    return name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


def _base_model_warning(cfg: Any, spec: BaseModelSpec, strict: bool) -> str | None:
    wanted = getattr(cfg, "base_model_name_or_path", None)
    if not wanted or not spec.name_or_path or _short_name(wanted) == _short_name(spec.name_or_path):
        return None
    message = f"adapter was trained on {wanted!r}, this server serves {spec.name_or_path!r}"
    if strict:
        raise AdapterError(BASE_MODEL_MISMATCH, message)
    return message


def _nbytes(weights: Any) -> int:
    if hasattr(weights, "nbytes"):
        return int(weights.nbytes)
    if hasattr(weights, "to_tensors"):  # bottleneck weights
        return sum(t.numel() * t.element_size() for t in weights.to_tensors().values())
    return 0


def _load_bottleneck(cfg: Any, tensors: dict[str, torch.Tensor], spec: BaseModelSpec) -> Any:
    try:
        from peftserve.adapters.bottleneck import load_bottleneck
    except ImportError:
        raise AdapterError(UNSUPPORTED_ADAPTER, "bottleneck adapters are not available in this build") from None
    return load_bottleneck(cfg, tensors, spec)


def load_adapter(config_bytes: bytes, weights_bytes: bytes | bytearray | memoryview, spec: BaseModelSpec,
                 limits: AdapterLimits | None = None, *, strict_base: bool = False,
                 hashing: Future | None = None) -> LoadedAdapter:
    """Parse + validate an adapter against the served base model. Raises AdapterError only.

    `hashing`: a `content_hash(config_bytes, weights_bytes)` of these very bytes already under
    way elsewhere (the registry computes it beside its store write); computed here otherwise."""
    limits = limits or AdapterLimits()
    weights_size = memoryview(weights_bytes).nbytes
    if weights_size > limits.max_bytes:  # cheapest check first
        raise AdapterTooLarge(f"weights are {weights_size} bytes, limit is {limits.max_bytes}")
    cfg = parse_adapter_config(bytes(config_bytes), max_rank=limits.max_rank,
                               max_virtual_tokens=limits.max_virtual_tokens,
                               max_config_bytes=limits.max_config_bytes)
    kind = AdapterKind(getattr(cfg, "kind", None) or getattr(cfg, "peft_type", None))
    warnings = list(getattr(cfg, "warnings", ()))
    mismatch = _base_model_warning(cfg, spec, strict_base)
    if mismatch:
        warnings.append(mismatch)

    # The content hash (sha256 releases the GIL) runs beside parsing and validation (torch kernels
    # release it too): upload -> first token pays the longer of the two, not their sum.
    own = hashing is None
    if own:
        hashing = _HASHER.submit(content_hash, bytes(config_bytes), weights_bytes)
    try:
        weights = _parse_weights(kind, cfg, weights_bytes, spec, limits)
    except BaseException:
        if own:
            hashing.cancel()
        raise
    return LoadedAdapter(kind=kind, config=cfg, weights=weights, content_hash=hashing.result(),
                         nbytes=_nbytes(weights), warnings=tuple(warnings))


_HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-hash")


def _parse_weights(kind: AdapterKind, cfg: Any, weights_bytes, spec: BaseModelSpec, limits: AdapterLimits) -> Any:
    bounds = {"max_bytes": limits.max_bytes, "max_header_bytes": limits.max_header_bytes}
    if kind is AdapterKind.LORA:  # copies every tensor itself: read without a copy of our own
        with borrowed_safetensors(weights_bytes, **bounds) as tensors:
            weights = load_lora(cfg, tensors, spec, regex_budget_s=limits.regex_budget_s)
    else:  # these loaders keep the tensors they are given: they get owned copies
        tensors = read_safetensors(weights_bytes, **bounds)
        if kind is AdapterKind.IA3:
            weights = load_ia3(cfg, tensors, spec, regex_budget_s=limits.regex_budget_s)
        elif kind in PROMPT_LEARNING_KINDS:
            weights = load_prompt_learning(cfg, tensors, spec)
        else:
            weights = _load_bottleneck(cfg, tensors, spec)
    check_numerics(kind, weights, cfg, spec.dtype)  # finite but overflowing weights -> 422
    return weights


# ----------------------------------------------------------------------------------------------
# directories


def read_inside(root: Path, name: str, max_bytes: int) -> bytes | None:
    """Read root/name if it exists, refusing symlinks that leave root and non-regular files (a
    FIFO would block), and reading at most max_bytes + 1 (a file grown on disk is never slurped)."""
    path = root / name
    if not os.path.lexists(path):
        return None
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise AdapterError(INVALID_ARTIFACT, f"{name} is a symlink pointing outside the adapter directory")
    try:
        # O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: the resolved path has no symlink left.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise AdapterError(INVALID_ARTIFACT, f"cannot open {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # of what we actually opened, not of a path that may have changed
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(INVALID_ARTIFACT, f"{name} is not a regular file")
        if st.st_size > max_bytes:
            raise AdapterTooLarge(f"{name} is {st.st_size} bytes, limit is {max_bytes}")
        chunks, total = [], 0
        while total <= max_bytes:  # read at most max_bytes + 1: notice a file that grew after fstat
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise AdapterTooLarge(f"{name} exceeds {max_bytes} bytes")
    return data


def read_adapter_dir(path: str | os.PathLike, limits: AdapterLimits | None = None) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of a PEFT save_pretrained directory: the one directory reader
    (preload, the registry's `import_dir`, `load_adapter_dir`). Bounded reads of regular files
    inside the directory only; pickle weights (`adapter_model.bin`, ...) are never opened: a
    directory holding only those is refused with `NeverLoadedFormat` (invalid_safetensors, 415).
    """
    limits = limits or AdapterLimits()
    root = Path(os.path.realpath(path))
    if not root.is_dir():
        raise AdapterError(INVALID_ARTIFACT, f"{os.fspath(path)!r} is not a directory")
    weights = read_inside(root, WEIGHTS_NAME, limits.max_bytes)
    if weights is None:
        if any(os.path.lexists(root / n) for n in _PICKLE_NAMES):
            raise NeverLoadedFormat("only pickle weights (adapter_model.bin) found: pickle is "
                                    f"never loaded; provide {WEIGHTS_NAME}")
        raise AdapterError(INVALID_ARTIFACT, f"{WEIGHTS_NAME} not found in adapter directory")
    config = read_inside(root, CONFIG_NAME, limits.max_config_bytes)
    if config is None:
        raise AdapterError(INVALID_ARTIFACT, f"{CONFIG_NAME} not found in adapter directory")
    return config, weights


def load_adapter_dir(path: str | os.PathLike, spec: BaseModelSpec, limits: AdapterLimits | None = None,
                     *, strict_base: bool = False) -> LoadedAdapter:
    """Read (`read_adapter_dir`) and validate (`load_adapter`) an adapter directory."""
    config, weights = read_adapter_dir(path, limits)
    return load_adapter(config, weights, spec, limits, strict_base=strict_base)
