"""Bottleneck adapters (Houlsby / Pfeiffer / parallel): our own PEFT-style format.

PEFT has no bottleneck adapter, so peftserve defines the on-disk format (docs/bottleneck-format.md)
and this module is its reference implementation: config parsing, tensor validation, and a plain
PyTorch forward that wraps the `self_attn` / `mlp` submodules of a Llama-family HF model so that
`model(...)` and `model.generate(...)` run with the adapter. Training uses the same wrappers.

Math (h = hidden size, b = bottleneck size, s = scaling, A(z) = up(act(down(z)))); its one
implementation is `bottleneck_ops.bottleneck_delta`, shared with the serving path:
  sequential (houlsby, pfeiffer): y = sublayer(x);  y' = y + s * A(y)   (before the residual add)
  parallel:                       y = sublayer(x);  y' = y + s * A(x)   (x = the normed sublayer input)
houlsby adapts attention and MLP outputs; pfeiffer and parallel adapt the MLP only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftserve.adapters import errors
from peftserve.adapters.artifact import CONFIG_NAME, WEIGHTS_NAME
from peftserve.adapters.bottleneck_ops import ACTIVATIONS, bottleneck_delta
from peftserve.adapters.errors import AdapterError

PEFT_TYPE = "BOTTLENECK"
# Which sublayers each placement adapts, and whether the adapter reads the sublayer input.
PLACEMENTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "houlsby": (("attn", "mlp"), False),
    "pfeiffer": (("mlp",), False),
    "parallel": (("mlp",), True),
}
_SUBMODULE = {"attn": "self_attn", "mlp": "mlp"}  # position -> attribute of a decoder layer
_PREFIX = "base_model.model.model.layers"  # PEFT-style prefix, so names read like PEFT's
_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")
_NULLABLE = {"base_model_name_or_path", "bottleneck_size", "reduction_factor", "layers_to_transform"}
_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "bottleneck_size", "reduction_factor",
         "non_linearity", "placement", "scaling", "layers_to_transform"}


def _config_error(message: str) -> AdapterError:
    return AdapterError(errors.INVALID_CONFIG, f"bottleneck adapter_config.json: {message}")


def _weights_error(code: str, message: str) -> AdapterError:
    return AdapterError(code, f"bottleneck adapter_model.safetensors: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class BottleneckConfig:
    """Parsed `adapter_config.json`; exactly one of bottleneck_size / reduction_factor is set."""

    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    non_linearity: str = "relu"
    placement: str = "pfeiffer"
    scaling: float = 1.0
    layers_to_transform: tuple[int, ...] | None = None
    base_model_name_or_path: str | None = None
    peft_type: str = PEFT_TYPE
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        if self.peft_type != PEFT_TYPE:
            raise _config_error(f"peft_type must be {PEFT_TYPE!r}, got {self.peft_type!r}")
        if self.task_type != "CAUSAL_LM":
            raise _config_error(f"task_type must be 'CAUSAL_LM', got {self.task_type!r}")
        if (self.bottleneck_size is None) == (self.reduction_factor is None):
            raise _config_error("set exactly one of bottleneck_size or reduction_factor")
        if self.bottleneck_size is not None and not (_is_int(self.bottleneck_size) and self.bottleneck_size > 0):
            raise _config_error(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        rf = self.reduction_factor
        if rf is not None and not (isinstance(rf, (int, float)) and not isinstance(rf, bool)
                                   and math.isfinite(rf) and rf > 0):
            raise _config_error(f"reduction_factor must be a positive number, got {rf!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise _config_error(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.placement not in PLACEMENTS:
            raise _config_error(f"placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling):
            raise _config_error(f"scaling must be a finite number, got {self.scaling!r}")
        ltt = self.layers_to_transform
        if isinstance(ltt, list):  # accept a list from Python callers; stored as a tuple (hashable)
            ltt = tuple(ltt)
            object.__setattr__(self, "layers_to_transform", ltt)
        if ltt is not None:
            if not isinstance(ltt, tuple) or not ltt or not all(_is_int(i) and i >= 0 for i in ltt) \
                    or len(set(ltt)) != len(ltt):
                raise _config_error("layers_to_transform must be null or a non-empty list of distinct "
                                    f"non-negative integers, got {list(ltt) if isinstance(ltt, tuple) else ltt!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise _config_error("base_model_name_or_path must be a string or null")

    @classmethod
    def from_dict(cls, data: Any) -> BottleneckConfig:
        """Strict parse: unknown keys, wrong types and missing peft_type are errors."""
        if not isinstance(data, Mapping):
            raise _config_error("must be a JSON object")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise _config_error(f"unknown field(s) {unknown}; allowed: {sorted(_KEYS)}")
        if "peft_type" not in data:
            raise _config_error("missing field 'peft_type'")
        not_null = sorted(k for k, v in data.items() if v is None and k not in _NULLABLE)
        if not_null:
            raise _config_error(f"field(s) {not_null} must not be null")
        kwargs = {k: v for k, v in data.items() if v is not None}
        ltt = kwargs.get("layers_to_transform")
        if ltt is not None:
            if not isinstance(ltt, list):
                raise _config_error(f"layers_to_transform must be null or a list, got {ltt!r}")
            kwargs["layers_to_transform"] = tuple(ltt)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peft_type": self.peft_type, "task_type": self.task_type,
                               "base_model_name_or_path": self.base_model_name_or_path}
        if self.bottleneck_size is not None:
            out["bottleneck_size"] = self.bottleneck_size
        else:
            out["reduction_factor"] = self.reduction_factor
        ltt = None if self.layers_to_transform is None else list(self.layers_to_transform)
        out.update(non_linearity=self.non_linearity, placement=self.placement, scaling=float(self.scaling),
                   layers_to_transform=ltt)
        return out

    @property
    def positions(self) -> tuple[str, ...]:
        return PLACEMENTS[self.placement][0]

    @property
    def parallel(self) -> bool:
        return PLACEMENTS[self.placement][1]

    def size_for(self, hidden_size: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        size = int(hidden_size // self.reduction_factor)
        if size < 1:
            raise AdapterError(errors.BASE_MODEL_MISMATCH, f"reduction_factor {self.reduction_factor} leaves "
                               f"no bottleneck for hidden size {hidden_size}")
        return size

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers_to_transform is None:
            return list(range(num_layers))
        bad = [i for i in self.layers_to_transform if i >= num_layers]
        if bad:
            raise AdapterError(errors.BASE_MODEL_MISMATCH,
                               f"layers_to_transform {bad} out of range: the model has {num_layers} layers")
        return sorted(self.layers_to_transform)


@dataclass
class AdapterTensors:
    down_weight: torch.Tensor  # [b, h]
    down_bias: torch.Tensor  # [b]
    up_weight: torch.Tensor  # [h, b]
    up_bias: torch.Tensor  # [h]


@dataclass
class BottleneckWeights:
    """layers[layer_index][position] with position in {"attn", "mlp"}."""

    layers: dict[int, dict[str, AdapterTensors]] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, by_pos in sorted(self.layers.items()):
            for pos, t in sorted(by_pos.items()):
                for part, v in zip(_PARTS, (t.down_weight, t.down_bias, t.up_weight, t.up_bias)):
                    out[tensor_name(i, pos, part)] = v.detach().to("cpu").contiguous()
        return out


def tensor_name(layer: int, position: str, part: str) -> str:
    """e.g. base_model.model.model.layers.3.mlp_adapter.down.weight"""
    return f"{_PREFIX}.{layer}.{position}_adapter.{part}"


def model_dims(spec_or_model: Any) -> tuple[int, int]:
    """(hidden_size, num_layers) from an HF model, an HF config, a dict, or any object with those attrs."""
    obj = spec_or_model
    get = (lambda k: obj.get(k)) if isinstance(obj, Mapping) else (lambda k: getattr(obj, k, None))
    if get("hidden_size") is None and not isinstance(obj, Mapping) and hasattr(obj, "config"):
        return model_dims(obj.config)
    hidden, layers = get("hidden_size"), get("num_hidden_layers") or get("num_layers")
    if not (_is_int(hidden) and _is_int(layers)):
        raise TypeError(f"cannot read hidden_size / num_hidden_layers from {type(spec_or_model).__name__}")
    return hidden, layers


def init_bottleneck(cfg: BottleneckConfig, spec_or_model: Any, *, seed: int = 0,
                    random_up: bool = False) -> BottleneckWeights:
    """Fresh weights. up is zero (the adapter starts as the identity) unless random_up (tests)."""
    hidden, num_layers = model_dims(spec_or_model)
    b, gen = cfg.size_for(hidden), torch.Generator().manual_seed(seed)
    bound_down, bound_up = 1 / math.sqrt(hidden), 1 / math.sqrt(b)  # nn.Linear's default range

    def uniform(shape, bound):
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound

    weights = BottleneckWeights()
    for i in cfg.layer_indices(num_layers):
        weights.layers[i] = {pos: AdapterTensors(
            down_weight=uniform((b, hidden), bound_down), down_bias=torch.zeros(b),
            up_weight=uniform((hidden, b), bound_up) if random_up else torch.zeros(hidden, b),
            up_bias=uniform((hidden,), bound_up) if random_up else torch.zeros(hidden),
        ) for pos in cfg.positions}
    return weights


def load_bottleneck(cfg: BottleneckConfig, tensors: Mapping[str, torch.Tensor],
                    spec_or_model: Any) -> BottleneckWeights:
    """Validate a safetensors dict against cfg and the model (names, shapes, layers) -> weights."""
    hidden, num_layers = model_dims(spec_or_model)
    b = cfg.size_for(hidden)
    shapes = {"down.weight": (b, hidden), "down.bias": (b,), "up.weight": (hidden, b), "up.bias": (hidden,)}
    expected = {tensor_name(i, pos, part): (i, pos, part)
                for i in cfg.layer_indices(num_layers) for pos in cfg.positions for part in _PARTS}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        raise _weights_error(errors.MISSING_WEIGHTS, f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        raise _weights_error(errors.UNKNOWN_MODULE, f"{len(unexpected)} unexpected tensor(s) for placement "
                             f"{cfg.placement!r}, e.g. {unexpected[0]}")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, (i, pos, part) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shapes[part]:
            raise _weights_error(errors.SHAPE_MISMATCH,
                                 f"{name} has shape {list(t.shape)}, expected {list(shapes[part])}")
        if not t.is_floating_point():
            raise _weights_error(errors.UNSUPPORTED_DTYPE, f"{name} has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise _weights_error(errors.NON_FINITE, f"{name} contains NaN or Inf")
        parts.setdefault((i, pos), {})[part] = t
    weights = BottleneckWeights()
    for (i, pos), p in sorted(parts.items()):
        weights.layers.setdefault(i, {})[pos] = AdapterTensors(
            p["down.weight"], p["down.bias"], p["up.weight"], p["up.bias"])
    return weights


def save_bottleneck(out_dir: str | Path, cfg: BottleneckConfig, weights: BottleneckWeights) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    save_file(weights.to_tensors(), str(out / WEIGHTS_NAME), metadata={"format": "pt"})


def read_bottleneck(adapter_dir: str | Path, spec_or_model: Any) -> tuple[BottleneckConfig, BottleneckWeights]:
    """Read + validate a saved bottleneck adapter directory."""
    d = Path(adapter_dir)
    try:
        text = (d / CONFIG_NAME).read_text()
    except OSError as exc:
        raise AdapterError(errors.INVALID_ARTIFACT, f"cannot read {d / CONFIG_NAME}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _config_error(f"invalid JSON: {exc}") from None
    cfg = BottleneckConfig.from_dict(data)
    try:
        tensors = load_file(str(d / WEIGHTS_NAME))
    except Exception as exc:  # safetensors raises several error types for corrupt files
        raise _weights_error(errors.INVALID_SAFETENSORS, f"cannot read {d / WEIGHTS_NAME}: {exc}") from None
    return cfg, load_bottleneck(cfg, tensors, spec_or_model)


# ----------------------------------------------------------------------------- reference forward


class BottleneckAdapter(nn.Module):
    """z [..., h] -> scaling * up(act(down(z))) [..., h]"""

    def __init__(self, hidden: int, size: int, non_linearity: str, scaling: float):
        super().__init__()
        self.down, self.up = nn.Linear(hidden, size), nn.Linear(size, hidden)
        self.non_linearity, self.scaling = non_linearity, float(scaling)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return bottleneck_delta(z, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                self.non_linearity, self.scaling)


class AdaptedSublayer(nn.Module):
    """Replaces a decoder layer's `self_attn` or `mlp`; the original module lives on as `.base`."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter, parallel: bool):
        super().__init__()
        self.base, self.adapter, self.parallel = base, adapter, parallel

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out  # attention returns (hidden, attn_weights)
        # LlamaDecoderLayer calls self_attn(hidden_states=...) but mlp(hidden_states) positionally.
        src = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]) if self.parallel else y
        w = self.adapter.down.weight
        y = y + self.adapter(src.to(w.dtype)).to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def __getattr__(self, name: str):
        # Code that reads attributes of the wrapped module (layer_idx, config, ...) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if base is None:
                raise
            return getattr(base, name)


