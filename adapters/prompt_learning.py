"""Prompt-learning checkpoints -> materialised virtual tokens.

* PROMPT_TUNING / P_TUNING -> SoftPromptWeights: embeddings [nvt, hidden], prepended to the input
  embeddings (PeftModelForCausalLM.forward).
* PREFIX_TUNING -> PrefixWeights: per-layer K/V [num_layers, 2, kv_heads, nvt, head_dim], put in
  the KV cache before the prompt (PeftModel.get_prompt).

`save_pretrained` writes one tensor, `prompt_embeddings`, which is already the encoder *output*
(get_prompt_embedding_to_save runs the encoder). We also accept checkpoints that still carry the
encoder's own weights (a training state dict: `prompt_encoder.<adapter>.embedding.weight`,
`...mlp_head.*`, `...lstm_head.*`, `...transform.*`, prefix optional) and run the encoder once
here with plain torch, mirroring peft/tuners/p_tuning/model.py and prefix_tuning/model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import AdapterKind, PromptLearningConfig
from .errors import (
    MISSING_WEIGHTS,
    NON_FINITE,
    SHAPE_MISMATCH,
    UNKNOWN_MODULE,
    AdapterError,
)
from .spec import BaseModelSpec

SAVED_KEY = "prompt_embeddings"
_ENCODER_ROOTS = ("embedding", "mlp_head", "lstm_head", "transform")


@dataclass(frozen=True, eq=False)  # holds tensors: identity semantics
class SoftPromptWeights:
    embeddings: torch.Tensor  # [nvt, hidden] float32, CPU

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


@dataclass(frozen=True, eq=False)  # holds tensors: identity semantics
class PrefixWeights:
    kv: torch.Tensor  # [num_layers, 2, kv_heads, nvt, head_dim] float32, CPU; [:, 0] = K, [:, 1] = V

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


# ----------------------------------------------------------------------------------------------
# dimensions


@dataclass(frozen=True)
class _Dims:
    nvt: int
    token_dim: int  # soft prompt: hidden size; prefix: kv_heads * head_dim (PEFT's GQA handling)
    out_dim: int  # width of one row of prompt_embeddings
    encoder_hidden: int


def _mismatch(message: str) -> AdapterError:
    return AdapterError(SHAPE_MISMATCH, message)


def _resolve_dims(cfg: PromptLearningConfig, spec: BaseModelSpec) -> _Dims:
    nvt = cfg.num_virtual_tokens
    if nvt > spec.max_model_len - 1:
        raise _mismatch(f"num_virtual_tokens={nvt} leaves no room in the {spec.max_model_len}-token context")
    if cfg.kind is AdapterKind.PREFIX_TUNING:
        # utils/other.py _prepare_prompt_learning_config: for models with num_key_value_heads the
        # prefix is sized by KV heads (token_dim = head_dim * kv_heads, num_attention_heads = kv_heads).
        if cfg.num_layers not in (None, spec.num_layers):
            raise _mismatch(f"prefix has num_layers={cfg.num_layers}, base model has {spec.num_layers}")
        if cfg.num_attention_heads not in (None, spec.num_key_value_heads):
            raise _mismatch(f"prefix has num_attention_heads={cfg.num_attention_heads}, base model has "
                            f"{spec.num_key_value_heads} key/value heads")
        if cfg.token_dim not in (None, spec.kv_dim):
            raise _mismatch(f"prefix has token_dim={cfg.token_dim}, base model K/V width is {spec.kv_dim}")
        token_dim = spec.kv_dim
        out_dim = spec.num_layers * 2 * token_dim
    else:
        if cfg.token_dim not in (None, spec.hidden_size):
            raise _mismatch(f"soft prompt has token_dim={cfg.token_dim}, base model hidden size is {spec.hidden_size}")
        token_dim = out_dim = spec.hidden_size
    return _Dims(nvt, token_dim, out_dim, cfg.encoder_hidden_size or token_dim)


# ----------------------------------------------------------------------------------------------
# encoder re-implementations (eval mode: dropout is inactive)


def _strip_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`prompt_encoder.<adapter>.embedding.weight` / `prompt_encoder.embedding.weight` -> `embedding.weight`."""
    keys = list(tensors)
    if all(k.startswith("prompt_encoder.") for k in keys):
        keys = [k[len("prompt_encoder."):] for k in keys]
        heads = {k.split(".", 1)[0] for k in keys}
        if len(heads) == 1 and heads.pop() not in _ENCODER_ROOTS and all("." in k for k in keys):
            keys = [k.split(".", 1)[1] for k in keys]  # drop the adapter name
    return dict(zip(keys, tensors.values()))


