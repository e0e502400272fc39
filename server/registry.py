"""Adapter registry: names -> immutable versions, over three tiers.

disk store (`--adapter-store`, survives restarts; every write is temp-dir + atomic rename)
  -> host memory (validated weights, LRU under a count and byte budget; evicted ones reload
     from disk on demand) -> device slots (the `DeviceTier`: server/runtime/, engine thread).

A version is the adapter's content hash. Requests hold the `AdapterVersion` object they
resolved, so a replace or delete never changes what a running request computes: device slots
and KV prefixes are keyed by version, never by name.

Store integrity: every load from disk (start-up and reload after host-memory eviction) checks the
files' content hash against the version id before parsing. A mismatch (file replaced), a missing
version directory or unreadable/corrupt files quarantine the adapter (moved to `.quarantine`,
gone from the current map) and answer 503 `adapter_unavailable`: the store failed, not the client,
and no other weights are ever served under that version.

Bounded host memory: weighted combinations live in the same LRU and byte budget as adapters
(`max_cpu_bytes`), their number is capped (`max_combinations`), and replacing or deleting a
member frees every combination built from it.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from peftserve.adapters.admission import check_numerics
from peftserve.adapters.artifact import CONFIG_NAME as CONFIG_FILE
from peftserve.adapters.artifact import WEIGHTS_NAME as WEIGHTS_FILE
from peftserve.adapters.artifact import (AdapterLimits, LoadedAdapter, content_hash, load_adapter, read_adapter_dir,
                                         read_inside)
from peftserve.adapters.config import AdapterKind
from peftserve.adapters.errors import AdapterError
from peftserve.adapters.host_arena import ARENA
from peftserve.adapters.spec import BaseModelSpec

from peftserve.adapters.combine import CombinationCache, check_items, combination_key
from peftserve.adapters.errors import InvalidCombination

from .durable_write import sync_dir, write_all_durable, write_durable
from .engine.intra_op import hands_back
from .errors import (AdapterExistsError, AdapterNotFound, AdapterStoreBusy, AdapterStoreCorrupt,  # noqa: F401
                     AdapterUnavailable, CombinationCapacity, InvalidAdapterName)
from .runtime.kinds import KINDS
from .streamed_upload import StreamedUpload

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CURRENT_FILE = "CURRENT"


class DeviceTier(Protocol):
    """Where the registry reports versions that must leave the device (replaced, deleted,
    quarantined, released). Only the key travels: a queued drop never holds a version's weights
    (a dropped combination would otherwise count as live against max_combinations)."""

    def drop(self, key: str) -> None: ...

    # Optional: `stage(ver)`, called from request and upload threads (never the engine thread),
    # precomputes what installing `ver` would copy, so the engine thread only installs it.


class NoDevice:
    """A registry without a device tier (host-side tools and tests)."""

    def drop(self, key: str) -> None:
        pass


class StoreError(Exception):
    """A stored version cannot be loaded; `reason` labels peftserve_adapter_store_errors_total."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidAdapterName()
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
    warnings: tuple[str, ...] = ()  # shown to the uploader (e.g. trained on another base model)
    members: tuple[str, ...] = ()  # names of the combined adapters; () for a stored adapter

    @property
    def is_combination(self) -> bool:
        return bool(self.members)

    @property
    def key(self) -> str:
        return self.version

    @property
    def num_virtual_tokens(self) -> int:
        """KV prefix length of a prompt adapter (its summary says so); 0 for weight adapters."""
        return int(self.summary.get("num_virtual_tokens", 0))