def _decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    decoder = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else getattr(hf_model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"{type(hf_model).__name__}: no decoder `layers` (Llama-family model expected)")
    return layers


class BottleneckHandle:
    """What attach_bottleneck returns: the live adapter modules, and detach()."""

    def __init__(self, model: nn.Module, cfg: BottleneckConfig, wrappers: dict[tuple[int, str], AdaptedSublayer]):
        self.model, self.cfg, self.wrappers, self.attached = model, cfg, wrappers, True

    def parameters(self):
        for w in self.wrappers.values():
            yield from w.adapter.parameters()

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """File tensor name -> live parameter (shares storage; use for training state)."""
        out = {}
        for (i, pos), w in self.wrappers.items():
            a = w.adapter
            for part, v in zip(_PARTS, (a.down.weight, a.down.bias, a.up.weight, a.up.bias)):
                out[tensor_name(i, pos, part)] = v
        return out

    def weights(self) -> BottleneckWeights:
        """A detached CPU copy of the current (possibly trained) weights."""
        return load_bottleneck(self.cfg, {k: v.detach().cpu().clone() for k, v in self.named_tensors().items()},
                               self.model)

    def detach(self) -> None:
        if not self.attached:
            return
        layers = _decoder_layers(self.model)
        for (i, pos), w in self.wrappers.items():
            if getattr(layers[i], _SUBMODULE[pos]) is w:
                setattr(layers[i], _SUBMODULE[pos], w.base)
        self.attached = False


