"""Adapter registry: names -> immutable versions, over three tiers.

disk store (`--adapter-store`, survives restarts; every write is temp-dir + atomic rename)
  -> host memory (validated weights, LRU under a count and byte budget; evicted ones reload
     from disk on demand) -> device slots (server/engine/adapter_slots.py, engine thread).

A version is the adapter's content hash. Requests hold the `AdapterVersion` object they
resolved, so a replace or delete never changes what a running request computes: device slots
and KV prefixes are keyed by version, never by name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from peftserve.adapters.artifact import AdapterLimits, LoadedAdapter, load_adapter
from peftserve.adapters.config import AdapterKind
from peftserve.adapters.errors import AdapterError
from peftserve.adapters.spec import BaseModelSpec

from .combine import CombinationCache, check_items
from .errors import AdapterNotFound, ApiError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CONFIG_FILE, WEIGHTS_FILE, CURRENT_FILE = "adapter_config.json", "adapter_model.safetensors", "CURRENT"
SLOT_KINDS = {AdapterKind.LORA, AdapterKind.IA3, AdapterKind.BOTTLENECK}
PREFIX_KINDS = {AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING, AdapterKind.PREFIX_TUNING}


class AdapterExistsError(ApiError):
    def __init__(self, name: str):
        super().__init__("adapter_exists", f"adapter {name!r} already exists (use replace=true for a new version)", 409)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ApiError("invalid_adapter_name", "adapter names match [A-Za-z0-9][A-Za-z0-9._-]{0,63}", 422)
    return name


@dataclass(eq=False)
class AdapterVersion:
    """One immutable version of a named adapter; what a request holds while it runs."""

    name: str
    version: str  # content hash (hex)
    kind: AdapterKind
    nbytes: int
    created: float
    summary: dict  # rank, targets, virtual tokens... for GET /adapters
    loaded: LoadedAdapter | None = None  # host-memory tier; None when evicted to disk only
    requests: int = 0

    @property
    def key(self) -> str:
        return self.version

    @property
    def uses_slot(self) -> bool:
        return self.kind in SLOT_KINDS

    @property
    def uses_prefix(self) -> bool:
        return self.kind in PREFIX_KINDS

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.summary.get("num_virtual_tokens", 0)) if self.uses_prefix else 0


@dataclass
class RegistrySettings:
    store: Path
    limits: AdapterLimits = field(default_factory=AdapterLimits)
    max_cpu_adapters: int = 64
    max_cpu_bytes: int = 2 << 30


class AdapterRegistry:
    def __init__(self, spec: BaseModelSpec, settings: RegistrySettings, on_drop=None):
        self.spec = spec
        self.settings = settings
        self.store = Path(settings.store)
        self._current: dict[str, AdapterVersion] = {}
        self._memory: OrderedDict[str, AdapterVersion] = OrderedDict()  # version -> resident
        self._lock = threading.RLock()
        self._on_drop = on_drop or (lambda version: None)  # tell the device tier
        self.stats = {"memory_evictions": 0, "disk_loads": 0}
        self.combos = CombinationCache()
        (self.store / ".staging").mkdir(parents=True, exist_ok=True)

    # -- queries --------------------------------------------------------------------------
    def resolve(self, spec) -> AdapterVersion:
        """A name -> its current version; a list of {name, weight} -> the combined LoRA."""
        if isinstance(spec, (list, tuple)):
            items = [(_item(i, "name"), _item(i, "weight")) for i in spec]
            check_items(items)
            held = [self._acquire(n) for n, _ in items]
            combined = self.combos.get_or_make([h for _, h in held], [float(w) for _, w in items],
                                               self._combined_version)
            with self._lock:  # count only a combination that was accepted as a whole
                for ver, _ in held:
                    ver.requests += 1
            return combined
        ver, handle = self._acquire(spec)
        with self._lock:
            ver.requests += 1
        return handle

    def _acquire(self, name) -> tuple[AdapterVersion, AdapterVersion]:
        """-> (the registry's version, the request's own handle to it). The handle holds the
        weights itself: the host-memory LRU may evict the registry's copy (`loaded = None`) while
        the request still waits for a device slot, and a replaced version's files are gone."""
        with self._lock:
            ver = self._current.get(name) if isinstance(name, str) else None
            if ver is None:
                raise AdapterNotFound(str(name)[:80])
            self._ensure_loaded(ver)
            return ver, replace(ver)

    def list(self) -> list[AdapterVersion]:
        with self._lock:
            return sorted(self._current.values(), key=lambda v: v.name)

    def get(self, name: str) -> AdapterVersion:
        with self._lock:
            ver = self._current.get(name)
            if ver is None:
                raise AdapterNotFound(name)
            return ver

    def tier(self, ver: AdapterVersion) -> str:
        return "memory" if ver.loaded is not None else "disk"

    def __len__(self) -> int:
        return len(self._current)

    # -- mutations ------------------------------------------------------------------------
    def add(self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False) -> AdapterVersion:
        """Validate (outside the lock: slow), then commit to disk and memory atomically."""
        check_name(name)
        if not replace and name in self._current:  # cheap early answer; re-checked under lock
            raise AdapterExistsError(name)
        staging = self.store / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            # The staging write (and its fsync) overlaps validation: upload -> first token is
            # bounded by the slower of the two, not their sum. Nothing is committed unless both
            # succeed, and staging is removed either way.
            writing = _WRITER.submit(_write_pair, staging, config_bytes, weights_bytes)
            try:
                loaded = load_adapter(config_bytes, weights_bytes, self.spec, self.settings.limits)
            finally:
                write_error = writing.exception()
            if write_error is not None:
                raise write_error
            with self._lock:
                old = self._current.get(name)
                if old is not None and not replace:
                    raise AdapterExistsError(name)
                ver = self._new_version(name, loaded)
                if old is not None and old.version == ver.version:
                    return old  # identical content: nothing changes
                self._commit(name, ver.version, staging)
                self._current[name] = ver
                self._remember(ver)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            self._on_drop(old)
        log.info("adapter registered", extra={"adapter": name, "version": ver.version, "kind": ver.kind.value})
        return ver

    def delete(self, name: str) -> AdapterVersion:
        with self._lock:
            ver = self._current.pop(name, None)
            if ver is None:
                raise AdapterNotFound(name)
            self._memory.pop(ver.version, None)
            target = self.store / name
            if target.exists():
                trash = self.store / ".staging" / f"deleted-{uuid.uuid4().hex}"
                os.replace(target, trash)  # atomic: the name is gone from disk at once
                shutil.rmtree(trash, ignore_errors=True)
        self._on_drop(ver)
        return ver

    def load_store(self) -> list[str]:
        """At start: clean staging, load every adapter on disk; quarantine corrupt ones."""
        shutil.rmtree(self.store / ".staging", ignore_errors=True)
        (self.store / ".staging").mkdir(parents=True, exist_ok=True)
        loaded = []
        for entry in sorted(self.store.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir() or not NAME_RE.fullmatch(entry.name):
                continue
            try:
                version = (entry / CURRENT_FILE).read_text().strip()
                vdir = entry / version
                ver = self._new_version(entry.name, load_adapter((vdir / CONFIG_FILE).read_bytes(),
                                                                  (vdir / WEIGHTS_FILE).read_bytes(),
                                                                  self.spec, self.settings.limits))
                if ver.version != version:  # the version is the content hash: the files changed
                    raise ValueError(f"content hash {ver.version} does not match version {version!r}")
            except (OSError, AdapterError, ValueError) as exc:
                self._quarantine(entry, exc)
                continue
            with self._lock:
                self._current[entry.name] = ver
                self._remember(ver)
            loaded.append(entry.name)
        return loaded

    def import_dir(self, path: Path, name: str | None = None) -> AdapterVersion:
        """Register an adapter directory (e.g. `--adapters DIR` preload). Refuses pickles."""
        cfg, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not weights.is_file() or weights.is_symlink() or cfg.is_symlink():
            raise AdapterError("invalid_adapter", f"{path}: needs {CONFIG_FILE} + {WEIGHTS_FILE} (pickles are never loaded)")
        return self.add(name or path.name, cfg.read_bytes(), weights.read_bytes(), replace=True)

    # -- one store shared by several processes (server/ray_serve) -------------------------
    def refresh(self, name: str) -> AdapterVersion | None:
        """Bring `name` in line with the store's `CURRENT`, which another process sharing the
        directory may have replaced or deleted since this registry last looked. -> the current
        version, or None when the store no longer has the adapter (it is forgotten here too, so
        `resolve` answers 404). Costs one small file read when nothing changed; a changed version
        is loaded and its content hash checked against its name before it is served. Never writes
        to the store: concurrent readers need no lock, and quarantine stays `load_store`'s job."""
        check_name(name)
        adir = self.store / name
        for _ in range(3):  # a replace may remove the version dir while we read it: read CURRENT again
            try:
                version = (adir / CURRENT_FILE).read_text().strip()
            except FileNotFoundError:
                version = None
            with self._lock:
                old = self._current.get(name)
            if old is not None and old.version == version:
                return old
            if version is None:
                with self._lock:
                    if self._current.get(name) is old:
                        self._current.pop(name, None)
                        if old is not None:
                            self._memory.pop(old.version, None)
                if old is not None:
                    self._on_drop(old)
                return None
            vdir = adir / version
            try:
                loaded = load_adapter((vdir / CONFIG_FILE).read_bytes(), (vdir / WEIGHTS_FILE).read_bytes(),
                                      self.spec, self.settings.limits)
            except FileNotFoundError:
                continue
            ver = self._new_version(name, loaded)
            if ver.version != version:  # the version is the content hash: refuse to serve altered files
                raise ApiError("adapter_store_corrupt",
                               f"adapter {name!r}: content hash {ver.version} does not match version {version}", 500)
            self.stats["disk_loads"] += 1
            with self._lock:
                if self._current.get(name) is not old:  # another thread refreshed first
                    return self._current.get(name)
                self._current[name] = ver
                self._remember(ver)
            if old is not None:
                self._on_drop(old)
            log.info("adapter refreshed from the store", extra={"adapter": name, "version": version,
                                                                "previous": old.version if old else None})
            return ver
        raise ApiError("adapter_store_busy", f"adapter {name!r} kept changing while it was read; retry", 503)

    def store_names(self) -> list[str]:
        """Names the shared store holds now (directories with a `CURRENT`), whatever is loaded here."""
        return sorted(e.name for e in self.store.iterdir() if not e.name.startswith(".")
                      and NAME_RE.fullmatch(e.name) and (e / CURRENT_FILE).is_file())

    def release(self, name: str) -> None:
        """Drop `name`'s weights from host memory and its device slot but keep its entry, so the
        next request reloads it from the store. For an outside residency policy (Ray multiplexing
        bounds the adapters each replica holds); never touches the store."""
        with self._lock:
            ver = self._current.get(name)
            if ver is None:
                return
            self._memory.pop(ver.version, None)
            ver.loaded = None  # running requests keep their own reference to the weights
        self._on_drop(ver)

    def attach(self, async_engine) -> None:
        """Once an AsyncEngine runs, device-tier drops must happen on its thread."""
        drop = self._on_drop
        self._on_drop = lambda ver: async_engine.call(lambda engine: drop(ver))

    # -- internals ------------------------------------------------------------------------
    def _combined_version(self, loaded: LoadedAdapter, parts: list[AdapterVersion]) -> AdapterVersion:
        ver = self._new_version("+".join(v.name for v in parts), loaded)
        ver.summary["combined"] = True
        return ver

    def _new_version(self, name: str, loaded: LoadedAdapter) -> AdapterVersion:
        return AdapterVersion(name=name, version=loaded.content_hash[:16], kind=loaded.kind, nbytes=loaded.nbytes,
                              created=time.time(), summary=summarize(loaded), loaded=loaded)

    def _commit(self, name: str, version: str, staging: Path) -> None:
        adir = self.store / name
        new_name = not adir.exists()
        adir.mkdir(exist_ok=True)
        vdir = adir / version
        moved = False
        try:
            if not vdir.exists():
                os.replace(staging, vdir)
                moved = True
            _write_file(adir / CURRENT_FILE, version.encode())
        except BaseException:  # e.g. disk full: leave the store as it was
            if new_name:
                shutil.rmtree(adir, ignore_errors=True)
            elif moved:
                shutil.rmtree(vdir, ignore_errors=True)
            raise
        for old in adir.iterdir():  # keep only the current version on disk
            if old.is_dir() and old.name != version:
                shutil.rmtree(old, ignore_errors=True)

    def _remember(self, ver: AdapterVersion) -> None:
        self._memory[ver.version] = ver
        self._memory.move_to_end(ver.version)
        budget = self.settings
        while len(self._memory) > 1 and (len(self._memory) > budget.max_cpu_adapters or
                                         sum(v.nbytes for v in self._memory.values()) > budget.max_cpu_bytes):
            _, evicted = self._memory.popitem(last=False)
            evicted.loaded = None  # running requests keep their own reference to the weights
            self.stats["memory_evictions"] += 1

    def _ensure_loaded(self, ver: AdapterVersion) -> None:
        if ver.loaded is None:
            vdir = self.store / ver.name / ver.version
            ver.loaded = load_adapter((vdir / CONFIG_FILE).read_bytes(), (vdir / WEIGHTS_FILE).read_bytes(),
                                      self.spec, self.settings.limits)
            self.stats["disk_loads"] += 1
        self._remember(ver)

    def _quarantine(self, entry: Path, exc: Exception) -> None:
        qdir = self.store / ".quarantine"
        qdir.mkdir(exist_ok=True)
        dest = qdir / f"{entry.name}-{uuid.uuid4().hex[:8]}"
        os.replace(entry, dest)
        log.error("corrupt adapter quarantined", extra={"adapter": entry.name, "error": str(exc), "moved_to": str(dest)})


_WRITER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-store")


def _write_pair(staging: Path, config_bytes: bytes, weights_bytes: bytes) -> None:
    _write_file(staging / CONFIG_FILE, config_bytes)
    _write_file(staging / WEIGHTS_FILE, weights_bytes)


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def version_info(reg: AdapterRegistry, ver: AdapterVersion, device_resident: bool = False) -> dict:
    return {
        "name": ver.name, "version": ver.version, "kind": ver.kind.value, "size_bytes": ver.nbytes,
        "tier": "device" if device_resident else reg.tier(ver), "requests": ver.requests,
        "created": ver.created, **ver.summary,
    }


def summarize(loaded: LoadedAdapter) -> dict:
    """What GET /adapters shows of an adapter besides name/version/size."""
    w, kind = loaded.weights, loaded.kind
    if kind is AdapterKind.LORA:
        ranks = sorted({m.rank for m in w.modules.values()})
        targets = sorted({p.rsplit(".", 1)[-1] for p in w.modules})
        return {"rank": max(ranks), "ranks": ranks, "target_modules": targets, "num_modules": len(w.modules)}
    if kind is AdapterKind.IA3:
        return {"target_modules": sorted({p.rsplit(".", 1)[-1] for p in w.modules}), "num_modules": len(w.modules)}
    if kind is AdapterKind.BOTTLENECK:
        cfg = loaded.config
        return {"placement": cfg.placement, "num_layers": len(w.layers)}
    return {"num_virtual_tokens": int(w.num_virtual_tokens)}


def _item(obj, key: str):
    value = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    if value is None:
        raise ApiError("invalid_adapter_combination", f"each combination item needs {key!r}", 422)
    return value
