"""Adapter artifacts end to end: real PEFT checkpoints load with PEFT's exact numbers, and hostile
configs / weights / directories are refused with the right AdapterError code and status."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

from peftserve.adapters.artifact import AdapterLimits, content_hash, load_adapter, load_adapter_dir
from peftserve.adapters.config import AdapterKind, parse_adapter_config
from peftserve.adapters.errors import AdapterError
from peftserve.adapters.safetensors_io import read_safetensors, write_safetensors
from peftserve.adapters.spec import BaseModelSpec
from peftserve.server.errors import http_status

try:
    from tiny import tiny_gpt2, tiny_llama
except ImportError:  # tests/ collected as a package
    from tests.tiny import tiny_gpt2, tiny_llama

warnings.filterwarnings("ignore", category=UserWarning)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
SPEC_NAME = "tiny-llama"


# ------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def spec() -> BaseModelSpec:
    return BaseModelSpec.from_model(tiny_llama(), SPEC_NAME)


def make_peft(peft_cfg, seed: int = 1):
    """A PEFT model on a fresh tiny base, adapter weights seeded (non-trivial: init disabled)."""
    base = tiny_llama(seed=0)
    torch.manual_seed(seed)
    return get_peft_model(base, peft_cfg)


def save(peft_model, out_dir: Path) -> tuple[bytes, bytes]:
    """save_pretrained, then return (adapter_config.json bytes, adapter_model.safetensors bytes)."""
    peft_model.save_pretrained(out_dir)
    return (out_dir / "adapter_config.json").read_bytes(), (out_dir / "adapter_model.safetensors").read_bytes()


def edit_config(config_bytes: bytes, **changes) -> bytes:
    d = json.loads(config_bytes)
    d.update(changes)
    return json.dumps(d).encode()


def edit_weights(weights_bytes: bytes, fn) -> bytes:
    """Apply fn(dict of tensors) -> dict of tensors to a safetensors blob."""
    tensors = read_safetensors(weights_bytes, max_bytes=1 << 30)
    return write_safetensors(fn(dict(tensors)))


def expect(code: str, fn, *args, status: int = 422, **kwargs) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, repr(info.value)
    assert http_status(info.value) == status, repr(info.value)  # the API edge's one error table
    return info.value


def peft_lora_layers(peft_model) -> dict:
    """module path (as in our spec) -> PEFT lora.Linear layer."""
    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


LORA_Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory) -> tuple[bytes, bytes]:
    """A plain LoRA checkpoint (q_proj, v_proj, r=4) to derive hostile variants from."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    return save(make_peft(cfg), tmp_path_factory.mktemp("lora"))


# ------------------------------------------------------------------------------------------
# spec


def test_spec_describes_tiny_llama(spec):
    assert (spec.num_layers, spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads) == (2, 64, 4, 2)
    assert (spec.head_dim, spec.kv_dim, spec.vocab_size, spec.max_model_len) == (16, 32, 256, 256)
    assert spec.model_type == "llama" and spec.name_or_path == SPEC_NAME
    assert spec.linear_modules["model.layers.1.self_attn.k_proj"] == (64, 32)
    assert spec.linear_modules["model.layers.0.mlp.down_proj"] == (128, 64)
    assert len(spec.linear_modules) == 14 and "lm_head" not in spec.linear_modules
    assert "lm_head" in spec.other_modules and "model.embed_tokens" in spec.other_modules
    assert spec.layer_index("model.layers.1.mlp.up_proj") == 1
    assert spec.layer_index("model.embed_tokens") is None
    assert hash(spec) == hash(dataclasses.replace(spec))  # usable as a cache key


# ------------------------------------------------------------------------------------------
# LoRA: real PEFT checkpoints


