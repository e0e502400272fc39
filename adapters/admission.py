"""Numeric admission check: refuse adapters whose weights must drive activations to inf/NaN.

Finite is not enough: `lora_A` = 1e30 and `lora_B` = 3e38 are finite float32 values, yet the
first token through that module overflows, every later RMSNorm sees `inf`, greedy decoding
returns token 0 forever and sampling gets NaN probabilities. This module computes, per adapted
module, a cheap static bound on the adapter's contribution to an activation and compares it with
what the serving dtype can carry. It runs on every load (upload, preload, store reload), so it is
vectorised and sits well inside the upload -> first token budget (see docs/design.md for the
measured cost).

The math (S = serving dtype of the base model, F = float32 max = 3.40e38):

* Activation ceiling. Every norm layer (HF RMSNorm/LayerNorm upcast to float32) and every
  attention score squares and sums an activation vector in float32, so a vector y with
  ||y||_2 > sqrt(F) = 1.84e19 overflows it. In float16 each element must also stay below
  65504; a vector with ||y||_2 > 65504 * sqrt(n) has an element above that (pigeonhole). So

      ceiling(S, n) = min(sqrt(F), finfo(S).max * sqrt(n))
                    = 1.84e19 for float32/bfloat16, 65504 * sqrt(n) for float16.

* Reference input. Activations leave RMSNorm with RMS ~ |gamma| ~ 1, so a token's component
  along any fixed unit direction is O(1). The bound of each module is therefore its worst-case
  output for a *unit-norm* input (the smallest scale real activations have); an adapter over the
  ceiling overflows for ordinary tokens, and trained adapters sit 15+ orders of magnitude below it
  in float32/bfloat16 (trained LoRA gains are O(1..100); PEFT's random inits O(1)).

Per kind (all worst cases, exact where cheap):
  LoRA        sigma_max(scale * B @ A), the operator norm of the delta. Fast path: the upper
              bound |scale| * ||B||_F * ||A||_F; only modules over the ceiling get the exact
              sigma_max (float64 QR of A^T and B, then the 2-norm of the r x r product), so a
              refusal is never caused by the looseness of the Frobenius bound.
  (IA)3       ||l||_2: l scales a base activation elementwise (|elements| <= 1 reference).
  soft prompt each virtual token's embedding norm: the rows *are* residual-stream vectors.
  prefix      each K and V vector (per layer, head, virtual token) norm over head_dim: they are
              dotted with queries and averaged into attention outputs.
  bottleneck  |s| * (sigma_up * Lip(act) * (sigma_down + ||b_down||) + ||b_up||), the worst-case
              output for a unit-norm input (Lip <= 1.13 for gelu/silu, 1 for relu/tanh).

Storage: (IA)3/bottleneck weights and prefixes are cast to S on the device (slots, KV cache on
GPU). Any value above finfo(S).max becomes inf on that cast (float16: 65504), so it is refused
too. LoRA A/B stay float32 on every device, so for LoRA only the delta's gain is bounded.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import PROMPT_LEARNING_KINDS, AdapterKind
from .errors import NUMERICALLY_UNSTABLE, AdapterError

SQRT_F32_MAX = math.sqrt(torch.finfo(torch.float32).max)  # 1.8447e19
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LIPSCHITZ = {"relu": 1.0, "tanh": 1.0, "gelu": 1.13, "silu": 1.1}


def serving_dtype(name: str | None) -> torch.dtype:
    """The BaseModelSpec's dtype name -> torch dtype (unknown/None: float32, the widest we serve)."""
    return _DTYPES.get(str(name or "float32").removeprefix("torch."), torch.float32)


def activation_ceiling(dtype: torch.dtype, n: int) -> float:
    """Largest L2 norm an n-element activation vector may have before it must overflow (see module doc)."""
    return min(SQRT_F32_MAX, torch.finfo(dtype).max * math.sqrt(max(n, 1)))


def _refuse(what: str, bound: float, limit: float, dtype: torch.dtype) -> AdapterError:
    return AdapterError(NUMERICALLY_UNSTABLE, f"{what}: bound {bound:.3g} exceeds {limit:.3g}, beyond which "
                        f"activations overflow when served in {str(dtype).removeprefix('torch.')}")


def _norms(tensors: list[torch.Tensor], ord: float = 2.0) -> list[float]:
    """One norm per tensor in one multi-tensor kernel. float32 sums of squares may overflow to
    inf only when the true norm exceeds sqrt(F) >= every ceiling, so inf is a correct answer."""
    if not tensors:
        return []
    flat = [t.float() for t in tensors]
    if hasattr(torch, "_foreach_norm"):  # one kernel launch for all (private but long-standing API)
        return torch.stack(torch._foreach_norm(flat, ord)).tolist()
    return [float(torch.linalg.vector_norm(t, ord)) for t in flat]


def _check_storage(named: list[tuple[str, torch.Tensor]], norms: list[float], dtype: torch.dtype) -> None:
    """No value may exceed finfo(dtype).max. max|x| <= ||x||_2, so only tensors whose 2-norm
    (already computed) is over the limit need their max scanned: free for every sane adapter."""
    if dtype is torch.float32:  # loaded weights are finite float32 or narrower: nothing can overflow
        return
    limit = torch.finfo(dtype).max
    for (name, t), norm in zip(named, norms):
        if norm > limit:
            peak = float(t.float().abs().max())
            if peak > limit:
                raise _refuse(f"{name}: value", peak, limit, dtype)


