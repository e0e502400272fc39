"""One OpenMP team in the process: the engine thread's. Other threads hand theirs back.

Why: torch's CPU kernels (ATen's `parallel_for`, MKL's GEMMs) run on libgomp, which keeps a
team of worker threads per *calling* thread for as long as that thread lives. While libgomp
manages more threads than there are CPUs, it stops spinning between parallel regions (its
"throttled" spin count), so every parallel op pays a futex wake-up of its workers: measured on
a 2-core box, ~90 us per small elementwise op instead of ~8 us, and the whole engine ran at
150 tok/s in its thread instead of 215 on the main thread (64 requests, default model, fp32).
A server has exactly that shape: the thread that loaded the model keeps a team, every worker
thread that validated an upload or loaded an adapter keeps one, and the engine thread steps
among them. So:

- the thread that starts the engine thread hands its team back (`release()`, called by
  `AsyncEngine.start`), and the engine thread marks itself the owner (`own()`);
- a helper job that may run torch ops (`hands_back`: the registry's entry points, which run on
  the server's worker threads) runs them on its own thread alone (`serial()`: that thread's
  OpenMP thread count is 1 for the job, so ATen never starts a team there) and hands back any
  team that appeared anyway (MKL's GEMMs keep the process-wide count) when it returns. Validating
  an upload then costs the engine nothing beyond one core, and no op of the job waits on a
  futex wake-up.

`release()` frees the calling thread's team only (libgomp's `omp_pause_resource_all`, OpenMP
5.0); a later parallel op on that thread builds a new one (tens of microseconds). Both calls are
no-ops on the owner thread, where torch's parallel backend is not OpenMP, and where the loaded
libgomp lacks the call: correctness never depends on them, only speed.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_HARD = 2  # omp_pause_hard: free the team's threads, not just park them
_thread = threading.local()  # .owner: this thread runs the engine's steps


@functools.cache
def _libgomp():
    """The libgomp torch loaded (torch/lib or a wheel's hashed name), with the two calls typed;
    None where torch's parallel backend is not OpenMP or that libgomp predates OpenMP 5.0."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.argtypes, lib.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
            lib.omp_set_num_threads.argtypes, lib.omp_set_num_threads.restype = [ctypes.c_int], None
            lib.omp_get_max_threads.argtypes, lib.omp_get_max_threads.restype = [], ctypes.c_int
        except (OSError, AttributeError):
            continue
        return lib
    log.info("no libgomp with omp_pause_resource_all: helper threads keep their OpenMP teams")
    return None


def own() -> None:
    """Mark the calling thread as the one whose team stays (the engine thread)."""
    _thread.owner = True


def _helper_lib():
    """libgomp, unless the calling thread is the owner (or there is nothing to ask)."""
    return None if getattr(_thread, "owner", False) else _libgomp()


def release() -> bool:
    """Free the calling thread's OpenMP team, if it has one and is not the owner. -> whether
    libgomp was asked (False: owner thread, or nothing to ask)."""
    lib = _helper_lib()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_HARD) == 0


def serial() -> int | None:
    """The calling (helper) thread's torch ops run on it alone until `restore(previous)`.
    -> its previous OpenMP thread count (None: nothing was changed)."""
    lib = _helper_lib()
    if lib is None:
        return None
    # torch sets each thread's OpenMP count from its process-wide one on the thread's first
    # parallel op; trigger that now, or it would undo the count set here
    torch.get_num_threads()
    previous = lib.omp_get_max_threads()
    lib.omp_set_num_threads(1)
    return previous


def restore(previous: int | None) -> None:
    if previous is not None:
        _libgomp().omp_set_num_threads(previous)


def hands_back(fn):
    """Decorator for entry points that run on helper threads and may run torch ops: the job
    runs `serial()`, then the thread's count is restored (a caller on the main thread, e.g. a
    start-up preload or a test, keeps its parallelism) and any team it built is released."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = serial()
        try:
            return fn(*args, **kwargs)
        finally:
            restore(previous)
            release()

    return wrapper