def _check_exact(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterError(UNKNOWN_MODULE, f"{what}: unexpected tensor(s) {extra[:3]}")
    if missing:
        raise AdapterError(MISSING_WEIGHTS, f"{what}: missing tensor(s) {missing[:3]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise _mismatch(f"{what}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")


def _linear(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w.float(), b.float())


def _mlp_shapes(d: _Dims) -> dict[str, tuple[int, ...]]:
    h, t = d.encoder_hidden, d.token_dim
    return {"embedding.weight": (d.nvt, t),
            "mlp_head.0.weight": (h, t), "mlp_head.0.bias": (h,),
            "mlp_head.2.weight": (h, h), "mlp_head.2.bias": (h,),
            "mlp_head.4.weight": (t, h), "mlp_head.4.bias": (t,)}


def _p_tuning_mlp(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    # PromptEncoder (MLP): Linear -> ReLU -> Linear -> ReLU -> Linear over the token embeddings.
    x = sd["embedding.weight"].float()  # [nvt, token_dim] == embedding(arange(nvt))
    x = torch.relu(_linear(sd["mlp_head.0.weight"], sd["mlp_head.0.bias"], x))
    x = torch.relu(_linear(sd["mlp_head.2.weight"], sd["mlp_head.2.bias"], x))
    return _linear(sd["mlp_head.4.weight"], sd["mlp_head.4.bias"], x)  # [nvt, token_dim]


def _lstm_shapes(d: _Dims, num_layers: int) -> dict[str, tuple[int, ...]]:
    # Computed arithmetically (not from an nn.LSTM) so that a hostile encoder_hidden_size cannot
    # make us allocate a huge module before the tensors have been checked.
    h, t = d.encoder_hidden, d.token_dim
    shapes = {"embedding.weight": (d.nvt, t),
              "mlp_head.0.weight": (2 * h, 2 * h), "mlp_head.0.bias": (2 * h,),
              "mlp_head.2.weight": (t, 2 * h), "mlp_head.2.bias": (t,)}
    for layer in range(num_layers):
        in_size = t if layer == 0 else 2 * h  # later layers read both directions
        for direction in ("", "_reverse"):
            sfx = f"_l{layer}{direction}"
            shapes.update({f"lstm_head.weight_ih{sfx}": (4 * h, in_size), f"lstm_head.weight_hh{sfx}": (4 * h, h),
                           f"lstm_head.bias_ih{sfx}": (4 * h,), f"lstm_head.bias_hh{sfx}": (4 * h,)})
    return shapes


def _p_tuning_lstm(sd: dict[str, torch.Tensor], d: _Dims, num_layers: int) -> torch.Tensor:
    # PromptEncoder (LSTM): mlp_head(lstm_head(embedding)[0]), bidirectional over the nvt positions.
    # Same constructor as PEFT; its dropout only acts in training, so it is omitted.
    lstm = nn.LSTM(input_size=d.token_dim, hidden_size=d.encoder_hidden, num_layers=num_layers,
                   bidirectional=True, batch_first=True)
    lstm.load_state_dict({k[len("lstm_head."):]: v.float() for k, v in sd.items() if k.startswith("lstm_head.")})
    lstm.eval()
    x, _ = lstm(sd["embedding.weight"].float().unsqueeze(0))  # [1, nvt, 2*hidden]
    x = torch.relu(_linear(sd["mlp_head.0.weight"], sd["mlp_head.0.bias"], x[0]))
    return _linear(sd["mlp_head.2.weight"], sd["mlp_head.2.bias"], x)  # [nvt, token_dim]


def _prefix_projection_shapes(d: _Dims) -> dict[str, tuple[int, ...]]:
    e, t = d.encoder_hidden, d.token_dim
    return {"embedding.weight": (d.nvt, t),
            "transform.0.weight": (e, t), "transform.0.bias": (e,),
            "transform.2.weight": (d.out_dim, e), "transform.2.bias": (d.out_dim,)}


def _prefix_projection(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    # PrefixEncoder with prefix_projection: Linear -> Tanh -> Linear to num_layers*2*token_dim.
    x = torch.tanh(_linear(sd["transform.0.weight"], sd["transform.0.bias"], sd["embedding.weight"].float()))
    return _linear(sd["transform.2.weight"], sd["transform.2.bias"], x)  # [nvt, num_layers*2*token_dim]


def _materialise(cfg: PromptLearningConfig, tensors: dict[str, torch.Tensor], d: _Dims) -> torch.Tensor:
    """-> prompt_embeddings [nvt, out_dim], from the saved output or by running the encoder."""
    if SAVED_KEY in tensors:
        _check_exact(tensors, {SAVED_KEY: (d.nvt, d.out_dim)}, "prompt_embeddings")
        return tensors[SAVED_KEY].float()
    sd = _strip_prefixes(tensors)
    what = f"{cfg.kind.value} encoder"
    encoder_only_embedding = set(sd) == {"embedding.weight"}  # prompt tuning / inference-mode encoders
    if cfg.kind is AdapterKind.P_TUNING and not encoder_only_embedding:
        if cfg.encoder_reparameterization_type == "MLP":
            _check_exact(sd, _mlp_shapes(d), what)
            out = _p_tuning_mlp(sd)
        else:
            num_layers = cfg.encoder_num_layers or 2
            _check_exact(sd, _lstm_shapes(d, num_layers), what)
            out = _p_tuning_lstm(sd, d, num_layers)
    elif cfg.kind is AdapterKind.PREFIX_TUNING and cfg.prefix_projection and not encoder_only_embedding:
        _check_exact(sd, _prefix_projection_shapes(d), what)
        out = _prefix_projection(sd)
    else:
        # The embedding table *is* the output: [nvt, hidden] soft prompt or [nvt, L*2*kv_dim] prefix.
        _check_exact(sd, {"embedding.weight": (d.nvt, d.out_dim)}, what)
        out = sd["embedding.weight"].float()
    if not bool(torch.isfinite(out).all()):
        raise AdapterError(NON_FINITE, f"{what} output contains NaN or Inf")
    return out


def _to_prefix_kv(emb: torch.Tensor, spec: BaseModelSpec) -> torch.Tensor:
    """[nvt, L*2*H*D] -> [L, 2, H, nvt, D], exactly PeftModel.get_prompt's view/permute/split:
    view(nvt, L*2, H, D).permute(L*2 first, then H, nvt, D); chunk 2l is layer l's K, 2l+1 its V."""
    nvt = emb.shape[0]
    L, H, D = spec.num_layers, spec.num_key_value_heads, spec.head_dim
    kv = emb.view(nvt, L * 2, H, D).permute(1, 2, 0, 3)  # [L*2, H, nvt, D]
    return kv.reshape(L, 2, H, nvt, D).contiguous()


@torch.no_grad()
def load_prompt_learning(cfg: PromptLearningConfig, tensors: dict[str, torch.Tensor],
                         spec: BaseModelSpec) -> SoftPromptWeights | PrefixWeights:
    d = _resolve_dims(cfg, spec)
    if not tensors:
        raise AdapterError(MISSING_WEIGHTS, "checkpoint has no tensors")
    emb = _materialise(cfg, tensors, d)  # [nvt, out_dim]
    if cfg.kind is AdapterKind.PREFIX_TUNING:
        return PrefixWeights(kv=_to_prefix_kv(emb, spec))
    return SoftPromptWeights(embeddings=emb.contiguous())