LORA_CASES = {
    "r1_q": dict(r=1, lora_alpha=1, target_modules=["q_proj"]),
    "r8_attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"q_proj": 3}),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "mlp_only": dict(r=3, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "layers_to_transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "layers_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=0,
                           layers_pattern="layers"),
    "regex_targets": dict(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj"),
    "exclude": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                    exclude_modules=["model.layers.0.self_attn.q_proj"]),
    "no_task_type": dict(r=4, lora_alpha=8, target_modules=["q_proj"], task_type=None),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_matches_peft(case, spec, tmp_path):
    kwargs = {"task_type": "CAUSAL_LM", **LORA_CASES[case]}
    peft_model = make_peft(LoraConfig(init_lora_weights=False, **kwargs))
    config_bytes, weights_bytes = save(peft_model, tmp_path)
    loaded = load_adapter_dir(tmp_path, spec)

    assert loaded.kind is AdapterKind.LORA
    layers = peft_lora_layers(peft_model)
    assert set(loaded.weights.modules) == set(layers)  # same modules targeted as PEFT
    for path, layer in layers.items():
        mod = loaded.weights.modules[path]
        assert mod.rank == layer.r["default"]
        assert mod.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert torch.equal(mod.A, layer.lora_A["default"].weight)
        assert torch.equal(mod.B, layer.lora_B["default"].weight)
        assert mod.A.dtype == torch.float32 and mod.A.device.type == "cpu"
    # The triple (A, B, scale) reproduces PEFT's forward delta for one module.
    path, layer = next(iter(layers.items()))
    x = torch.randn(3, spec.linear_modules[path][0])
    mod = loaded.weights.modules[path]
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(delta, (x @ mod.A.T @ mod.B.T) * mod.scale, rtol=1e-5, atol=1e-5)
    assert loaded.nbytes == sum(m.A.numel() * 4 + m.B.numel() * 4 for m in loaded.weights.modules.values())
    assert loaded.content_hash == content_hash(config_bytes, weights_bytes)


@pytest.mark.parametrize("shorthand", ["all-linear", "ALL-LINEAR"])
def test_hand_written_all_linear_shorthand(shorthand, spec, tmp_path):
    # save_pretrained expands "all-linear" into full paths; a hand-written config keeps the shorthand.
    peft_model = make_peft(LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    config_bytes, weights_bytes = save(peft_model, tmp_path)
    loaded = load_adapter(edit_config(config_bytes, target_modules=shorthand), weights_bytes, spec)
    assert set(loaded.weights.modules) == set(spec.linear_modules) == set(peft_lora_layers(peft_model))


def test_gpt2_conv1d_lora_matches_peft(tmp_path):
    base = tiny_gpt2(0, n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64)
    spec = BaseModelSpec.from_model(base, "tiny-gpt2")
    assert spec.linear_modules["transformer.h.0.attn.c_attn"] == (32, 96)  # Conv1D weight is [in, out]
    assert "transformer.h.1.mlp.c_fc" in spec.conv1d_modules and "lm_head" not in spec.linear_modules
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                 init_lora_weights=False))
    config_bytes, weights_bytes = save(peft_model, tmp_path)
    assert json.loads(config_bytes)["fan_in_fan_out"] is True  # PEFT sets it for Conv1D before saving
    loaded = load_adapter(config_bytes, weights_bytes, spec)
    layers = peft_lora_layers(peft_model)
    assert set(loaded.weights.modules) == set(layers)
    for path, layer in layers.items():
        mod = loaded.weights.modules[path]
        x = torch.randn(2, 3, spec.linear_modules[path][0])
        with torch.no_grad():
            delta = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(delta, (x @ mod.A.T @ mod.B.T) * mod.scale, rtol=1e-5, atol=1e-5)
    expect("invalid_config", load_adapter, edit_config(config_bytes, fan_in_fan_out=False), weights_bytes, spec)


