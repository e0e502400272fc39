"""Bottleneck adapter format + reference forward (tiny random Llama, no tokenizer needed)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from peftserve.adapters import bottleneck as bn
from peftserve.adapters.errors import AdapterError
from tests.tiny import TINY_RANDOM_LLAMA, tiny_llama


@pytest.fixture()
def model():
    return tiny_llama(0, **{**TINY_RANDOM_LLAMA, "vocab_size": 128})


@pytest.fixture()
def ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- config


def test_config_roundtrip_and_size():
    cfg = bn.BottleneckConfig.from_dict({"peft_type": "BOTTLENECK", "reduction_factor": 16, "placement": "houlsby",
                                         "non_linearity": "gelu", "scaling": 0.5, "layers_to_transform": [1, 0],
                                         "base_model_name_or_path": "default", "task_type": "CAUSAL_LM"})
    assert bn.BottleneckConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.size_for(576) == 36 and cfg.positions == ("attn", "mlp") and not cfg.parallel
    assert cfg.layer_indices(2) == [0, 1]
    par = bn.BottleneckConfig(bottleneck_size=8, placement="parallel")
    assert par.parallel and par.positions == ("mlp",) and par.size_for(64) == 8
    assert par.to_dict()["bottleneck_size"] == 8 and "reduction_factor" not in par.to_dict()


@pytest.mark.parametrize("patch", [
    {"foo": 1},                                   # closed schema
    {"reduction_factor": 4},                      # both sizes
    {"bottleneck_size": 0},
    {"bottleneck_size": True},                    # bool is not an int here
    {"bottleneck_size": "8"},
    {"placement": "everywhere"},
    {"placement": None},                          # only some fields are nullable
    {"non_linearity": "softmax"},
    {"scaling": float("nan")},
    {"layers_to_transform": [0, 0]},
    {"layers_to_transform": [-1]},
    {"layers_to_transform": "0"},
    {"peft_type": "LORA"},
    {"task_type": "SEQ_CLS"},
])
def test_config_rejects(patch):
    data = {"peft_type": "BOTTLENECK", "bottleneck_size": 8, **patch}
    with pytest.raises(AdapterError) as err:
        bn.BottleneckConfig.from_dict(data)
    assert err.value.code == "invalid_config"


def test_config_requires_peft_type_and_object():
    for bad in ({"bottleneck_size": 8}, [], "x"):
        with pytest.raises(AdapterError):
            bn.BottleneckConfig.from_dict(bad)


# ----------------------------------------------------------------------------- reference forward


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_identity_at_init_and_detach_restores(model, ids, placement):
    base = _logits(model, ids)
    cfg = bn.BottleneckConfig(reduction_factor=4, placement=placement)
    handle = bn.attach_bottleneck(model, cfg)  # up = 0 -> exactly the base model
    assert torch.equal(_logits(model, ids), base)
    handle.detach()
    handle = bn.attach_bottleneck(model, cfg, bn.init_bottleneck(cfg, model, random_up=True))
    adapted = _logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                          pad_token_id=0).shape == (2, 10)
    handle.detach()
    assert torch.equal(_logits(model, ids), base)
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)


def test_sequential_and_parallel_math(model):
    """The wrapper computes exactly y + s*up(act(down(z))), z = sublayer output or input."""
    x = torch.randn(2, 5, 64)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        y = mlp(x)
        for placement, src in (("pfeiffer", y), ("parallel", x)):
            cfg = bn.BottleneckConfig(bottleneck_size=8, placement=placement, non_linearity="tanh", scaling=0.7)
            w = bn.init_bottleneck(cfg, model, random_up=True, seed=3)
            t = w.layers[1]["mlp"]
            handle = bn.attach_bottleneck(model, cfg, w)
            hidden = torch.tanh(F.linear(src, t.down_weight, t.down_bias))  # [2, 5, 8]
            expected = y + 0.7 * F.linear(hidden, t.up_weight, t.up_bias)
            torch.testing.assert_close(model.model.layers[1].mlp(x), expected)
            handle.detach()


def test_houlsby_wraps_attention_tuple_output(model):
    cfg = bn.BottleneckConfig(bottleneck_size=4, placement="houlsby", layers_to_transform=[0])
    handle = bn.attach_bottleneck(model, cfg, bn.init_bottleneck(cfg, model, random_up=True))
    layers = model.model.layers
    assert isinstance(layers[0].self_attn, bn.AdaptedSublayer) and isinstance(layers[0].mlp, bn.AdaptedSublayer)
    assert type(layers[1].self_attn).__name__ == "LlamaAttention"  # not in layers_to_transform
    assert layers[0].self_attn.layer_idx == 0  # attribute reads fall through to the wrapped module
    assert sorted(handle.named_tensors()) == sorted(
        f"base_model.model.model.layers.0.{pos}_adapter.{part}"
        for pos in ("attn", "mlp") for part in ("down.weight", "down.bias", "up.weight", "up.bias"))
    with pytest.raises(RuntimeError):
        bn.attach_bottleneck(model, cfg)
    handle.detach()


def test_save_read_roundtrip(model, ids, tmp_path):
    cfg = bn.BottleneckConfig(reduction_factor=8, placement="houlsby", non_linearity="silu", scaling=2.0)
    handle = bn.attach_bottleneck(model, cfg, bn.init_bottleneck(cfg, model, random_up=True))
    adapted = _logits(model, ids)
    bn.save_bottleneck(tmp_path, cfg, handle.weights())
    handle.detach()
    cfg2, w2 = bn.read_bottleneck(tmp_path, model)
    assert cfg2 == cfg
    for name, t in handle.weights().to_tensors().items():
        assert torch.equal(w2.to_tensors()[name], t)
    bn.attach_bottleneck(model, cfg2, w2)
    assert torch.equal(_logits(model, ids), adapted)


# ----------------------------------------------------------------------------- validation


def _tensors(cfg, spec):
    return bn.init_bottleneck(cfg, spec).to_tensors()


@pytest.mark.parametrize("mutate, code", [
    (lambda t: t.pop("base_model.model.model.layers.1.mlp_adapter.up.bias"), "missing_weights"),
    (lambda t: t.update({"base_model.model.model.layers.1.attn_adapter.up.bias": torch.zeros(64)}), "unknown_module"),
    (lambda t: t.update({"base_model.model.model.layers.0.mlp_adapter.down.weight": torch.zeros(4, 64)}),
     "shape_mismatch"),
    (lambda t: t["base_model.model.model.layers.0.mlp_adapter.up.weight"].fill_(float("nan")), "non_finite"),
    (lambda t: t.update({"base_model.model.model.layers.0.mlp_adapter.up.bias": torch.zeros(64, dtype=torch.long)}),
     "unsupported_dtype"),
])
def test_load_rejects_bad_tensors(mutate, code):
    spec = {"hidden_size": 64, "num_hidden_layers": 2}
    cfg = bn.BottleneckConfig(bottleneck_size=8, placement="pfeiffer")
    tensors = _tensors(cfg, spec)
    mutate(tensors)
    with pytest.raises(AdapterError) as err:
        bn.load_bottleneck(cfg, tensors, spec)
    assert err.value.code == code


def test_layers_out_of_range_and_dims_sources(model):
    cfg = bn.BottleneckConfig(bottleneck_size=8, layers_to_transform=[5])
    with pytest.raises(AdapterError) as err:
        bn.load_bottleneck(cfg, {}, model)
    assert err.value.code == "base_model_mismatch"

    class Spec:  # e.g. the server engine's model object
        hidden_size, num_layers = 64, 2

    assert bn.model_dims(model) == bn.model_dims(model.config) == bn.model_dims(Spec()) == (64, 2)


def test_read_rejects_corrupt_files(model, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="invalid JSON"):
        bn.read_bottleneck(tmp_path, model)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "BOTTLENECK", "bottleneck_size": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError) as err:
        bn.read_bottleneck(tmp_path, model)
    assert err.value.code == "invalid_safetensors"