@dataclass
class RegistrySettings:
    store: Path
    limits: AdapterLimits = field(default_factory=AdapterLimits)
    # Host memory is bounded by bytes: `max_cpu_bytes` (adapters + combinations) is the budget that
    # binds; the count cap only guards against pathological numbers of tiny adapters. (1,000 r16
    # q,k,v,o LoRAs of the default model are 7.4 GB in float32; 2 GiB holds ~290 of them, or all
    # 1,000 r8 q,v ones at 1.8 MB each.)
    max_cpu_adapters: int = 100_000  # stored adapters resident in host memory
    max_cpu_bytes: int = 2 << 30  # adapters + combinations resident in host memory
    max_combinations: int = 16  # live weighted combinations (each also counts in max_cpu_bytes)
    strict_base: bool = False  # refuse (422 base_model_mismatch) adapters trained on another base model


class AdapterRegistry:
    def __init__(self, spec: BaseModelSpec, settings: RegistrySettings, device: DeviceTier | None = None):
        self.spec = spec
        self.settings = settings
        self.store = Path(settings.store)
        self._current: dict[str, AdapterVersion] = {}
        self._memory: OrderedDict[str, AdapterVersion] = OrderedDict()  # version -> resident (LRU first)
        self._quarantined: dict[str, AdapterVersion] = {}  # name -> version whose files failed at runtime
        self._lock = threading.RLock()
        self._loading: dict[str, Future] = {}  # version -> its in-flight load from disk (one per version)
        self.device = device or NoDevice()  # told (by version key) what must leave the device
        self.stats = {"memory_evictions": 0, "disk_loads": 0, "combination_evictions": 0}
        self.store_errors: dict[str, int] = {}  # reason -> count (peftserve_adapter_store_errors_total)
        self.combos = CombinationCache()
        # every combination object still alive: cached, or held by a queued/running request after
        # its eviction from the cache. What bounds a flood of concurrent distinct combinations.
        self._live_combos: weakref.WeakSet[AdapterVersion] = weakref.WeakSet()
        (self.store / ".staging").mkdir(parents=True, exist_ok=True)

    # -- queries --------------------------------------------------------------------------
    @hands_back  # runs on a worker thread: torch work there must not keep an OpenMP team
    def resolve(self, selector) -> AdapterVersion:
        """A name -> its current version; a list of {name, weight} -> the combined LoRA."""
        if isinstance(selector, (list, tuple)):
            items = [(_item(i, "name"), _item(i, "weight")) for i in selector]
            check_items(items)
            held = [self._acquire(n) for n, _ in items]
            combined = self._combination([h for _, h in held], [float(w) for _, w in items])
            with self._lock:  # count only a combination that was accepted as a whole
                for ver, _ in held:
                    ver.requests += 1
            return combined
        ver, handle = self._acquire(selector)
        with self._lock:
            ver.requests += 1
        self._stage(handle)  # this request's thread, not the engine's, prepares the install
        return handle

    def _acquire(self, name) -> tuple[AdapterVersion, AdapterVersion]:
        """-> (the registry's version, the request's own handle to it). The handle holds the
        weights itself: the host-memory LRU may evict the registry's copy (`loaded = None`) while
        the request still waits for a device slot, and a replaced version's files are gone.

        A version evicted to disk is read back *outside* the registry lock (read, hash, validate:
        milliseconds to tens of them), one load per version: concurrent requests for the same
        cold version wait on that load's future, requests for resident versions (and loads of
        other versions) go on meanwhile. The calling thread is a request's own worker (the API
        resolves in a thread pool), never the engine thread, so the load starts as soon as the
        request arrives, before it is queued."""
        while True:
            with self._lock:
                ver = self._current.get(name) if isinstance(name, str) else None
                if ver is None:
                    if isinstance(name, str) and name in self._quarantined:
                        raise AdapterUnavailable(name)
                    raise AdapterNotFound(str(name)[:80])
                if ver.loaded is not None:
                    self._remember(ver)
                    handle = replace(ver)
                    break
                load = self._loading.get(ver.version)
                owner = load is None
                if owner:
                    load = self._loading[ver.version] = Future()
            if owner:
                loaded = self._load_cold(ver, load)
            else:
                try:
                    loaded = load.result()
                except StoreError:
                    loaded = None
            if loaded is _RETRY:  # replaced or deleted while its files were read: resolve again
                continue
            if loaded is None:
                raise AdapterUnavailable(ver.name)
            handle = replace(ver, loaded=loaded)
            break
        return ver, handle

    @hands_back  # runs on a worker thread: torch work there must not keep an OpenMP team
    def _stage(self, ver: AdapterVersion) -> None:
        stage = getattr(self.device, "stage", None)
        if stage is None or ver.is_combination:
            return
        try:
            stage(ver)
        except Exception:  # only a head start: the install does it again and reports a failure
            log.warning("staging an adapter for its install failed", exc_info=True,
                        extra={"adapter": ver.name, "version": ver.version})

    def _load_cold(self, ver: AdapterVersion, load: Future):
        """Load `ver` from the store (caller owns `load`, the version's in-flight future; no lock
        held). -> its weights; None when the store failed (quarantined); _RETRY when the name moved
        on meanwhile (replace/delete): its files may be gone, and that is no store fault."""
        dropped: list[AdapterVersion] = []
        try:
            loaded = self._load_version(ver.name, ver.version)
        except StoreError as exc:
            with self._lock:
                self._loading.pop(ver.version, None)
                if self._current.get(ver.name) is ver:
                    dropped = self._quarantine_version(ver, exc)
                    result = None
                else:
                    result = _RETRY
            load.set_exception(exc)
            for gone in dropped:  # outside the lock: the device tier runs on the engine thread
                self._on_drop(gone)
            return result
        except BaseException as exc:  # never leave waiters hanging on a future nobody resolves
            with self._lock:
                self._loading.pop(ver.version, None)
            load.set_exception(exc)
            raise
        with self._lock:
            self._loading.pop(ver.version, None)
            self.stats["disk_loads"] += 1
            if self._current.get(ver.name) is ver:
                if ver.loaded is None:
                    ver.loaded = loaded
                self._remember(ver)
        load.set_result(loaded)
        return loaded

    def _combination(self, members: list[AdapterVersion], weights: list[float]) -> AdapterVersion:
        """The cached combination of these member versions and weights, made (outside the lock)
        and cached when missing. A member replaced or deleted meanwhile: served, not cached."""
        key = combination_key(members, weights)
        with self._lock:
            ver = self.combos.get(key)
            if ver is not None:
                if ver.version in self._memory:
                    self._memory.move_to_end(ver.version)
                return ver
            self._make_room_for_combination(_combined_nbytes(members))
        ver = self.combos.make(members, weights, self._combined_version)
        with self._lock:
            self._live_combos.add(ver)
            if all(self._current.get(m.name) is not None and self._current[m.name].version == m.version
                   for m in members):
                ver = self.combos.put(key, ver)
                self._remember(ver)
        return ver

    def list(self) -> list[AdapterVersion]:
        with self._lock:
            return sorted(self._current.values(), key=lambda v: v.name)

    def get(self, name: str) -> AdapterVersion:
        with self._lock:
            ver = self._current.get(name)
            if ver is None:
                if name in self._quarantined:
                    raise AdapterUnavailable(name)
                raise AdapterNotFound(name)
            return ver

    def resident_bytes(self) -> int:
        """Host memory held by resident adapters and combinations (what max_cpu_bytes bounds)."""
        with self._lock:
            return sum(v.nbytes for v in self._memory.values())

    def tier(self, ver: AdapterVersion) -> str:
        return "memory" if ver.loaded is not None else "disk"

    def __len__(self) -> int:
        return len(self._current)

    # -- mutations ------------------------------------------------------------------------
    def prepare_upload(self, capacity: int) -> StreamedUpload:
        """Somewhere to receive an upload's weights (at most `capacity` bytes) while they arrive,
        hashed and written to staging as they do (server/streamed_upload.py). Hand it to `add`
        as `streamed` with its `view()` as the weights, and `discard()` it in any case."""
        (self.store / ".staging").mkdir(exist_ok=True)
        # The warm spare for this upload's copy (adapters/host_arena.py) is faulted in now, during
        # the transfer, rather than after the previous upload's answer, where it ran beside that
        # adapter's first request (the likeliest request of all) and cost it ~1.5-2 ms.
        ARENA.replenish()
        return StreamedUpload(self.store / ".staging" / uuid.uuid4().hex, capacity, _WRITER, WEIGHTS_FILE, CONFIG_FILE)

    @hands_back  # runs on a worker thread: torch work there must not keep an OpenMP team
    def add(self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False,
            streamed: StreamedUpload | None = None) -> AdapterVersion:
        """Validate (outside the lock: slow), then commit to disk and memory atomically.
        `streamed`: the upload the weights were received into (`prepare_upload`): its hash and
        staging write are then mostly done already."""
        check_name(name)
        if not replace and name in self._current:  # cheap early answer; re-checked under lock
            raise AdapterExistsError(name)
        staging = streamed.staging if streamed is not None else self.store / ".staging" / uuid.uuid4().hex
        if streamed is None:
            staging.mkdir(parents=True)
        current_tmp = staging.with_name(f"{staging.name}.{CURRENT_FILE}")
        try:
            # The staging write (and its fsync) and the content hash, with the new CURRENT file
            # written and fsync'd from it, overlap validation (streamed: the transfer, mostly), and
            # the device copy of the validated weights is prepared while the disk finishes: upload
            # -> first token is bounded by the slowest of them, not their sum, and the commit is
            # two renames. Nothing is committed unless all succeed, and staging is removed either way.
            if streamed is None:
                writing = _WRITER.submit(_write_pair, staging, config_bytes, weights_bytes)
                hashing = _WRITER.submit(content_hash, config_bytes, weights_bytes)
            else:
                writing, hashing = streamed.complete(config_bytes, weights_bytes)
                if hashing is None:  # the config came after the weights: the hash could not stream
                    hashing = _WRITER.submit(content_hash, config_bytes, weights_bytes)
            naming = _chain(hashing, _write_current, current_tmp)  # CURRENT, once the hash is known
            try:
                loaded = load_adapter(config_bytes, weights_bytes, self.spec, self.settings.limits,
                                      strict_base=self.settings.strict_base, hashing=hashing)
                ver = self._new_version(name, loaded)
                # A new adapter is usually asked for at once: its first request then finds the
                # install prepared. Done here, before the answer, because done after it the copy
                # ran beside that first request and slowed it more than it saved (both need the
                # GIL and the 2 cores). On a failure below the staged copy stays a bounded cache
                # entry of validated weights (the device tier keeps a few, oldest dropped first).
                self._stage(ver)
            finally:
                write_error = writing.exception() or hashing.exception() or naming.exception()
            if write_error is not None:
                raise write_error
            with self._lock:
                old = self._current.get(name)
                if old is not None and not replace:
                    raise AdapterExistsError(name)
                if old is not None and old.version == ver.version:
                    return old  # identical content: nothing changes
                self._commit(name, ver.version, staging, current_tmp)
                self._current[name] = ver
                self._quarantined.pop(name, None)
                stale = self._forget_combinations(name) if old is not None else []
                self._remember(ver)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            current_tmp.unlink(missing_ok=True)
        for gone in ([old] if old is not None else []) + stale:
            self._on_drop(gone)
        if streamed is None:  # (a streamed upload's spare is prepared when the next one starts)
            ARENA.replenish()  # the next upload's copy finds warm memory (adapters/host_arena.py)
        log.info("adapter registered", extra={"adapter": name, "version": ver.version, "kind": ver.kind.value})
        return ver

    def delete(self, name: str) -> AdapterVersion:
        with self._lock:
            ver = self._current.pop(name, None) or self._quarantined.pop(name, None)
            if ver is None:
                raise AdapterNotFound(name)
            self._memory.pop(ver.version, None)
            stale = self._forget_combinations(name)
            target = self.store / name
            if target.exists():
                trash = self.store / ".staging" / f"deleted-{uuid.uuid4().hex}"
                os.replace(target, trash)  # atomic: the name is gone from disk at once
                shutil.rmtree(trash, ignore_errors=True)
        for gone in [ver, *stale]:
            self._on_drop(gone)
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
                try:
                    version = (entry / CURRENT_FILE).read_text().strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise StoreError("missing", f"no readable {CURRENT_FILE}: {exc}") from None
                ver = self._new_version(entry.name, self._load_version(entry.name, version))
            except StoreError as exc:
                self._count_store_error(exc.reason)
                self._quarantine(entry, exc)
                continue
            with self._lock:
                self._current[entry.name] = ver
                self._remember(ver)
            loaded.append(entry.name)
        return loaded

    def import_dir(self, path: Path, name: str | None = None) -> AdapterVersion:
        """Register an adapter directory (e.g. `--adapters DIR` preload) with the hardened reader
        of the adapters package (bounded reads, no symlink out of the directory, never a pickle)."""
        config, weights = read_adapter_dir(path, self.settings.limits)
        return self.add(name or Path(path).name, config, weights, replace=True)

    # -- one store shared by several processes (server/ray_serve) -------------------------
    @hands_back  # runs on a worker thread: torch work there must not keep an OpenMP team
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
                raise AdapterStoreCorrupt(f"adapter {name!r}: content hash {ver.version} does not match version {version}")
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
        raise AdapterStoreBusy(f"adapter {name!r} kept changing while it was read; retry")

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

    def _on_drop(self, ver: AdapterVersion) -> None:
        self.device.drop(ver.key)  # the key only: see DeviceTier

    # -- internals ------------------------------------------------------------------------
    def _combined_version(self, loaded: LoadedAdapter, parts: list[AdapterVersion]) -> AdapterVersion:
        # A weighted sum of admitted adapters can still overflow (weights up to 100, 8 members).
        check_numerics(loaded.kind, loaded.weights, loaded.config, self.spec.dtype)
        ver = self._new_version("+".join(v.name for v in parts), loaded)
        ver.summary["combined"] = True
        ver.members = tuple(v.name for v in parts)
        return ver

    def _new_version(self, name: str, loaded: LoadedAdapter) -> AdapterVersion:
        return AdapterVersion(name=name, version=loaded.content_hash[:16], kind=loaded.kind, nbytes=loaded.nbytes,
                              created=time.time(), summary=summarize(loaded), loaded=loaded,
                              warnings=tuple(loaded.warnings))

    def _commit(self, name: str, version: str, staging: Path, current_tmp: Path) -> None:
        """Move the validated, fsync'd staging dir into place, then the fsync'd CURRENT naming it."""
        adir = self.store / name
        new_name = not adir.exists()
        adir.mkdir(exist_ok=True)
        vdir = adir / version
        moved = False
        try:
            if not vdir.exists():
                os.replace(staging, vdir)
                moved = True
            if current_tmp.read_text() != version:  # written from the same bytes' hash: cannot differ
                raise RuntimeError(f"prepared {CURRENT_FILE} does not name version {version}")
            os.replace(current_tmp, adir / CURRENT_FILE)
            # Durable before the answer: the renames (the version directory, CURRENT) live in
            # the adapter's directory, a new adapter's directory in the store's.
            sync_dir(adir)
            if new_name:
                sync_dir(self.store)
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
        """Make `ver` the most recently used resident, then evict (LRU first) until the count
        and byte budgets hold again. Always keeps `ver` itself."""
        self._memory[ver.version] = ver
        self._memory.move_to_end(ver.version)
        budget = self.settings
        while len(self.combos) > budget.max_combinations:
            self._evict_oldest_combination()
        while len(self._memory) > 1:
            stored = [v for v in self._memory.values() if not v.is_combination]
            if sum(v.nbytes for v in self._memory.values()) > budget.max_cpu_bytes:
                victim = next(iter(self._memory.values()))
            elif len(stored) > budget.max_cpu_adapters:
                victim = stored[0]
            else:
                break
            if victim is ver:
                break
            self._evict(victim)

    def _evict(self, ver: AdapterVersion) -> None:
        self._memory.pop(ver.version, None)
        if ver.is_combination:  # rebuilt from its members on the next request
            self.combos.discard(ver.version)
            self.stats["combination_evictions"] += 1
        else:
            ver.loaded = None  # running requests keep their own reference to the weights
            self.stats["memory_evictions"] += 1

    def _make_room_for_combination(self, nbytes: int) -> None:
        """Before building a new combination (caller holds the lock): every live combination,
        cached or held by a request, plus this one must fit `max_combinations` and
        `max_cpu_bytes`. Evict cached ones (LRU) until it fits; if requests still hold too many,
        refuse with 429 rather than grow host memory with the number of concurrent requests."""
        budget = self.settings
        if nbytes > budget.max_cpu_bytes:  # never fits: not worth a retry
            raise InvalidCombination(f"this combination needs {nbytes} bytes, more than the host-memory "
                                     f"budget of {budget.max_cpu_bytes} bytes")
        collected = False
        while True:
            # no local strong reference may outlive this check: it would keep an evicted one alive
            count, used = len(self._live_combos), sum(v.nbytes for v in self._live_combos)
            if count < budget.max_combinations and used + nbytes <= budget.max_cpu_bytes:
                return
            if self._evict_oldest_combination():
                continue
            if collected:
                break
            # A finished request's Sequence and its event callback form a reference cycle, so
            # its combination may only be garbage until the cyclic GC runs: collect once, here
            # at the cap only, before telling a client to back off.
            gc.collect()
            collected = True
        raise CombinationCapacity(f"{count} weighted combinations are in use ({used} bytes; limits "
                                  f"{budget.max_combinations} and {budget.max_cpu_bytes} bytes): "
                                  "retry later or reuse a combination")

    def _evict_oldest_combination(self) -> bool:
        victim = self.combos.oldest()
        if victim is None:
            return False
        self._evict(victim)
        return True

    def _forget_combinations(self, name: str) -> list[AdapterVersion]:
        """Drop every combination with member `name` from host memory; -> them (for the device tier)."""
        stale = self.combos.discard_member(name)
        for ver in stale:
            self._memory.pop(ver.version, None)
        return stale

    def _load_version(self, name: str, version: str) -> LoadedAdapter:
        """Read and verify one stored version. Raises StoreError (never AdapterError/OSError):
        whatever is wrong with a file the server wrote itself is the store's fault."""
        vdir = Path(os.path.realpath(self.store / name / version))
        limits = self.settings.limits
        try:
            # bounded, non-blocking reads: a file swapped for a huge one or a FIFO cannot hang us
            config = read_inside(vdir, CONFIG_FILE, limits.max_config_bytes)
            weights = read_inside(vdir, WEIGHTS_FILE, limits.max_bytes)
        except AdapterError as exc:  # not a regular file, too large, cannot be opened
            raise StoreError("unreadable", f"cannot read {vdir}: {exc.message}") from None
        except OSError as exc:
            raise StoreError("unreadable", f"cannot read {vdir}: {exc.strerror}") from None
        if config is None or weights is None:
            raise StoreError("missing", f"{vdir / (CONFIG_FILE if config is None else WEIGHTS_FILE)} is missing")
        digest = content_hash(config, weights)
        if digest[:16] != version:  # the version is the content hash: the files changed on disk
            raise StoreError("hash_mismatch", f"content hash {digest[:16]} does not match version {version!r}")
        hashed: Future = Future()
        hashed.set_result(digest)  # load_adapter would hash the same bytes again otherwise
        try:
            return load_adapter(config, weights, self.spec, self.settings.limits, hashing=hashed)
        except AdapterError as exc:  # hash-verified but refused (e.g. a stricter check than at upload)
            raise StoreError("invalid", f"stored adapter no longer loads: [{exc.code}] {exc.message}") from None
        finally:
            ARENA.replenish()

    def _count_store_error(self, reason: str) -> None:
        self.store_errors[reason] = self.store_errors.get(reason, 0) + 1

    def _quarantine_version(self, ver: AdapterVersion, exc: StoreError) -> list[AdapterVersion]:
        """A current version's files failed at runtime (caller holds the lock): move them aside,
        forget the version and its combinations; -> versions the device tier must drop."""
        self._count_store_error(exc.reason)
        if self._current.get(ver.name) is ver:
            del self._current[ver.name]
        self._quarantined[ver.name] = ver
        self._memory.pop(ver.version, None)
        stale = self._forget_combinations(ver.name)
        entry = self.store / ver.name
        if entry.exists():
            self._quarantine(entry, exc)
        else:
            log.error("adapter store entry vanished", extra={"adapter": ver.name, "version": ver.version,
                                                             "reason": exc.reason, "error": str(exc)})
        return [ver, *stale]

    def _quarantine(self, entry: Path, exc: Exception) -> None:
        qdir = self.store / ".quarantine"
        qdir.mkdir(exist_ok=True)
        dest = qdir / f"{entry.name}-{uuid.uuid4().hex[:8]}"
        os.replace(entry, dest)
        log.error("corrupt adapter quarantined", extra={"adapter": entry.name, "error": str(exc), "moved_to": str(dest),
                                                        "reason": getattr(exc, "reason", "invalid")})