def test_lora_half_precision_weights_are_cast_to_float32(spec, lora_ckpt):
    config_bytes, weights_bytes = lora_ckpt
    half = edit_weights(weights_bytes, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    loaded = load_adapter(config_bytes, half, spec)
    mod = loaded.weights.modules["model.layers.0.self_attn.q_proj"]
    assert mod.A.dtype == torch.float32 and mod.B.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_lora_weights_are_one_owned_copy_in_the_matmul_layout(spec, lora_ckpt, dtype, shift):
    """The upload's tensors are read without a copy (aligned) or through scratch memory
    (misaligned) and copied once, transposed: A.T / B.T contiguous (the layout the matmuls
    read, so a CPU install copies nothing), equal to the file's values, owning their memory."""
    from peftserve.adapters.lora_ops import LoraSlotWeights

    config_bytes, weights_bytes = lora_ckpt
    data = edit_weights(weights_bytes, lambda t: {k: v.to(dtype) for k, v in t.items()})
    body = bytearray(b"#" * shift + data)
    upload = memoryview(body)[shift:]
    loaded = load_adapter(config_bytes, upload, spec)
    want = read_safetensors(data, max_bytes=1 << 30)
    body[shift + 8 + int.from_bytes(data[:8], "little"):] = b"\xff" * (len(data) - 8 - int.from_bytes(data[:8], "little"))
    for path, mod in loaded.weights.modules.items():  # the upload's bytes are gone: ours are not
        for which, t in (("A", mod.A), ("B", mod.B)):
            assert t.dtype == torch.float32 and t.T.is_contiguous(), (path, which)
            assert torch.equal(t, want[f"base_model.model.{path}.lora_{which}.weight"].float()), (path, which)
        slot = LoraSlotWeights(mod.A, mod.B, mod.scale)
        assert slot.At.data_ptr() == mod.A.T.data_ptr() and slot.Bt.data_ptr() == mod.B.T.data_ptr()


def test_lora_loads_take_the_prepared_arena_and_never_share_it(spec, lora_ckpt):
    """adapters/host_arena.py: after `replenish`, the next load of that size takes the warm
    spare; a load of a much smaller size does not (its slack bound); two loads never share
    memory, and reusing nothing changes an earlier adapter."""
    from peftserve.adapters.host_arena import HostArena
    import peftserve.adapters.lora as lora_mod

    config_bytes, weights_bytes = lora_ckpt
    arena = HostArena()
    real = lora_mod.ARENA
    try:
        lora_mod.ARENA = arena
        first = load_adapter(config_bytes, weights_bytes, spec)
        assert arena.stats == {"warm": 0, "cold": 1}
        arena.replenish()
        arena.drain()
        spare = arena._spare
        assert spare is not None
        second = load_adapter(config_bytes, edit_weights(weights_bytes, lambda t: {k: v * 3 for k, v in t.items()}), spec)
        assert arena.stats == {"warm": 1, "cold": 1} and arena._spare is None
        def in_spare(t):
            return spare.data_ptr() <= t.data_ptr() < spare.data_ptr() + spare.numel() * 4

        for path, mod in second.weights.modules.items():
            assert in_spare(mod.A) and in_spare(mod.B), path
            assert not in_spare(first.weights.modules[path].A), path
            assert torch.equal(mod.A, first.weights.modules[path].A * 3), path
        arena.replenish()
        arena.drain()
        assert arena.take(arena._spare.numel() // 2).numel() == arena._spare.numel() // 2  # too big a spare: cold
        assert arena.stats["cold"] == 2
        if hasattr(os, "getpriority") and hasattr(threading, "get_native_id"):  # the prefault thread yields to requests
            nice = arena._pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
            assert nice == 19
    finally:
        lora_mod.ARENA = real


def test_a_take_waits_for_a_fitting_prefault_under_way_but_not_for_long():
    """A streamed upload starts the prefault of its spare when it begins; if its copy comes
    before the prefault is done, it waits for it (warm) instead of faulting in memory of its
    own, and gives up after WAIT_S (cold), never blocking on a starved prefault."""
    import time

    from peftserve.adapters import host_arena

    arena = host_arena.HostArena()
    arena.take(1 << 16)  # cold: sets the size the next spare is prepared for
    gate, real = threading.Event(), arena._prepare
    arena._prepare = lambda numel: (gate.wait(10), real(numel))
    arena.replenish()
    threading.Timer(host_arena.WAIT_S / 4, gate.set).start()
    got = arena.take(1 << 16)
    assert arena.stats == {"warm": 1, "cold": 1} and arena._spare is None and got.numel() == 1 << 16
    gate.clear()
    arena.replenish()  # this prefault is starved (the gate stays shut): the take gives up
    t0 = time.perf_counter()
    arena.take(1 << 16)
    assert arena.stats["cold"] == 2 and time.perf_counter() - t0 < host_arena.WAIT_S + 0.5
    arena.replenish()  # one under way already: not queued twice
    assert arena._pool._work_queue.qsize() == 0
    gate.set()
    arena.drain()


def test_lora_checks_are_planned_once_per_layout_and_config(spec, lora_ckpt, monkeypatch):
    """Adapters of one layout and config share their checks (lora._Plan): a repeat is not
    planned again and loads its own values; another config is planned anew; a refusal is never
    remembered."""
    import peftserve.adapters.lora as lora_mod

    config_bytes, weights_bytes = lora_ckpt
    lora_mod._PLANS.clear()
    planned = []
    real = lora_mod._plan
    monkeypatch.setattr(lora_mod, "_plan", lambda *a, **k: planned.append(1) or real(*a, **k))
    first = load_adapter(config_bytes, weights_bytes, spec)
    tripled = load_adapter(config_bytes, edit_weights(weights_bytes, lambda t: {k: v * 3 for k, v in t.items()}), spec)
    assert len(planned) == 1
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(tripled.weights.modules[q].B, first.weights.modules[q].B * 3)
    doubled_alpha = load_adapter(edit_config(config_bytes, lora_alpha=16), weights_bytes, spec)
    assert len(planned) == 2 and doubled_alpha.weights.modules[q].scale == 2 * first.weights.modules[q].scale
    wrong_rank = edit_config(config_bytes, r=8)
    for _ in range(2):
        expect("shape_mismatch", load_adapter, wrong_rank, weights_bytes, spec)
    assert len(planned) == 4


def test_content_hash_tracks_bytes(spec, lora_ckpt):
    config_bytes, weights_bytes = lora_ckpt
    a = load_adapter(config_bytes, weights_bytes, spec)
    b = load_adapter(config_bytes, bytearray(weights_bytes), spec)
    changed = edit_weights(weights_bytes, lambda t: {**t, LORA_Q.format("A"): t[LORA_Q.format("A")] * 2})
    c = load_adapter(config_bytes, changed, spec)
    assert a.content_hash == b.content_hash != c.content_hash
    assert len(a.content_hash) == 64 and int(a.content_hash, 16) >= 0


# ------------------------------------------------------------------------------------------
# prompt learning: real PEFT checkpoints


def encoder_checkpoint(peft_model) -> bytes:
    """A checkpoint that still carries the encoder's training weights (not the saved output)."""
    sd = peft_model.prompt_encoder["default"].state_dict()
    return write_safetensors({f"prompt_encoder.default.{k}": v for k, v in sd.items()})


SOFT_CASES = {
    "prompt_tuning": PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    "p_tuning_mlp": PromptEncoderConfig(num_virtual_tokens=6, encoder_hidden_size=32, task_type="CAUSAL_LM"),
    "p_tuning_lstm": PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM",
                                         encoder_reparameterization_type="LSTM"),
}


@pytest.mark.parametrize("case", sorted(SOFT_CASES))
def test_soft_prompts_match_peft(case, spec, tmp_path):
    peft_model = make_peft(SOFT_CASES[case]).eval()
    config_bytes, weights_bytes = save(peft_model, tmp_path)
    with torch.no_grad():
        expected = peft_model.get_prompt(1)[0]  # [nvt, hidden], what PEFT prepends to the input

    saved = load_adapter(config_bytes, weights_bytes, spec)
    assert saved.kind.value == json.loads(config_bytes)["peft_type"]
    assert saved.weights.embeddings.shape == (peft_model.peft_config["default"].num_virtual_tokens, 64)
    torch.testing.assert_close(saved.weights.embeddings, expected)

    from_encoder = load_adapter(config_bytes, encoder_checkpoint(peft_model), spec)
    torch.testing.assert_close(from_encoder.weights.embeddings, expected, rtol=1e-5, atol=1e-6)


def prefix_from_peft(peft_model, num_layers: int) -> torch.Tensor:
    """PEFT's injected prefix cache -> [L, 2, kv_heads, nvt, head_dim]."""
    with torch.no_grad():
        cache = peft_model.get_prompt(1)
    layers = [torch.stack([cache.layers[i].keys[0], cache.layers[i].values[0]]) for i in range(num_layers)]
    return torch.stack(layers)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_prefix_matches_peft_get_prompt(projection, spec, tmp_path):
    cfg = PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM", prefix_projection=projection)
    peft_model = make_peft(cfg).eval()
    config_bytes, weights_bytes = save(peft_model, tmp_path)
    saved_cfg = json.loads(config_bytes)
    # PEFT sizes GQA prefixes by key/value heads: token_dim = kv_heads * head_dim.
    assert (saved_cfg["num_attention_heads"], saved_cfg["token_dim"]) == (2, 32)
    expected = prefix_from_peft(peft_model, spec.num_layers)

    loaded = load_adapter(config_bytes, weights_bytes, spec)
    assert loaded.weights.kv.shape == (2, 2, 2, 5, 16)  # [L, K/V, kv_heads, nvt, head_dim]
    torch.testing.assert_close(loaded.weights.kv, expected)
    if projection:  # training checkpoint with embedding + transform MLP
        from_encoder = load_adapter(config_bytes, encoder_checkpoint(peft_model), spec)
        torch.testing.assert_close(from_encoder.weights.kv, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# IA3: real PEFT checkpoint


def test_ia3_matches_peft(spec, tmp_path):
    peft_model = make_peft(IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    _, _ = save(peft_model, tmp_path)
    loaded = load_adapter_dir(tmp_path, spec)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "ia3_l")}
    assert set(loaded.weights.modules) == set(layers)
    assert any(m.scales_input for m in loaded.weights.modules.values())
    for path, layer in layers.items():
        mod = loaded.weights.modules[path]
        assert mod.scales_input == layer.is_feedforward
        assert torch.equal(mod.vector, layer.ia3_l["default"].flatten())
        x = torch.randn(2, spec.linear_modules[path][0])
        with torch.no_grad():
            ours = layer.base_layer(x * mod.vector) if mod.scales_input else layer.base_layer(x) * mod.vector
            torch.testing.assert_close(layer(x), ours)


def test_ia3_wrong_orientation(spec, tmp_path):
    config_bytes, weights_bytes = save(make_peft(IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)), tmp_path)
    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    bad = edit_weights(weights_bytes, lambda t: {**t, key: t[key].T.contiguous()})
    expect("shape_mismatch", load_adapter, config_bytes, bad, spec)
    not_subset = edit_config(config_bytes, feedforward_modules=["up_proj"])
    expect("invalid_config", load_adapter, not_subset, weights_bytes, spec)


