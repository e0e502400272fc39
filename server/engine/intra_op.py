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
- a helper job that may run torch ops hands its thread's team back when it returns
  (`hands_back`: the registry's entry points, which run on the server's worker threads).

`release()` frees the calling thread's team only (libgomp's `omp_pause_resource_all`, OpenMP
5.0); a later parallel op on that thread builds a new one (tens of microseconds). It is a no-op
on the owner thread, where torch's parallel backend is not OpenMP, and where the loaded libgomp
predates the call: correctness never depends on it, only speed.
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
def _pause_all():
    """libgomp's `omp_pause_resource_all` as loaded by torch, or None."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:  # torch's own copy (torch/lib or a wheel's hashed name)
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    log.info("libgomp without omp_pause_resource_all: helper threads keep their OpenMP teams")
    return None


def own() -> None:
    """Mark the calling thread as the one whose team stays (the engine thread)."""
    _thread.owner = True


def release() -> bool:
    """Free the calling thread's OpenMP team, if it has one and is not the owner. -> whether
    libgomp was asked (False: owner thread, or nothing to ask)."""
    if getattr(_thread, "owner", False):
        return False
    pause = _pause_all()
    return pause is not None and pause(OMP_PAUSE_HARD) == 0


def hands_back(fn):
    """Decorator for helper-thread entry points that may run torch ops: `release()` on return."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release()

    return wrapper