def attach_bottleneck(hf_model: nn.Module, cfg: BottleneckConfig, weights: BottleneckWeights | None = None,
                      *, trainable: bool = False, seed: int = 0) -> BottleneckHandle:
    """Wrap the adapted sublayers of `hf_model` in place. weights=None -> fresh init (identity)."""
    if weights is None:
        weights = init_bottleneck(cfg, hf_model, seed=seed)
    # Round-trip through the validator: catches weights built for another model or placement.
    weights = load_bottleneck(cfg, weights.to_tensors(), hf_model)
    hidden, _ = model_dims(hf_model)
    layers = _decoder_layers(hf_model)
    ref = next(hf_model.parameters())
    taken = [(i, pos) for i, by_pos in weights.layers.items() for pos in by_pos
             if isinstance(getattr(layers[i], _SUBMODULE[pos]), AdaptedSublayer)]
    if taken:  # checked up front so a failed attach leaves the model untouched
        raise RuntimeError(f"layer {taken[0][0]} {taken[0][1]} already has a bottleneck adapter attached")
    wrappers: dict[tuple[int, str], AdaptedSublayer] = {}
    for i, by_pos in weights.layers.items():
        for pos, t in by_pos.items():
            adapter = BottleneckAdapter(hidden, cfg.size_for(hidden), cfg.non_linearity, cfg.scaling)
            with torch.no_grad():
                for p, v in ((adapter.down.weight, t.down_weight), (adapter.down.bias, t.down_bias),
                             (adapter.up.weight, t.up_weight), (adapter.up.bias, t.up_bias)):
                    p.copy_(v)
            adapter.to(device=ref.device, dtype=ref.dtype).requires_grad_(trainable)
            wrapper = AdaptedSublayer(getattr(layers[i], _SUBMODULE[pos]), adapter, cfg.parallel)
            setattr(layers[i], _SUBMODULE[pos], wrapper)
            wrappers[(i, pos)] = wrapper
    return BottleneckHandle(hf_model, cfg, wrappers)