# ------------------------------------------------------------------------------------------
# hostile configs


@pytest.mark.parametrize("changes,code", [
    ({"r": 300}, "invalid_config"),  # > max_rank
    ({"r": 0}, "invalid_config"),
    ({"r": -4}, "invalid_config"),
    ({"r": True}, "invalid_config"),
    ({"r": 4.0}, "invalid_config"),
    ({"r": None}, "invalid_config"),
    ({"lora_alpha": 0}, "invalid_config"),
    ({"lora_alpha": -8}, "invalid_config"),
    ({"lora_alpha": "8"}, "invalid_config"),
    ({"rank_pattern": {"q_proj": 0}}, "invalid_config"),
    ({"rank_pattern": {"q_proj": 999}}, "invalid_config"),
    ({"rank_pattern": {"(": 4}}, "invalid_config"),
    ({"alpha_pattern": {"q_proj": -1}}, "invalid_config"),
    ({"target_modules": "("}, "invalid_config"),
    ({"target_modules": [1]}, "invalid_config"),
    # Counted repeats that a regex compiler would expand to gigabytes: refused before compiling.
    ({"target_modules": "(?:a{65535}){65535}"}, "invalid_config"),
    ({"rank_pattern": {"(?:q{9999}){9999}": 4}}, "invalid_config"),
    ({"layers_to_transform": [0], "layers_pattern": "(?:x{4000}){4000}"}, "invalid_config"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "invalid_config"),
    ({"layers_pattern": "layers"}, "invalid_config"),  # needs layers_to_transform
    ({"fan_in_fan_out": True}, "invalid_config"),  # Llama uses nn.Linear
    ({"use_dora": True}, "unsupported_adapter"),
    ({"bias": "all"}, "unsupported_adapter"),
    ({"bias": "lora_only"}, "unsupported_adapter"),
    ({"modules_to_save": ["lm_head"]}, "unsupported_adapter"),
    ({"lora_bias": True}, "unsupported_adapter"),
    ({"use_qalora": True}, "unsupported_adapter"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "unsupported_adapter"),
    ({"trainable_token_indices": [1, 2]}, "unsupported_adapter"),
    ({"layer_replication": [[0, 2], [0, 2]]}, "unsupported_adapter"),
    ({"alora_invocation_tokens": [5, 6]}, "unsupported_adapter"),
    ({"megatron_config": {"x": 1}}, "unsupported_adapter"),
    ({"init_lora_weights": "pissa"}, "unsupported_adapter"),  # rewrites base weights at load
    ({"init_lora_weights": "olora"}, "unsupported_adapter"),
    ({"init_lora_weights": "mica"}, "unsupported_adapter"),  # a LoRA variant selected by init string
    ({"init_lora_weights": "some_future_variant"}, "unsupported_adapter"),
    ({"peft_type": "VERA"}, "unsupported_adapter"),
    ({"peft_type": "ADALORA"}, "unsupported_adapter"),
    ({"peft_type": 3}, "invalid_config"),
    ({"task_type": "SEQ_CLS"}, "unsupported_adapter"),
    ({"use_magic_variant": True}, "unsupported_adapter"),  # unknown key, not "off"
    ({"target_modules": ["embed_tokens"]}, "unsupported_adapter"),
    ({"target_modules": ["lm_head"]}, "unsupported_adapter"),
    ({"target_modules": ["self_attn"]}, "unsupported_adapter"),
    ({"target_modules": ["no_such_proj"]}, "unknown_module"),
])
def test_hostile_lora_config(changes, code, spec, lora_ckpt):
    config_bytes, weights_bytes = lora_ckpt
    expect(code, load_adapter, edit_config(config_bytes, **changes), weights_bytes, spec)


