"""vLLM's adapter operations: `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter` (admin key).

Routers, LoRA controllers and the Gateway API Inference Extension call these with a path *on the
server*; that is a file-system read on behalf of a client, so it is confined: the adapter dir
must resolve (real path: every symlink and `..` followed) inside one of `--allowed-adapter-dirs`,
and its two files are opened with O_NOFOLLOW after that check, so neither a symlinked dir nor a
symlinked file leads outside. With no allowed dir configured, loading is refused (403). Any
adapter kind loads this way (the name says LoRA because vLLM only has LoRA); the adapter then
serves under `model = lora_name` and is listed by `/v1/models`. Unload = delete from the
registry (in-flight requests finish on the version they hold).

Responses follow vLLM: 200 with a plain-text "Success: ..." line; errors in OpenAI's shape.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from peftserve.adapters.artifact import CONFIG_NAME as CONFIG_FILE
from peftserve.adapters.artifact import WEIGHTS_NAME as WEIGHTS_FILE
from peftserve.adapters.errors import AdapterTooLarge

from ..errors import AdaptersDisabled, UnsupportedMediaType
from ..state import get_state
from .auth import require_admin_key
from .generate import is_json_content_type
from .openai_errors import ParamError, invalid
from .openai_schemas import load_json_object, screen

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(require_admin_key)])



def confine(path: str, allowed: list[str]) -> Path:
    """The real path of `path` if it lies inside one of `allowed` (also real paths), else 403."""
    if not allowed:
        raise ParamError("adapter_loading_disabled", "loading adapters from server paths is disabled "
                         "(start the server with --allowed-adapter-dirs)", 403, "lora_path")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise invalid("lora_path", "lora_path: a non-empty path is required")
    real = Path(os.path.realpath(path))
    for root in allowed:
        root_real = os.path.realpath(root)
        if os.path.commonpath([root_real, str(real)]) == root_real and str(real) != root_real:
            return real
    raise ParamError("path_not_allowed", "lora_path: outside the allowed adapter directories", 403, "lora_path")


def _read_nofollow(path: Path, limit: int) -> bytes:
    """Read a regular file, refusing a symlink at the last component (the dir is already real)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ParamError("path_not_allowed", f"lora_path: {path.name} is a symlink", 403, "lora_path") from None
        raise ParamError("adapter_not_found", f"lora_path: {path.name} not found", 404, "lora_path") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise invalid("lora_path", f"lora_path: {path.name} is not a regular file", 400)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise AdapterTooLarge(f"{path.name} exceeds {limit} bytes")
    return data


def read_adapter_dir(real: Path, limits) -> tuple[bytes, bytes]:
    if not real.is_dir():
        raise ParamError("adapter_not_found", "lora_path: not a directory", 404, "lora_path")
    return (_read_nofollow(real / CONFIG_FILE, limits.max_config_bytes),
            _read_nofollow(real / WEIGHTS_FILE, limits.max_bytes))


async def _body(request: Request, served: set[str]) -> dict:
    if not is_json_content_type(request.headers.get("content-type")):
        raise UnsupportedMediaType("Content-Type must be application/json")
    obj = screen(load_json_object(await request.body()), served, {"load_inplace": lambda v: v in (None, False)})
    name = obj.get("lora_name")
    if not isinstance(name, str) or not name:
        raise invalid("lora_name", "lora_name: a non-empty string is required")
    return obj


def _registry(request: Request):
    reg = get_state(request).registry
    if reg is None:
        raise AdaptersDisabled()
    return reg


@router.post("/v1/load_lora_adapter", summary="vLLM: load an adapter from an allowed server directory")
async def load_lora_adapter(request: Request):
    state = get_state(request)
    reg = _registry(request)
    obj = await _body(request, {"lora_name", "lora_path"})
    name = obj["lora_name"]
    if name in (getattr(state.settings, "served_model_names", ()) or (state.model_name,)):
        raise invalid("lora_name", "lora_name: that is the base model's id", 400)
    real = confine(obj.get("lora_path"), list(getattr(state.settings, "allowed_adapter_dirs", ()) or ()))
    config, weights = await run_in_threadpool(read_adapter_dir, real, reg.settings.limits)
    ver = await run_in_threadpool(reg.add, name, config, weights, False)
    log.info("adapter loaded from path", extra={"adapter": name, "path": str(real), "version": ver.version})
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", summary="vLLM: unload (delete) an adapter")
async def unload_lora_adapter(request: Request):
    reg = _registry(request)
    obj = await _body(request, {"lora_name", "lora_int_id"})
    name = obj["lora_name"]
    await run_in_threadpool(reg.delete, name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
