"""One OpenMP team per process (server/engine/intra_op.py): helper threads and the thread that
starts the engine hand their libgomp teams back; the engine thread keeps its own.

Checked by counting the process's OS threads (/proc/self/task) in a fresh interpreter with two
torch threads, where a parallel op makes libgomp start one worker for the calling thread. Each
check first shows the team exists (so a count that does not move cannot pass by accident)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from peftserve.server.engine import intra_op

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    "parallel backend: OpenMP" not in torch.__config__.parallel_info() or not Path("/proc/self/task").is_dir(),
    reason="needs torch's OpenMP backend and /proc (Linux)")

PRELUDE = r"""
import json, os, threading, torch
from peftserve.server.engine import intra_op
torch.set_num_threads(2)

def tasks():
    # the ids, not their count: a thread of the interpreter's own that ends meanwhile (seen on a
    # loaded machine) must not offset a team that appears
    return set(os.listdir("/proc/self/task"))

def parallel_op():
    torch.ones(1 << 20).add_(1)  # far above ATen's grain size: runs on the calling thread's team
"""

HELPER = PRELUDE + r"""
out = {}
def helper():
    before = tasks()
    parallel_op()
    team = tasks() - before
    out["team"] = len(team)
    out["released"] = intra_op.release()
    out["after_release"] = len(team & tasks())
    parallel_op()
    out["team_again"] = len(tasks() - before)
    intra_op.own()
    out["owner_released"] = intra_op.release()
    out["owner_after"] = len(tasks() - before)
t = threading.Thread(target=helper)
t.start(); t.join()
print(json.dumps(out))
"""

HELPER_JOB = PRELUDE + r"""
out = {}
@intra_op.hands_back
def job():
    before = tasks()
    x = torch.ones(1 << 20).add_(1)
    out["team_in_job"] = len(tasks() - before)
    out["threads_in_job"] = torch.get_num_threads()
    out["sum"] = float(x.sum())
def engine_like():
    intra_op.own()
    out["owner_serial"] = intra_op.serial()
    before = tasks()
    parallel_op()
    out["owner_team"] = len(tasks() - before)
    out["owner_threads"] = torch.get_num_threads()
def after_job():
    job()
    out["threads_after_job"] = torch.get_num_threads()
for target in (after_job, engine_like):
    t = threading.Thread(target=target)
    t.start(); t.join()
job()  # on the main thread too (a start-up preload): it keeps its count afterwards
out["main_threads"] = torch.get_num_threads()
print(json.dumps(out))
"""

START = PRELUDE + r"""
from peftserve.server.engine.async_engine import AsyncEngine

class IdleEngine:  # what AsyncEngine needs of an engine that never gets work
    config = None
    def snapshot(self, **_):
        return None
    def has_work(self):
        return False

base = tasks()
parallel_op()
team = tasks() - base
aeng = AsyncEngine(IdleEngine(), idle_wait_s=0.01)
aeng.start()  # the engine thread blocks on its command queue: no torch op of its own yet
now = tasks()
aeng.stop()
print(json.dumps({"team": len(team), "team_left": len(team & now), "new": len(now - base - team)}))
"""


def run(script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_release_frees_the_calling_threads_team_but_not_the_owners():
    got = run(HELPER)
    assert got["team"] == 1, got  # guard: the parallel op did start a worker for this thread
    assert got["released"] is True and got["after_release"] == 0, got
    assert got["team_again"] == 1, got  # a later op simply builds a new team
    assert got["owner_released"] is False and got["owner_after"] == 1, got


def test_helper_jobs_run_their_torch_ops_without_a_team():
    got = run(HELPER_JOB)
    assert got["team_in_job"] == 0 and got["threads_in_job"] == 1, got
    assert got["sum"] == 2.0 * (1 << 20), got
    assert got["threads_after_job"] == 2, got  # the count is the job's, not the thread's from then on
    # the owner and every other thread keep the process-wide count (guard: the owner's op did start a team)
    assert got["owner_serial"] is None and got["owner_team"] == 1 and got["owner_threads"] == 2, got
    assert got["main_threads"] == 2, got


def test_starting_the_engine_thread_hands_the_starters_team_back():
    got = run(START)
    assert got["team"] == 1, got  # guard: the main thread had a team
    assert got["team_left"] == 0 and got["new"] == 1, got  # its worker is gone; the engine thread is the one new thread


def test_registry_entry_points_on_worker_threads_release(tmp_path, monkeypatch):
    """add / resolve run on worker threads in the server: each hands its thread's team back
    when it returns (the staging of the device copy, inside both, too)."""
    from peft import LoraConfig, get_peft_model

    from peftserve.adapters.spec import BaseModelSpec
    from peftserve.server.registry import AdapterRegistry, RegistrySettings
    from tests.tiny import tiny_llama

    peft = get_peft_model(tiny_llama(0), LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "lora")
    config = (tmp_path / "lora" / "adapter_config.json").read_bytes()
    weights = (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()
    calls: list[str] = []
    real = intra_op.release
    monkeypatch.setattr(intra_op, "release", lambda: calls.append(threading.current_thread().name) or real())
    reg = AdapterRegistry(BaseModelSpec.from_model(tiny_llama(0)), RegistrySettings(store=tmp_path / "store"))

    seen = {}

    def worker():
        reg.add("a", config, weights)
        seen["add"] = calls.count("api-worker")
        reg.resolve("a")
        seen["resolve"] = calls.count("api-worker") - seen["add"]

    t = threading.Thread(target=worker, name="api-worker")
    t.start()
    t.join()
    assert seen["add"] >= 1 and seen["resolve"] >= 1, (seen, calls)