@pytest.mark.parametrize("raw", [b'{"peft_type": "LORA", "lora_alpha": NaN}',
                                 b'{"peft_type": "LORA", "lora_alpha": 1e999}',  # parses to inf
                                 b'{"peft_type": "LORA", "lora_alpha": Infinity}'])
def test_non_finite_alpha(raw, spec, lora_ckpt):
    expect("invalid_config", load_adapter, raw, lora_ckpt[1], spec)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'"LORA"', b"\xff\xfe{}", b'{"peft_type": "LORA"',
                                 b'{"peft_type": "LORA", "r": 4, "r": 8}', b"[" * 100000])
def test_malformed_config_json(raw, spec, lora_ckpt):
    code = "adapter_too_large" if len(raw) > 65536 else "invalid_config"
    expect(code, load_adapter, raw, lora_ckpt[1], spec, status=413 if code == "adapter_too_large" else 422)


def test_config_over_64k(spec, lora_ckpt):
    padded = edit_config(lora_ckpt[0], revision="x" * 70000)
    expect("adapter_too_large", load_adapter, padded, lora_ckpt[1], spec, status=413)


def test_harmless_and_unknown_off_keys_load(spec, lora_ckpt):
    config_bytes, weights_bytes = lora_ckpt
    cfg = edit_config(config_bytes, auto_mapping={"base_model_class": "os.system", "parent_library": "os"},
                      trust_remote_code=True, some_future_flag=None, megatron_core="evil.module")
    loaded = load_adapter(cfg, weights_bytes, spec)
    assert loaded.kind is AdapterKind.LORA
    assert any("some_future_flag" in w for w in loaded.warnings)
    assert "evil" not in str(dataclasses.asdict(loaded.config))  # only what we use is kept


