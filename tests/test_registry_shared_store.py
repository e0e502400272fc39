"""AdapterRegistry over a store shared by several processes (what Ray replicas do), no Ray needed.

Two registries over one directory stand for two replicas: one writes (add/replace/delete), the
other must follow the store's CURRENT through `refresh` — never serving a replaced version,
forgetting a deleted one, refusing files whose content hash does not match their version — and
`release` must drop weights without touching the store.
"""

from __future__ import annotations

import pytest

from peftserve.server.errors import AdapterNotFound, ApiError
from tests.conftest import build_tiny_model
from tests.test_adapters_api import lib, scaled_variant  # noqa: F401  (lib: session fixture)


@pytest.fixture
def pair(tmp_path, smollm_tokenizer):
    from peftserve.adapters.spec import BaseModelSpec
    from peftserve.server.registry import AdapterRegistry, RegistrySettings

    spec = BaseModelSpec.from_model(build_tiny_model(len(smollm_tokenizer), 0), "tiny")
    dropped: dict[str, list[str]] = {"a": [], "b": []}

    class Device:  # the registry's device tier: records the dropped version keys (= versions)
        def __init__(self, keys: list[str]):
            self.drop = keys.append

    make = lambda key: AdapterRegistry(spec, RegistrySettings(store=tmp_path / "store"),  # noqa: E731
                                       device=Device(dropped[key]))
    return make("a"), make("b"), dropped


def test_refresh_follows_add_replace_delete_of_another_process(pair, lib):
    a, b, dropped = pair
    qv, mlp = lib.get("qv"), lib.get("mlp")
    assert b.refresh("x") is None and b.store_names() == []
    v1 = a.add("x", qv.config, qv.weights)
    assert b.store_names() == ["x"]
    assert b.refresh("x").version == v1.version
    assert b.resolve("x").version == v1.version
    assert b.refresh("x") is b.get("x")  # unchanged: the same object, nothing reloaded
    v2 = a.add("x", mlp.config, mlp.weights, replace=True)
    assert b.get("x").version == v1.version  # b has not looked yet ...
    assert b.refresh("x").version == v2.version  # ... and serves v2 as soon as it does
    assert b.resolve("x").version == v2.version and dropped["b"] == [v1.version]
    a.delete("x")
    assert b.refresh("x") is None
    with pytest.raises(AdapterNotFound):
        b.resolve("x")
    assert dropped["b"] == [v1.version, v2.version] and b.store_names() == []


def test_refresh_refuses_files_that_do_not_match_their_version(pair, lib):
    a, b, _ = pair
    art = lib.get("qv")
    ver = a.add("x", art.config, art.weights)
    (a.store / "x" / ver.version / "adapter_model.safetensors").write_bytes(scaled_variant(art, 2.0))
    with pytest.raises(ApiError) as err:
        b.refresh("x")
    assert err.value.code == "adapter_store_corrupt" and err.value.status == 500
    with pytest.raises(AdapterNotFound):
        b.resolve("x")  # never served
    assert (a.store / "x" / "CURRENT").is_file()  # a reader never moves or deletes store files


def test_release_drops_weights_keeps_entry_and_store(pair, lib):
    a, b, dropped = pair
    art = lib.get("soft")
    ver = a.add("s", art.config, art.weights)
    b.refresh("s")
    assert b.tier(b.get("s")) == "memory"
    b.release("s")
    assert b.tier(b.get("s")) == "disk" and dropped["b"] == [ver.version]
    loads = b.stats["disk_loads"]
    assert b.resolve("s").loaded is not None and b.stats["disk_loads"] == loads + 1  # back from the store
    assert (a.store / "s" / ver.version).is_dir()
    b.release("missing")  # unknown names are a no-op