def _lora_sigma_max(A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """Exact operator norm of scale * B @ A without forming [out, in]: with A^T = Q_a R_a and
    B = Q_b R_b (thin QR, float64 so 3e38-sized values cannot overflow), B A = Q_b (R_b R_a^T) Q_a^T."""
    r_a = torch.linalg.qr(A.double().T, mode="r").R  # [r, r]
    r_b = torch.linalg.qr(B.double(), mode="r").R  # [r, r]
    return abs(scale) * float(torch.linalg.matrix_norm(r_b @ r_a.T, ord=2))


def check_lora(weights: Any, dtype: torch.dtype) -> None:
    modules = list(weights.modules.items())
    # No storage check: LoRA slots keep A and B in float32 whatever the base dtype
    # (server/runtime/kinds.py); only the delta, added to the base output, meets S.
    named = [(f"{p}.lora_{w}", t) for p, m in modules for w, t in (("A", m.A), ("B", m.B))]
    fro = _norms([t for _, t in named])  # [2 * modules]: ||A||_F, ||B||_F interleaved
    for i, (path, m) in enumerate(modules):
        limit = activation_ceiling(dtype, m.B.shape[0])
        upper = abs(m.scale) * fro[2 * i] * fro[2 * i + 1]  # Python float: no float32 overflow
        if upper <= limit:
            continue
        sigma = _lora_sigma_max(m.A, m.B, m.scale)
        if sigma > limit:
            raise _refuse(f"{path}: LoRA delta gain ||scale*B@A||_2", sigma, limit, dtype)


def check_ia3(weights: Any, dtype: torch.dtype) -> None:
    modules = list(weights.modules.items())
    named = [(f"{p}.ia3_l", m.vector) for p, m in modules]
    norms = _norms([v for _, v in named])
    _check_storage(named, norms, dtype)
    for (name, vec), norm in zip(named, norms):
        limit = activation_ceiling(dtype, vec.numel())
        if norm > limit:
            raise _refuse(f"{name}: scaling vector norm", norm, limit, dtype)


def _check_rows(name: str, vectors: torch.Tensor, dtype: torch.dtype) -> None:
    """vectors: [..., n]; every length-n vector is an activation."""
    if vectors.numel() == 0:
        return
    norms = torch.linalg.vector_norm(vectors.float(), dim=-1)  # [...]
    worst = float(norms.max())
    _check_storage([(name, vectors)], [worst], dtype)  # max|x| <= largest row norm
    limit = activation_ceiling(dtype, vectors.shape[-1])
    if worst > limit:
        raise _refuse(f"{name}: largest vector norm", worst, limit, dtype)


def check_prompt_learning(weights: Any, dtype: torch.dtype) -> None:
    if hasattr(weights, "kv"):  # prefix: [L, 2, H, nvt, D]
        _check_rows("prefix key/value", weights.kv, dtype)
    else:  # soft prompt: [nvt, hidden]
        _check_rows("soft prompt embedding", weights.embeddings, dtype)


def check_bottleneck(weights: Any, config: Any, dtype: torch.dtype) -> None:
    scaling = abs(float(getattr(config, "scaling", 1.0)))
    lip = _LIPSCHITZ.get(getattr(config, "non_linearity", "relu"), 1.13)
    for layer, by_pos in sorted(weights.layers.items()):
        for pos, t in sorted(by_pos.items()):
            name = f"layers.{layer}.{pos}_adapter"
            parts = [t.down_weight, t.down_bias, t.up_weight, t.up_bias]
            norms = _norms(parts)
            _check_storage([(f"{name}.{p}", v) for p, v in zip(("down.weight", "down.bias", "up.weight",
                                                                "up.bias"), parts)], norms, dtype)
            limit = activation_ceiling(dtype, t.up_weight.shape[0])
            b_down, b_up = norms[1], norms[3]
            bound = scaling * (norms[2] * lip * (norms[0] + b_down) + b_up)  # Frobenius >= spectral
            if bound <= limit:
                continue
            s_down, s_up = (float(torch.linalg.matrix_norm(w.double(), ord=2)) for w in (t.down_weight, t.up_weight))
            bound = scaling * (s_up * lip * (s_down + b_down) + b_up)
            if bound > limit:
                raise _refuse(f"{name}: worst-case output norm", bound, limit, dtype)


def check_numerics(kind: AdapterKind, weights: Any, config: Any, dtype_name: str | None) -> None:
    """Raise AdapterError(adapter_numerically_unstable, 422) when the adapter must overflow when
    served in `dtype_name` (the BaseModelSpec's dtype)."""
    dtype = serving_dtype(dtype_name)
    if kind is AdapterKind.LORA:
        check_lora(weights, dtype)
    elif kind is AdapterKind.IA3:
        check_ia3(weights, dtype)
    elif kind in PROMPT_LEARNING_KINDS:
        check_prompt_learning(weights, dtype)
    elif kind is AdapterKind.BOTTLENECK:
        check_bottleneck(weights, config, dtype)