def test_init_only_options_load(spec, lora_ckpt):
    config_bytes, weights_bytes = lora_ckpt
    assert load_adapter(edit_config(config_bytes, init_lora_weights="gaussian"), weights_bytes, spec).warnings == ()
    loftq = load_adapter(edit_config(config_bytes, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}),
                         weights_bytes, spec)
    assert any("LoftQ" in w for w in loftq.warnings)


def test_redos_target_regex_is_cut_off(spec, lora_ckpt):
    # Catastrophic backtracking on every module path: must fail fast, not pin a core.
    cfg = edit_config(lora_ckpt[0], target_modules=r"(.|.)*(?<=x)")
    start = time.monotonic()
    expect("invalid_config", load_adapter, cfg, lora_ckpt[1], spec, AdapterLimits(regex_budget_s=0.05))
    assert time.monotonic() - start < 5


def test_base_model_mismatch_is_a_warning_unless_strict(spec, lora_ckpt):
    config_bytes, weights_bytes = lora_ckpt
    other = edit_config(config_bytes, base_model_name_or_path="org/other-model")
    loaded = load_adapter(other, weights_bytes, spec)
    assert any("other-model" in w for w in loaded.warnings)
    expect("base_model_mismatch", load_adapter, other, weights_bytes, spec, strict_base=True)
    same = edit_config(config_bytes, base_model_name_or_path=f"/models/{SPEC_NAME}/")
    assert load_adapter(same, weights_bytes, spec, strict_base=True).warnings == ()


# ------------------------------------------------------------------------------------------
# hostile LoRA weights


def _replace(key, tensor):
    return lambda t: {**t, key: tensor}


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _rename(old, new):
    return lambda t: {(new if k == old else k): v for k, v in t.items()}


