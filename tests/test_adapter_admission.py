"""Numeric admission check (adapters/admission.py) and bounded safetensors shapes.

Issue 9 reproductions: a LoRA with finite but huge weights (lora_A = 1e30, lora_B = 3e38, F32)
and a prefix adapter of 3e38 values were accepted (201) and then produced [0, 0, 0, 0] or killed
the engine; zero-element but overflowing shapes answered 500. Each must now be a 422 with its own
code, while every legitimate adapter (PEFT random inits, all kinds, all serving dtypes) passes.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

from peftserve.adapters.admission import SQRT_F32_MAX, activation_ceiling
from peftserve.adapters.artifact import load_adapter
from peftserve.adapters.bottleneck import BottleneckConfig, init_bottleneck
from peftserve.adapters.errors import AdapterError
from peftserve.adapters.safetensors_io import read_safetensors, write_safetensors
from peftserve.server.errors import http_status
from tests.test_adapter_artifacts import edit_weights, expect, make_peft, save, spec  # noqa: F401  (fixture)
from tests.test_adapters_api import P, adapter_server, generate, lib, tokens, upload  # noqa: F401  (fixtures)
from tests.test_api import assert_error

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
UNSTABLE = "adapter_numerically_unstable"
DTYPES = ("float32", "bfloat16", "float16")

LEGIT = {
    "lora_attn": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            init_lora_weights=False, task_type="CAUSAL_LM"),
    "lora_all_rslora": LoraConfig(r=16, lora_alpha=64, use_rslora=True, target_modules="all-linear",
                                  init_lora_weights=False, task_type="CAUSAL_LM"),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                     init_ia3_weights=False, task_type="CAUSAL_LM"),
    "prefix": PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM"),
    "prompt": PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    return {k: save(make_peft(c, seed=3), tmp_path_factory.mktemp(k)) for k, c in LEGIT.items()}


def in_dtype(spec, dtype: str):
    return dataclasses.replace(spec, dtype=dtype)


def lora_with(weights: bytes, a: float, b: float) -> bytes:
    return edit_weights(weights, lambda t: {k: torch.full_like(v, a if ".lora_A." in k else b) for k, v in t.items()})


def test_spec_records_the_serving_dtype(spec):
    from tests.tiny import tiny_llama

    assert spec.dtype == "float32"
    assert dataclasses.replace(spec).dtype == "float32"
    from peftserve.adapters.spec import BaseModelSpec

    assert BaseModelSpec.from_model(tiny_llama().to(torch.bfloat16)).dtype == "bfloat16"


def test_ceiling_math():
    assert SQRT_F32_MAX == pytest.approx(1.8446744e19, rel=1e-6)
    assert activation_ceiling(torch.float32, 64) == SQRT_F32_MAX
    assert activation_ceiling(torch.bfloat16, 64) == SQRT_F32_MAX
    assert activation_ceiling(torch.float16, 64) == pytest.approx(65504 * 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", list(LEGIT))
def test_legitimate_peft_adapters_pass_in_every_dtype(key, dtype, ckpts, spec):
    config, weights = ckpts[key]
    assert load_adapter(config, weights, in_dtype(spec, dtype)).kind.value == LEGIT[key].peft_type.value


@pytest.mark.parametrize("dtype", DTYPES)
def test_legitimate_bottleneck_passes(dtype, spec):
    cfg = BottleneckConfig(placement="houlsby", bottleneck_size=8, non_linearity="gelu", scaling=4.0)
    tensors = init_bottleneck(cfg, spec, seed=1, random_up=True).to_tensors()
    loaded = load_adapter(json.dumps(cfg.to_dict()).encode(), write_safetensors(tensors), in_dtype(spec, dtype))
    assert loaded.kind.value == "BOTTLENECK"


@pytest.mark.parametrize("dtype", DTYPES)
def test_issue_reproduction_huge_finite_lora_is_refused(dtype, ckpts, spec):
    config, weights = ckpts["lora_attn"]
    err = expect(UNSTABLE, load_adapter, config, lora_with(weights, 1e30, 3e38), in_dtype(spec, dtype))
    assert "lora" in err.message.lower() or "value" in err.message


@pytest.mark.parametrize("dtype", DTYPES)
def test_issue_reproduction_prefix_of_3e38_is_refused(dtype, ckpts, spec):
    config, weights = ckpts["prefix"]
    bad = edit_weights(weights, lambda t: {k: torch.full_like(v, 3e38) for k, v in t.items()})
    expect(UNSTABLE, load_adapter, config, bad, in_dtype(spec, dtype))


def test_soft_prompt_rows_over_the_ceiling_are_refused(ckpts, spec):
    config, weights = ckpts["prompt"]
    bad = edit_weights(weights, lambda t: {k: v * 0 + 1e19 for k, v in t.items()})  # row norm 8e19 > 1.84e19
    expect(UNSTABLE, load_adapter, config, bad, spec)
    fine = edit_weights(weights, lambda t: {k: v * 0 + 1e15 for k, v in t.items()})  # huge, but no overflow
    load_adapter(config, fine, spec)


def test_float16_bounds_are_tighter_than_float32(ckpts, spec):
    """Gains and values that float32 carries but float16 (max 65504) cannot."""
    lora_cfg, lora_w = ckpts["lora_attn"]
    big_gain = lora_with(lora_w, 30.0, 30.0)  # per module sigma = 2 * 30 * 30 * 8 * sqrt(in * out) ~ 1e6..3e6
    load_adapter(lora_cfg, big_gain, spec)
    expect(UNSTABLE, load_adapter, lora_cfg, big_gain, in_dtype(spec, "float16"))
    ia3_cfg, ia3_w = ckpts["ia3"]
    big_vec = edit_weights(ia3_w, lambda t: {k: v * 0 + 1e5 for k, v in t.items()})  # 1e5 > 65504
    load_adapter(ia3_cfg, big_vec, spec)
    load_adapter(ia3_cfg, big_vec, in_dtype(spec, "bfloat16"))
    expect(UNSTABLE, load_adapter, ia3_cfg, big_vec, in_dtype(spec, "float16"))


def test_lora_refusal_uses_the_exact_gain_not_the_frobenius_bound(ckpts, spec):
    """B @ A = 0 although ||A||_F * ||B||_F is astronomically large: the exact path admits it."""
    config, weights = ckpts["lora_attn"]

    def orthogonal(t):
        out = {}
        for k, v in t.items():
            v = torch.zeros_like(v)
            if ".lora_A." in k:
                v[0] = 1e30  # only rank component 0 of A is non-zero
            else:
                v[:, 1] = 1e30  # only rank component 1 of B is non-zero
            out[k] = v
        return out

    loaded = load_adapter(config, edit_weights(weights, orthogonal), spec)
    assert loaded.kind.value == "LORA"
    one = edit_weights(weights, lambda t: {k: v.clone().fill_(0).index_fill_(0 if ".lora_A." in k else 1,
                                                                             torch.tensor([0]), 1e15)
                                           for k, v in t.items()})
    expect(UNSTABLE, load_adapter, config, one, spec)  # rank-1 delta of gain ~1e30 * sqrt(dims)


def test_huge_ia3_and_bottleneck_are_refused(ckpts, spec):
    config, weights = ckpts["ia3"]
    expect(UNSTABLE, load_adapter, config, edit_weights(weights, lambda t: {k: v * 0 + 3e38 for k, v in t.items()}),
           spec)
    cfg = BottleneckConfig(placement="pfeiffer", bottleneck_size=8)
    tensors = init_bottleneck(cfg, spec, seed=1, random_up=True).to_tensors()
    huge = {k: v * 1e20 if "up.weight" in k else v for k, v in tensors.items()}
    expect(UNSTABLE, load_adapter, json.dumps(cfg.to_dict()).encode(), write_safetensors(huge), spec)


# ------------------------------------------------------------------------------------------
# zero-element but overflowing shapes (was: 500 internal_error)


def raw_file(header: dict, data: bytes = b"") -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


@pytest.mark.parametrize("shape", [
    [2**40, 2**40, 0], [2**63, 0], [0, 2**63], [2**31, 0], [0] * 8 + [2**40],
    [2**30, 2**30, 0], [2**64, 0], [2**20, 2**20, 2**20, 0],
])
def test_zero_element_overflowing_shapes_are_invalid(shape):
    with pytest.raises(AdapterError) as info:
        read_safetensors(raw_file({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}),
                         max_bytes=1 << 28)
    assert info.value.code == "invalid_safetensors" and http_status(info.value) == 422, info.value


@pytest.mark.parametrize("shape", [[0], [0, 576], [16, 0], [0, 0, 0]])
def test_plausible_empty_shapes_still_read(shape):
    out = read_safetensors(raw_file({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}),
                           max_bytes=1 << 28)
    assert list(out["x"].shape) == shape


# ------------------------------------------------------------------------------------------
# over HTTP: the exact reproductions



@pytest.mark.anyio
async def test_api_huge_lora_upload_is_422_and_server_serves_others(adapter_server, lib):
    server = adapter_server()
    art = lib.get("qv")
    async with server.client() as client:
        resp = await upload(client, "huge", art, weights=lora_with(art.weights, 1e30, 3e38))
        assert_error(resp, 422, UNSTABLE)
        assert (await client.get("/adapters")).json()["adapters"] == []
        assert (await upload(client, "qv", art)).status_code == 201
        assert await tokens(client, P[0], "qv") == lib.ref("qv", P[0])


@pytest.mark.anyio
async def test_api_prefix_of_3e38_is_422(adapter_server, lib, tmp_path):
    server = adapter_server()
    config, weights = save(make_peft(LEGIT["prefix"], seed=3), tmp_path / "prefix")
    bad = edit_weights(weights, lambda t: {k: torch.full_like(v, 3e38) for k, v in t.items()})
    async with server.client() as client:
        resp = await client.post("/adapters", data={"name": "pfx"}, files={
            "adapter_config": ("adapter_config.json", config, "application/json"),
            "adapter_model": ("adapter_model.safetensors", bad, "application/octet-stream")})
        assert_error(resp, 422, UNSTABLE)
        ok = await client.post("/adapters", data={"name": "pfx"}, files={
            "adapter_config": ("adapter_config.json", config, "application/json"),
            "adapter_model": ("adapter_model.safetensors", weights, "application/octet-stream")})
        assert ok.status_code == 201, ok.text
        assert (await generate(client, P[0], "pfx", n=2, temperature=1.0, seed=1)).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("shape", [[2**40, 2**40, 0], [2**63, 0]])
async def test_api_zero_element_overflowing_shape_is_422(adapter_server, lib, shape):
    server = adapter_server()
    art = lib.get("qv")
    tensors = read_safetensors(art.weights, max_bytes=1 << 28)
    body = write_safetensors(dict(tensors))
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8:8 + n])
    header["base_model.model.model.layers.0.self_attn.q_proj.lora_X.weight"] = {
        "dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
    # offsets of the real tensors stay valid: the empty tensor owns no bytes
    async with server.client() as client:
        resp = await upload(client, "zero", art, weights=raw_file(header, body[8 + n:]))
        assert_error(resp, 422, "invalid_safetensors")