_RETRY = object()  # _load_cold: the name moved on while its old version was read

_WRITER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-store")


def _write_pair(staging: Path, config_bytes: bytes, weights_bytes: bytes) -> None:
    # The staging directory is private (a fresh uuid) and renamed into the store only once all
    # is fsync'd: its files need no write-then-rename of their own.
    write_all_durable([(staging / WEIGHTS_FILE, weights_bytes), (staging / CONFIG_FILE, config_bytes)])
    sync_dir(staging)  # the two names: the directory is renamed into the store as it is


def _write_current(current_tmp: Path, digest: str) -> None:
    """Write (and fsync) the CURRENT file the commit will rename into place (a private name)."""
    write_durable(current_tmp, digest[:16].encode())


def _chain(first: Future, then, *args) -> Future:
    """A future of `then(*args, first.result())`, run on the thread that completes `first`
    (no pool thread waits for it). Validation needs the hash, not the CURRENT file's fsync."""
    done: Future = Future()

    def run(f: Future) -> None:
        try:
            done.set_result(then(*args, f.result()))
        except BaseException as exc:
            done.set_exception(exc)

    first.add_done_callback(run)
    return done


def version_info(reg: AdapterRegistry, ver: AdapterVersion, device_resident: bool = False) -> dict:
    return {
        "name": ver.name, "version": ver.version, "kind": ver.kind.value, "size_bytes": ver.nbytes,
        "tier": "device" if device_resident else reg.tier(ver), "requests": ver.requests,
        "created": ver.created, **ver.summary, "warnings": list(ver.warnings),
    }


def summarize(loaded: LoadedAdapter) -> dict:
    """What GET /adapters shows of an adapter besides name/version/size (per kind: KINDS)."""
    return KINDS[loaded.kind].summary(loaded)


def _combined_nbytes(members: list[AdapterVersion]) -> int:
    """Bytes of the members' cat combination: every member's A and B, once (see adapters/combine.py)."""
    return sum(m.loaded.nbytes if m.loaded is not None else m.nbytes for m in members)


def _item(obj, key: str):
    value = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    if value is None:
        raise InvalidCombination(f"each combination item needs {key!r}")
    return value