V1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
HOSTILE_WEIGHTS = {
    "A_in_mismatch": (_replace(LORA_Q.format("A"), torch.randn(4, 32)), "shape_mismatch"),
    "B_out_mismatch": (_replace(LORA_Q.format("B"), torch.randn(65, 4)), "shape_mismatch"),
    "rank_A_vs_B": (_replace(LORA_Q.format("B"), torch.randn(64, 3)), "shape_mismatch"),
    "rank_vs_config": (lambda t: {**t, LORA_Q.format("A"): torch.randn(2, 64), LORA_Q.format("B"): torch.randn(64, 2)},
                       "shape_mismatch"),
    "A_1d": (_replace(LORA_Q.format("A"), torch.randn(256)), "shape_mismatch"),
    "unknown_module": (_replace("base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight", torch.randn(4, 64)),
                       "unknown_module"),
    "wrong_layer_index": (_replace("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
                                   torch.randn(4, 64)), "unknown_module"),
    "untargeted_module": (_replace("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                                   torch.randn(4, 64)), "unknown_module"),
    "adapter_name_in_key": (_rename(LORA_Q.format("A"), LORA_Q.format("A").replace("lora_A.", "lora_A.default.")),
                            "unknown_module"),
    "no_prefix": (_rename(LORA_Q.format("A"), LORA_Q.format("A").removeprefix("base_model.model.")),
                  "unknown_module"),
    "missing_B": (_drop(LORA_Q.format("B")), "missing_weights"),
    "missing_module": (lambda t: {k: v for k, v in t.items() if k not in (V1.format("A"), V1.format("B"))},
                       "missing_weights"),
    "dora_magnitude": (_replace("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                torch.ones(64)), "unsupported_adapter"),
    "lora_bias": (_replace("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.ones(64)),
                  "unsupported_adapter"),
    "base_weights_smuggled": (_replace("base_model.model.lm_head.weight", torch.zeros(256, 64)), "unknown_module"),
    "empty": (lambda t: {}, "missing_weights"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_WEIGHTS))
def test_hostile_lora_weights(case, spec, lora_ckpt):
    fn, code = HOSTILE_WEIGHTS[case]
    config_bytes, weights_bytes = lora_ckpt
    expect(code, load_adapter, config_bytes, edit_weights(weights_bytes, fn), spec)


def test_lora_weights_dtype_and_nan(spec, lora_ckpt):
    config_bytes, weights_bytes = lora_ckpt
    f64 = write_safetensors({k: v.double() for k, v in read_safetensors(weights_bytes, max_bytes=1 << 30).items()})
    expect("unsupported_dtype", load_adapter, config_bytes, f64, spec)
    nan = torch.randn(4, 64)
    nan[1, 2] = float("nan")
    with_nan = edit_weights(weights_bytes, _replace(LORA_Q.format("A"), nan))
    expect("non_finite", load_adapter, config_bytes, with_nan, spec)


def test_weights_over_limit_is_413(spec, lora_ckpt):
    expect("adapter_too_large", load_adapter, *lora_ckpt, spec, AdapterLimits(max_bytes=1000), status=413)


# ------------------------------------------------------------------------------------------
# hostile prompt learning


@pytest.fixture(scope="module")
def prefix_ckpt(tmp_path_factory):
    cfg = PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")
    return save(make_peft(cfg), tmp_path_factory.mktemp("prefix"))


@pytest.fixture(scope="module")
def soft_ckpt(tmp_path_factory):
    return save(make_peft(PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")),
                tmp_path_factory.mktemp("soft"))


@pytest.mark.parametrize("changes", [{"num_layers": 3}, {"num_attention_heads": 4}, {"token_dim": 64}])
def test_prefix_wrong_geometry(changes, spec, prefix_ckpt):
    expect("shape_mismatch", load_adapter, edit_config(prefix_ckpt[0], **changes), prefix_ckpt[1], spec)


def test_prefix_wrong_tensor_width(spec, prefix_ckpt):
    bad = write_safetensors({"prompt_embeddings": torch.randn(5, 2 * 2 * 64)})  # hidden, not kv width
    expect("shape_mismatch", load_adapter, prefix_ckpt[0], bad, spec)


def test_soft_prompt_wrong_hidden(spec, soft_ckpt):
    config_bytes, _ = soft_ckpt
    narrow = write_safetensors({"prompt_embeddings": torch.randn(5, 32)})  # [nvt, 32] but hidden is 64
    expect("shape_mismatch", load_adapter, config_bytes, narrow, spec)
    expect("shape_mismatch", load_adapter, edit_config(config_bytes, token_dim=32), narrow, spec)
    short = write_safetensors({"prompt_embeddings": torch.randn(4, 64)})  # 4 rows, config says 5
    expect("shape_mismatch", load_adapter, config_bytes, short, spec)


def test_soft_prompt_extra_tensor(spec, soft_ckpt):
    blob = write_safetensors({"prompt_embeddings": torch.randn(5, 64), "lm_head.weight": torch.randn(256, 64)})
    expect("unknown_module", load_adapter, soft_ckpt[0], blob, spec)


def test_virtual_tokens_must_fit_context(spec, soft_ckpt):
    small_ctx = dataclasses.replace(spec, max_model_len=5)  # nvt=5 would leave no room for the prompt
    expect("shape_mismatch", load_adapter, *soft_ckpt, small_ctx)
    expect("invalid_config", load_adapter, *soft_ckpt, spec, AdapterLimits(max_virtual_tokens=4))
    expect("invalid_config", load_adapter, edit_config(soft_ckpt[0], num_virtual_tokens=0), soft_ckpt[1], spec)


def test_prompt_tuning_tokenizer_fields_are_never_used(spec, soft_ckpt):
    cfg = edit_config(soft_ckpt[0], prompt_tuning_init="TEXT", tokenizer_name_or_path="evil/remote-code-tokenizer",
                      tokenizer_kwargs={"trust_remote_code": True}, prompt_tuning_init_text="hi")
    assert load_adapter(cfg, soft_ckpt[1], spec).kind is AdapterKind.PROMPT_TUNING


def test_encoder_decoder_prompt_refused(spec, soft_ckpt):
    expect("unsupported_adapter", load_adapter, edit_config(soft_ckpt[0], num_transformer_submodules=2),
           soft_ckpt[1], spec)


def test_p_tuning_encoder_checkpoint_validation(spec, tmp_path):
    peft_model = make_peft(PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM",
                                               encoder_reparameterization_type="LSTM"))
    config_bytes, _ = save(peft_model, tmp_path)
    sd = {f"prompt_encoder.{k}": v for k, v in peft_model.prompt_encoder["default"].state_dict().items()}
    missing = {k: v for k, v in sd.items() if not k.endswith("mlp_head.2.bias")}
    expect("missing_weights", load_adapter, config_bytes, write_safetensors(missing), spec)
    wrong = {**sd, "prompt_encoder.lstm_head.weight_hh_l1": torch.randn(64, 15)}
    expect("shape_mismatch", load_adapter, config_bytes, write_safetensors(wrong), spec)
    # A huge declared encoder size must be caught from shapes, before any module is allocated.
    huge = edit_config(config_bytes, encoder_hidden_size=65536)
    expect("shape_mismatch", load_adapter, huge, write_safetensors(sd), spec)


# ------------------------------------------------------------------------------------------
# directories: pickle never loaded, symlinks never followed out


class _Sentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))  # unpickling would create the sentinel file


def test_dir_with_only_pickle_bin_is_refused(spec, lora_ckpt, tmp_path):
    sentinel = tmp_path / "sentinel"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(lora_ckpt[0])
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Sentinel(str(sentinel))}))
    expect("invalid_safetensors", load_adapter_dir, adapter, spec, status=415)
    # Same bytes renamed to .safetensors or sent as an upload: still never unpickled.
    (adapter / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.bin").read_bytes())
    expect("invalid_safetensors", load_adapter_dir, adapter, spec, status=415)
    expect("invalid_safetensors", load_adapter, lora_ckpt[0], (adapter / "adapter_model.bin").read_bytes(), spec,
           status=415)
    assert not sentinel.exists()


def test_torch_zip_renamed_is_refused(spec, lora_ckpt, tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    torch.save(read_safetensors(lora_ckpt[1], max_bytes=1 << 30), path)
    expect("invalid_safetensors", load_adapter, lora_ckpt[0], path.read_bytes(), spec, status=415)


def test_symlink_out_of_dir_is_refused(spec, lora_ckpt, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(lora_ckpt[1])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(lora_ckpt[0])
    (adapter / "adapter_model.safetensors").symlink_to(outside)
    expect("invalid_artifact", load_adapter_dir, adapter, spec)
    # A symlink that stays inside the directory is fine.
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "real.safetensors").write_bytes(lora_ckpt[1])
    (adapter / "adapter_model.safetensors").symlink_to("real.safetensors")
    assert load_adapter_dir(adapter, spec).kind is AdapterKind.LORA


def test_dir_layout_errors(spec, lora_ckpt, tmp_path):
    expect("invalid_artifact", load_adapter_dir, tmp_path / "missing", spec)
    adapter = tmp_path / "a"
    adapter.mkdir()
    expect("invalid_artifact", load_adapter_dir, adapter, spec)  # empty
    (adapter / "adapter_model.safetensors").write_bytes(lora_ckpt[1])
    expect("invalid_artifact", load_adapter_dir, adapter, spec)  # no config
    (adapter / "adapter_config.json").mkdir()
    expect("invalid_artifact", load_adapter_dir, adapter, spec)  # config is a directory


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_weights_do_not_hang(spec, lora_ckpt, tmp_path):
    (tmp_path / "adapter_config.json").write_bytes(lora_ckpt[0])
    os.mkfifo(tmp_path / "adapter_model.safetensors")
    expect("invalid_artifact", load_adapter_dir, tmp_path, spec)


# ------------------------------------------------------------------------------------------
# bottleneck dispatch (config class owned by adapters/bottleneck.py)


def test_bottleneck_config_is_dispatched():
    bottleneck = pytest.importorskip("peftserve.adapters.bottleneck")
    raw = json.dumps({"peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "bottleneck_size": 8}).encode()
    cfg = parse_adapter_config(raw)
    assert isinstance(cfg, bottleneck.BottleneckConfig) and cfg.bottleneck_size == 8
