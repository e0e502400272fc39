"""Weighted combinations are bounded like any adapter in host memory.

Issue 9: every distinct `adapter: [{name, weight}, ...]` (usable with the *user* key) built and
cached a new combined LoRA (~240 MB each for 8 r16 all-linear adapters on the default model),
outside `--max-cpu-bytes` and `peftserve_adapter_memory_bytes`, never freed on delete. Now they
live in the registry's host-memory LRU: counted in the byte budget, capped in number, and dropped
when a member is replaced or deleted.
"""

from __future__ import annotations

import ctypes
import gc
import os

import pytest
import torch

from peftserve.adapters.safetensors_io import read_safetensors
from peftserve.server.registry import AdapterRegistry, RegistrySettings
from peftserve.adapters.spec import BaseModelSpec
from peftserve.server.errors import http_status
from tests.test_adapters_api import (  # noqa: F401  (fixtures)
    P,
    adapter_server,
    generate,
    lib,
    tokens,
    upload,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
MB = 1 << 20
MEMBERS = 4


def rss_bytes() -> int:
    """Resident set size from /proc/self/statm (pages), after returning freed heap to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then include freed-but-cached heap (the bound is generous)
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def wide_loras(tmp_path_factory):
    """4 PEFT LoRAs (r16, all 7 linear kinds) on a 2-layer, hidden-512 Llama: a 4-member
    combination is 4.5 MB, so 100 unbounded combinations would hold ~450 MB."""
    from peft import LoraConfig, get_peft_model
    from tests.tiny import tiny_llama

    def base():
        return tiny_llama(0, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=128, max_position_embeddings=256)

    spec = BaseModelSpec.from_model(base())
    arts = []
    for seed in range(MEMBERS):
        model = base()
        torch.manual_seed(seed + 1)
        peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, init_lora_weights=False,
                                                target_modules="all-linear"))
        d = tmp_path_factory.mktemp(f"wide{seed}")
        peft.save_pretrained(d)
        arts.append(((d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes()))
    return spec, arts


def registry_with(spec, arts, store, **settings) -> AdapterRegistry:
    reg = AdapterRegistry(spec, RegistrySettings(store=store, **settings))
    for i, (config, weights) in enumerate(arts):
        reg.add(f"m{i}", config, weights)
    return reg


def combo(k: int, names=None) -> list[dict]:
    names = names or [f"m{i}" for i in range(MEMBERS)]
    return [{"name": n, "weight": round(0.01 * (k + 1) + 0.1 * j, 4)} for j, n in enumerate(names)]


def test_100_distinct_combinations_stay_in_budget_and_rss_is_bounded(wide_loras, tmp_path):
    spec, arts = wide_loras
    budget = 24 * MB
    reg = registry_with(spec, arts, tmp_path / "store", max_cpu_bytes=budget, max_combinations=16)
    members_bytes = reg.resident_bytes()
    one = reg.resolve(combo(0))
    assert one.nbytes > 4 * MB  # each combination is large enough for RSS to notice 100 of them
    baseline = rss_bytes()
    peak_accounted = 0
    for k in range(1, 101):
        reg.resolve(combo(k))
        peak_accounted = max(peak_accounted, reg.resident_bytes())
        assert len(reg.combos) <= 16
    grown = rss_bytes() - baseline
    assert peak_accounted <= budget
    assert reg.stats["combination_evictions"] >= 90
    # unbounded, the 100 combinations would add ~100 x 4.5 MB = 450 MB; bounded, at most the budget
    # (plus allocator slack)
    assert grown < budget + 48 * MB, f"RSS grew {grown / MB:.0f} MB over 100 combinations"
    print(f"combination {one.nbytes / MB:.1f} MB; members {members_bytes / MB:.1f} MB; "
          f"RSS growth over 100 combinations {grown / MB:.1f} MB; peak accounted {peak_accounted / MB:.1f} MB")


def test_combination_count_cap_without_byte_pressure(wide_loras, tmp_path):
    spec, arts = wide_loras
    reg = registry_with(spec, arts, tmp_path / "store", max_combinations=3)
    for k in range(10):
        reg.resolve(combo(k, ["m0", "m1"]))
    assert len(reg.combos) == 3
    # the members stay resident: count eviction only ever takes combinations
    assert all(reg.get(f"m{i}").loaded is not None for i in range(MEMBERS))
    # the most recent ones are kept, a repeat is a cache hit
    hits = reg.combos.hits
    reg.resolve(combo(9, ["m0", "m1"]))
    assert reg.combos.hits == hits + 1


def test_deleting_or_replacing_a_member_frees_its_combinations(wide_loras, tmp_path):
    spec, arts = wide_loras
    dropped = []  # version keys the device tier is told to drop

    class Device:
        def drop(self, key):
            dropped.append(key)

    reg = AdapterRegistry(spec, RegistrySettings(store=tmp_path / "store"), device=Device())
    for i, (config, weights) in enumerate(arts):
        reg.add(f"m{i}", config, weights)
    members_bytes = reg.resident_bytes()
    with_m0 = [reg.resolve(combo(k, ["m0", "m1"])) for k in range(3)]
    without_m0 = reg.resolve(combo(0, ["m2", "m3"]))
    assert reg.resident_bytes() == members_bytes + sum(v.nbytes for v in with_m0) + without_m0.nbytes
    reg.delete("m0")
    assert len(reg.combos) == 1
    assert reg.resident_bytes() == members_bytes - reg_bytes(arts[0]) + without_m0.nbytes
    assert {v.key for v in with_m0} <= set(dropped)  # device tier told too
    # replace: a new version of m2 drops the combination built from the old one
    config, weights = arts[2]
    scaled = {k: v * 2 for k, v in read_safetensors(weights, max_bytes=1 << 30).items()}
    from peftserve.adapters.safetensors_io import write_safetensors

    reg.add("m2", config, write_safetensors(scaled), replace=True)
    assert len(reg.combos) == 0
    assert without_m0.key in dropped


def reg_bytes(art) -> int:
    return sum(t.numel() * 4 for t in read_safetensors(art[1], max_bytes=1 << 30).values())


@pytest.mark.anyio
async def test_api_combinations_with_the_user_key_are_bounded_and_counted(adapter_server, lib):
    """Over HTTP with the user key: distinct weight sets never exceed --max-combinations, the
    memory metric includes them, and deleting a member frees them."""
    from peftserve.server.state import ServerSettings

    user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
    server = adapter_server(settings=ServerSettings(api_key="user-key", admin_key="admin-key"),
                            registry_settings={"max_combinations": 4})
    names = ["qv", "rs", "mlp"]
    async with server.client() as client:
        for n in names:
            assert (await upload(client, n, lib.get(n), headers=admin)).status_code == 201
        for k in range(12):
            spec = [{"name": n, "weight": 0.05 * (k + 1) + 0.2 * j} for j, n in enumerate(names)]
            resp = await generate(client, P[0], spec, n=1, headers=user)
            assert resp.status_code == 200, resp.text
            assert len(server.registry.combos) <= 4
        metric = metric_value(server, "peftserve_adapter_memory_bytes")
        assert metric == server.registry.resident_bytes()
        assert metric > sum(server.registry.get(n).nbytes for n in names)  # combinations are counted
        cached = metric_value(server, "peftserve_adapter_combinations")
        assert cached == len(server.registry.combos) and 1 <= cached <= 4
        assert (await client.delete("/adapters/rs", headers=admin)).status_code == 200
        assert len(server.registry.combos) == 0
        assert metric_value(server, "peftserve_adapter_memory_bytes") == \
            sum(server.registry.get(n).nbytes for n in ("qv", "mlp"))
        # the parity of what is served is unchanged (PEFT cat combination)
        spec = [{"name": "qv", "weight": 0.7}, {"name": "mlp", "weight": -0.5}]
        assert await tokens(client, P[0], spec, headers=user) == lib.mix_ref(["qv", "mlp"], [0.7, -0.5], P[0])


def metric_value(server, name: str) -> float:
    body, _ = server.metrics.render()
    text = body.decode() if isinstance(body, bytes) else body
    return float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[-1])


def test_combinations_held_by_requests_count_and_a_flood_is_429(wide_loras, tmp_path):
    """Evicted from the cache but still held by queued/running requests, combinations still
    occupy memory: new distinct ones beyond the cap are refused (429, Retry-After) instead of
    growing host memory with the number of concurrent requests; released ones make room."""
    from peftserve.server.registry import CombinationCapacity

    spec, arts = wide_loras
    reg = registry_with(spec, arts, tmp_path / "store", max_combinations=3)
    held = [reg.resolve(combo(k, ["m0", "m1"])) for k in range(3)]  # three requests in flight
    with pytest.raises(CombinationCapacity) as info:
        reg.resolve(combo(3, ["m0", "m1"]))
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    assert reg.get("m0").requests == 3  # the refused request was not counted
    held.pop()  # one request finishes
    assert reg.resolve(combo(3, ["m0", "m1"])).nbytes > 0
    # the byte budget applies the same way
    reg2 = registry_with(spec, arts, tmp_path / "store2", max_cpu_bytes=int(held[0].nbytes * 2.5))
    keep = [reg2.resolve(combo(k, ["m0", "m1"])) for k in range(2)]
    with pytest.raises(CombinationCapacity):
        reg2.resolve(combo(5, ["m0", "m1"]))
    keep.clear()
    reg2.resolve(combo(5, ["m0", "m1"]))
    # a combination larger than the whole budget can never fit: 422, not "retry later"
    from peftserve.adapters.errors import InvalidCombination

    reg3 = registry_with(spec, arts, tmp_path / "store3", max_cpu_bytes=held[0].nbytes - 1)
    with pytest.raises(InvalidCombination) as too_big:
        reg3.resolve(combo(0, ["m0", "m1"]))
    assert http_status(too_big.value) == 422  # the API edge's one error table


def test_a_combination_that_must_overflow_is_422(wide_loras, tmp_path):
    """Members admitted on their own, but weight 100 each pushes the combined delta over the
    float16 ceiling: the combination gets the same admission check (422, never served)."""
    import dataclasses

    from peftserve.adapters.admission import _lora_sigma_max, activation_ceiling
    from peftserve.adapters.errors import AdapterError
    from peftserve.adapters.safetensors_io import write_safetensors

    spec, arts = wide_loras
    spec16 = dataclasses.replace(spec, dtype="float16")
    reg = AdapterRegistry(spec16, RegistrySettings(store=tmp_path / "store"))
    for i, (config, weights) in enumerate(arts[:2]):
        reg.add(f"m{i}", config, weights)
        loaded = reg.get(f"m{i}").loaded
        sigma = max(_lora_sigma_max(m.A, m.B, m.scale) / activation_ceiling(torch.float16, m.B.shape[0])
                    for m in loaded.weights.modules.values())  # worst module, as a fraction of its ceiling
        f = (1 / (20 * sigma)) ** 0.5  # scale A and B by f: every module at <= 1/20 of the ceiling
        tensors = {k: v * f for k, v in read_safetensors(weights, max_bytes=1 << 30).items()}
        reg.add(f"m{i}", config, write_safetensors(tensors), replace=True)
    assert reg.resolve([{"name": "m0", "weight": 1.0}, {"name": "m1", "weight": 1.0}]).nbytes > 0
    with pytest.raises(AdapterError) as info:
        reg.resolve([{"name": "m0", "weight": 100.0}, {"name": "m1", "weight": 100.0}])
    assert info.value.code == "adapter_numerically_unstable" and http_status(info.value) == 422
    assert len(reg.combos) == 1 and reg.get("m0").requests == 1


def test_a_queued_device_drop_does_not_keep_combinations_live(wide_loras, tmp_path):
    """Once an engine thread runs, the registry tells the device tier about dropped versions
    through the engine's command queue (server/build.py `EngineThreadDevice`). A command not yet run must not hold the dropped
    combination (and its weights): it would count as live against --max-combinations and a
    new combination right after a delete would get a spurious 429 (a CI flake, seen once)."""
    import gc

    spec, arts = wide_loras
    from peftserve.server.build import EngineThreadDevice

    drops = []

    class StalledEngine:  # the engine thread has not reached the queued commands yet
        commands = []

        def call(self, fn):
            self.commands.append(fn)

    class Recorder:  # the runtime's side of the device tier
        def drop(self, key):
            drops.append(key)

    stalled = StalledEngine()
    reg = registry_with(spec, arts, tmp_path / "store", max_combinations=2)
    reg.device = EngineThreadDevice(stalled, Recorder())
    made = [reg.resolve(combo(k, ["m0", "m1"])).version for k in range(2)]
    reg.delete("m0")
    assert len(reg.combos) == 0 and stalled.commands
    gc.collect()
    assert len(reg._live_combos) == 0, "a queued drop command keeps a dropped combination alive"
    reg.resolve(combo(0, ["m2", "m3"]))  # no CombinationCapacity
    reg.resolve(combo(1, ["m2", "m3"]))
    for fn in stalled.commands:  # the device tier still learns every dropped version
        fn(None)
    assert set(made) <= set(drops)
