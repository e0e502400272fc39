"""Cost of the numeric admission check (adapters/admission.py) per upload, issue 9.

    .venv/bin/python benchmarks/admission_cost.py [--threads 2] [--repeats 50]

An r16 LoRA on q, k, v, o of every layer of the default model's shape (SmolLM2-135M: hidden 576,
30 layers, 9 heads, 3 KV heads, head_dim 64), PEFT-like random weights (A ~ U(+-1/sqrt(in)),
B ~ N(0, 0.02)), no model download. Times `check_numerics` alone (median / p90 over repeats) in
every serving dtype, and for context the whole `load_adapter` (parse + validate + check + hash).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from peftserve.adapters.admission import check_numerics
from peftserve.adapters.artifact import load_adapter
from peftserve.adapters.config import AdapterKind
from peftserve.adapters.safetensors_io import write_safetensors
from peftserve.adapters.spec import BaseModelSpec

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER = 576, 30, 9, 3, 64, 1536
RANK, TARGETS = 16, ("q_proj", "k_proj", "v_proj", "o_proj")


def smollm_spec(dtype: str) -> BaseModelSpec:
    kv = KV_HEADS * HEAD_DIM
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, kv),
              "self_attn.v_proj": (HIDDEN, kv), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER), "mlp.down_proj": (INTER, HIDDEN)}
    linear = {f"model.layers.{i}.{k}": v for i in range(LAYERS) for k, v in shapes.items()}
    return BaseModelSpec(name_or_path="SmolLM2-135M-Instruct", model_type="llama", linear_modules=linear,
                         conv1d_modules=frozenset(), other_modules=frozenset({"lm_head", "model.embed_tokens"}),
                         num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=49152, max_model_len=2048,
                         dtype=dtype)


def artifact(spec: BaseModelSpec) -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for path, (in_f, out_f) in spec.linear_modules.items():
        if path.rsplit(".", 1)[-1] in TARGETS:
            tensors[f"base_model.model.{path}.lora_A.weight"] = (torch.rand(RANK, in_f, generator=g) * 2 - 1) / in_f**0.5
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.02
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 32,
              "target_modules": list(TARGETS), "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    return json.dumps(config).encode(), write_safetensors(tensors)


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"shape": "SmolLM2-135M (576 x 30 layers)", "adapter": f"LoRA r{RANK} {','.join(TARGETS)}",
           "threads": args.threads}
    for dtype in ("float32", "bfloat16", "float16"):
        spec = smollm_spec(dtype)
        config, weights = artifact(spec)
        loaded = load_adapter(config, weights, spec)
        out[f"check_{dtype}"] = timed(lambda: check_numerics(AdapterKind.LORA, loaded.weights, None, dtype),
                                      args.repeats)
        if dtype == "float32":
            out["weights_bytes"] = len(weights)
            out["load_adapter_float32"] = timed(lambda: load_adapter(config, weights, spec), args.repeats // 2 or 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
