"""Adapter management routes (admin key): upload, list, inspect, delete.

Uploads are multipart (`name`, optional `replace`, files `adapter_config` + `adapter_model`).
The body-size middleware caps the request while it streams in; the form is parsed in memory as
it arrives (server/api/multipart.py: python-multipart's parser, parts as views into the chunks,
no copy: starlette's form parser copied a 7.4 MB part three times, ~13 ms of an upload -> first
token), and the weights part goes into the registry's streamed upload: hashed and written to
disk while the transfer is still under way (server/streamed_upload.py). Validation runs in a
worker thread; the registry commits to disk atomically only after every check passed, so a
refused upload leaves registry and disk exactly as they were.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from peftserve.adapters.errors import AdapterTooLarge

from ..errors import (AdaptersDisabled, BadRequest, InsufficientStorage, InvalidRequest, MissingFile,
                      UnsupportedMediaType)
from ..registry import check_name, version_info
from ..state import get_state
from .auth import require_admin_key
from ..streamed_upload import StreamOverflow
from .multipart import FilePart, FormError, FormParser, parse_form

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(require_admin_key)])


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _registry(request: Request):
    reg = get_state(request).registry
    if reg is None:
        raise AdaptersDisabled()
    return reg


def _info(request: Request, ver) -> dict:
    state = get_state(request)
    # device residency as of the engine's last published snapshot (never the slot tables themselves)
    resident = ver.key in state.engine.snapshot.device_versions
    return version_info(state.registry, ver, device_resident=resident)


_FIELDS = ("name", "replace", "adapter_config", "adapter_model")


def _refuse_ambiguous_parts(form) -> None:
    """A part given twice is ambiguous (which `name`? which weights?): 422, never pick one.
    A part we do not know is refused like the multipart parser refuses surplus parts (400)."""
    for field in _FIELDS:
        count = len(form.getlist(field))
        if count > 1:
            raise InvalidRequest(f"multipart field {field!r} appears {count} times; give it once")
    unknown = sorted(set(form.keys()) - set(_FIELDS))
    if unknown:
        raise BadRequest(f"unexpected multipart part {unknown[0][:40]!r} (expected {', '.join(_FIELDS)})")


def _read_upload(form, field: str, limit: int) -> memoryview | bytes:
    part = form.get(field)
    if not isinstance(part, FilePart):
        raise MissingFile(f"multipart file field {field!r} is required")
    if len(part.data) > limit:
        raise AdapterTooLarge(f"{field} exceeds {limit} bytes")
    return part.data


def _declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


async def _receive_form(request: Request, reg, ctype: str):
    """-> (form, the StreamedUpload the weights part went into or None, when the body was in).

    With a declared length (the body-size middleware has bounded it), the form is parsed as the
    body arrives and the weights part goes into the registry's streamed upload, hashed and
    written to disk during the transfer (server/streamed_upload.py). A chunked body is read
    whole, then parsed (its weights are hashed and stored by `add` as before)."""
    declared = _declared_length(request)
    streamed = None

    def open_sink(items):
        nonlocal streamed
        streamed = reg.prepare_upload(declared)
        config = next((v.data for k, v in items if k == "adapter_config" and isinstance(v, FilePart)), None)
        streamed.begin(None if config is None else bytes(config))  # hashed along if it came first
        return streamed

    try:  # limits leave room for one repeat of each part, so that a duplicate is reported as such
        if declared is None:
            body = await request.body()
            return parse_form(body, ctype, max_files=4, max_fields=4), None, time.perf_counter()
        parser = FormParser(ctype, max_files=4, max_fields=4, sink_field="adapter_model", open_sink=open_sink)
        async for chunk in request.stream():
            parser.feed(chunk)
        received = time.perf_counter()
        return parser.finish(), streamed, received
    except (FormError, StreamOverflow) as exc:
        await _discard(streamed)
        raise BadRequest(str(exc)) from None
    except BaseException:
        await _discard(streamed)
        raise


def _raise_storage_error(exc: OSError):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise InsufficientStorage("the adapter store is out of space") from None
    raise exc


async def _discard(streamed) -> None:
    """Remove what a streamed upload left in staging before the answer goes out (a refused
    upload leaves the disk as it was); the clean-up runs even if this wait is cancelled."""
    if streamed is not None:
        await asyncio.wrap_future(streamed.discard())


@router.post("/adapters", status_code=201, summary="Upload a PEFT adapter (multipart)")
async def upload(request: Request):
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise UnsupportedMediaType("POST /adapters takes multipart/form-data (name, adapter_config, adapter_model)")
    reg = _registry(request)
    metrics = get_state(request).metrics
    streamed = None
    try:
        # The handling time (peftserve_adapter_upload_seconds) starts once the upload has arrived
        # (`t0`), so it measures our work, not the client's network.
        try:
            form, streamed, t0 = await _receive_form(request, reg, ctype)
        except OSError as exc:  # staging for the stream could not be made: nothing was committed
            _raise_storage_error(exc)
        _refuse_ambiguous_parts(form)
        for plain in ("name", "replace"):
            if isinstance(form.get(plain), FilePart):
                raise InvalidRequest(f"{plain} must be a plain form field, not a file part")
        name = check_name(form.get("name") or "")
        replace_raw = (form.get("replace") or "").strip().lower()
        if replace_raw not in _TRUE | _FALSE:
            raise InvalidRequest("replace must be true or false")
        limit = reg.settings.limits.max_bytes
        config_bytes = bytes(_read_upload(form, "adapter_config", 1 << 20))
        weights_bytes = _read_upload(form, "adapter_model", limit)  # a view into the body: no copy
        try:
            ver = await run_in_threadpool(reg.add, name, config_bytes, weights_bytes, replace_raw in _TRUE, streamed)
        except OSError as exc:  # the registry already cleaned up: nothing was committed
            _raise_storage_error(exc)
    except BaseException as exc:
        if isinstance(exc, Exception) and metrics is not None and hasattr(metrics, "adapter_upload"):
            metrics.adapter_upload("rejected", getattr(exc, "code", type(exc).__name__))
        await _discard(streamed)  # the answer waits: a refused upload leaves the disk as it was
        raise
    if streamed is not None:  # its staging directory is the store's now: no disk work is left
        streamed.release()
    if metrics is not None and hasattr(metrics, "adapter_upload"):
        metrics.adapter_upload("ok", "", len(weights_bytes), time.perf_counter() - t0)
    log.info("adapter uploaded", extra={"adapter": ver.name, "version": ver.version, "bytes": len(weights_bytes)})
    if ver.warnings:
        log.warning("adapter accepted with warnings", extra={"adapter": ver.name, "warnings": list(ver.warnings)})
    return JSONResponse(_info(request, ver), status_code=201)


@router.get("/adapters", summary="List registered adapters")
async def list_adapters(request: Request):
    reg = _registry(request)
    return {"adapters": [_info(request, v) for v in reg.list()]}


@router.get("/adapters/{name}", summary="One adapter's kind, rank, targets, size, version, tier, requests")
async def get_adapter(name: str, request: Request):
    reg = _registry(request)
    return _info(request, reg.get(check_name(name)))


@router.delete("/adapters/{name}", summary="Delete an adapter (in-flight requests finish on it)")
async def delete_adapter(name: str, request: Request):
    reg = _registry(request)
    ver = await run_in_threadpool(reg.delete, check_name(name))
    return {"deleted": ver.name, "version": ver.version}
