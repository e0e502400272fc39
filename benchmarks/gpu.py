"""GPU check + benchmark: parity on CUDA and throughput vs HF/PEFT, one run, side by side.

    python benchmarks/gpu.py --shape 1b [--device cuda] [--out result.json] [--quick]
    python benchmarks/gpu.py --config-dir DIR ...        # DIR/config.json (e.g. SmolLM2-135M)
    bash benchmarks/gpu_check.sh                          # the prepared device run (issue 12)

Shapes: `--shape 1b` is Llama-3.2-1B's architecture, `--shape smollm` SmolLM2-135M's (both
built in), `--config-dir` any config.json. The weights are *random* (seeded): the GPU machine
cannot fetch models; throughput depends on the architecture, not on the weight values, and
parity is checked against HF/PEFT on the very same random weights (fp32, TF32 off).

Throughput rows (bf16, `--batch` requests x 64 prompt + `--new` tokens, one run): ours with
0 / 1 / 8 / 32 LoRAs (ranks 8-64, q,k,v,o), ours with every kind mixed (prompt tuning, prefix
tuning, (IA)3, LoRA, base), ours at batch `--big-batch` (base); HF `generate` static batch
eager, HF `generate(cache_implementation="static")` with the forward compiled (CUDA graphs;
skipped on CPU or with --skip-compiled), PEFT mixed batch with 32 LoRAs (`adapter_names`).
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from common import time_calls
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peftserve.server.build import build_engine
from peftserve.server.engine import engine as engine_mod
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.request import SamplingParams


class StubTokenizer:
    eos_token_id = None

    def decode(self, ids, **kwargs):
        return ""


SHAPES = {
    # Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B, rope scaling left out: same cost)
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
               hidden_act="silu"),
    # SmolLM2-135M-Instruct (the default model)
    "smollm": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   hidden_act="silu"),
}


def shape_config(args):
    if args.config_dir:
        return AutoConfig.from_pretrained(args.config_dir)
    fields = dict(SHAPES[args.shape])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def make_model(cfg, dtype, device, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prompts(n, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


# -- parity ---------------------------------------------------------------------------------
ADAPTERS = {
    "lora": lambda: LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=["q_proj", "v_proj", "up_proj"]),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
}


def hf_greedy(model, ids, new, device):
    model.generation_config.eos_token_id = None
    x = torch.tensor([ids], device=device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


def fixed_mode(device) -> str:
    """The fixed-shape decode mode under test: CUDA graphs on a GPU, the same step eagerly on CPU."""
    return "graph" if torch.device(device).type == "cuda" else "static"


def parity(cfg, device, tmp: Path, mode: str, new=12) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ps = prompts(4, 1, cfg.vocab_size)[:0] + [p[:n] for p, n in zip(prompts(4, 40, cfg.vocab_size, 3), (1, 7, 19, 40))]
    refs = {None: [hf_greedy(make_model(cfg, torch.float32, device), p, new, device) for p in ps]}
    for i, (name, make) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        pm = get_peft_model(make_model(cfg, torch.float32, device), make())
        with torch.no_grad():
            for pname, prm in pm.named_parameters():
                if prm.requires_grad and "ia3" in pname:
                    prm.copy_(1 + 0.3 * torch.randn_like(prm))
                elif prm.requires_grad and "embedding" in pname:
                    prm.normal_(0, 1)
        pm.save_pretrained(tmp / name)
        ref = PeftModel.from_pretrained(make_model(cfg, torch.float32, device), tmp / name).eval()
        refs[name] = [hf_greedy(ref, p, new, device) for p in ps]
    serving = build_engine(make_model(cfg, torch.float32, device), StubTokenizer(),
                            EngineConfig(max_batch_size=32, max_model_len=128, dtype=torch.float32, device=device,
                                         decode_mode=mode),
                            store=tmp / f"store-{mode}")
    for name in ADAPTERS:
        serving.registry.import_dir(tmp / name, name)
    jobs = [(n, i) for i in range(len(ps)) for n in refs]
    seqs = serving.engine.generate([ps[i] for _, i in jobs], SamplingParams(max_new_tokens=new, ignore_eos=True),
                                   adapters=[serving.registry.resolve(n) if n else None for n, _ in jobs])
    ok = [seq.output_ids == refs[n][i] for (n, i), seq in zip(jobs, seqs)]
    return {"mode": mode, "rows": len(ok), "equal": sum(ok), "fixed_shape_steps": serving.engine.runner.static_steps,
            "mismatched": [jobs[k] for k, good in enumerate(ok) if not good]}


# -- throughput -----------------------------------------------------------------------------
def make_loras(cfg, device, n, root: Path) -> list[Path]:
    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        r = (8, 16, 32, 64)[i % 4]
        pm = get_peft_model(make_model(cfg, torch.float32, "cpu"),
                            LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        pm.save_pretrained(root / f"lora{i}")
        dirs.append(root / f"lora{i}")
    return dirs


CAPTURE_SECONDS: list[float] = []  # graph capture time of every engine built with graphs

# Where a step of ours goes (per-step wrappers only, so the timed rows pay ~nothing for them):
# the wait for the device, which lands in `sample_step` (the step's one device->host copy), and
# the rest of the step: the engine's Python (schedule, fill + replay launch, sampling, emitting).
STEP_PHASES = {"wait": (engine_mod, "sample_step"), "step": (engine_mod.LLMEngine, "step")}
PHASE_SECONDS: collections.Counter = collections.Counter()
PHASE_CALLS: collections.Counter = collections.Counter()


def step_breakdown() -> dict:
    """ms per step of the timed run: host = the engine's Python, wait = for the device."""
    steps = PHASE_CALLS["step"]
    ms = {k: 1e3 * v / max(steps, 1) for k, v in PHASE_SECONDS.items()}
    host = ms.get("step", 0) - ms.get("wait", 0)
    return {"steps": steps, "step_ms": round(ms.get("step", 0), 3), "host_ms": round(host, 3),
            "device_wait_ms": round(ms.get("wait", 0), 3)}


BREAKDOWN: dict[str, dict] = {}  # row -> step_breakdown of its timed run


def release(device) -> None:
    """Free the previous engine's device memory (KV pool, LoRA stacks, graph pools) before the next."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _engine_config(ps, slots, dtype, device, mode) -> EngineConfig:
    return EngineConfig(max_batch_size=len(ps), max_model_len=256, max_num_batched_tokens=8192,
                        max_adapters_per_batch=slots, dtype=dtype, device=device, decode_mode=mode)


def _built(serving):
    static = serving.engine.runner.static
    if static is not None and static.graphs:
        CAPTURE_SECONDS.append(static.capture_seconds)
    return serving


def _recapture(serving) -> None:
    """After the warm-up installed the adapters (their stacks appeared, so the start-up graphs are
    stale): record every bucket again now, so no capture lands inside the timed run."""
    static = serving.engine.runner.static
    if static is not None and static.mode.value == "graph":
        static.capture()


def ours(cfg, dtype, device, ps, new, lora_dirs, n_adapters, store, mode="auto", row=None) -> float:
    release(device)
    serving = _built(build_engine(make_model(cfg, dtype, device), StubTokenizer(),
                                  _engine_config(ps, max(1, n_adapters), dtype, device, mode), store=store))
    for i in range(n_adapters):
        serving.registry.import_dir(lora_dirs[i], f"l{i}")
    handles = [serving.registry.resolve(f"l{i % n_adapters}") if n_adapters else None for i in range(len(ps))]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    serving.engine.generate(ps[:4], SamplingParams(max_new_tokens=4, ignore_eos=True), adapters=handles[:4])  # warm-up
    _recapture(serving)
    return _timed_generate(serving, ps, params, handles, device, row)


def _timed_generate(serving, ps, params, handles, device, row) -> float:
    """The timed run of one of our rows -> tok/s; its per-step breakdown goes to BREAKDOWN[row]."""
    sync(device)
    PHASE_SECONDS.clear()
    PHASE_CALLS.clear()
    steps = serving.engine.runner.static_steps
    t0 = time.perf_counter()
    serving.engine.generate(ps, params, adapters=handles)
    sync(device)
    seconds = time.perf_counter() - t0
    if row:
        BREAKDOWN[row] = {**step_breakdown(),
                          "fixed_shape_steps": serving.engine.runner.static_steps - steps}
    return len(ps) * params.max_new_tokens / seconds


def hf_static(model, ps, new, device, adapter_names=None) -> float:
    x = torch.tensor(ps, device=device)
    kw = {"adapter_names": adapter_names} if adapter_names else {}
    model.generate(input_ids=x[:4], attention_mask=torch.ones_like(x[:4]), max_new_tokens=4, min_new_tokens=4,
                   do_sample=False, **({"adapter_names": adapter_names[:4]} if adapter_names else {}))
    sync(device)
    t0 = time.perf_counter()
    model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, **kw)
    sync(device)
    return len(ps) * new / (time.perf_counter() - t0)


def hf_compiled(model, ps, new, device) -> float:
    """HF's own fast path: a static KV cache and the forward compiled (CUDA graphs)."""
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    x = torch.tensor(ps, device=device)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False,
              cache_implementation="static")
    for _ in range(2):  # compile + capture, then one warm run
        model.generate(input_ids=x, **kw)
    sync(device)
    t0 = time.perf_counter()
    model.generate(input_ids=x, **kw)
    sync(device)
    return len(ps) * new / (time.perf_counter() - t0)


def make_kinds(cfg, root: Path) -> list[Path]:
    """One adapter of each kind the mixed row serves (prompt, prefix, (IA)3, LoRA)."""
    dirs = []
    for i, (name, make) in enumerate(ADAPTERS.items()):
        torch.manual_seed(300 + i)
        pm = get_peft_model(make_model(cfg, torch.float32, "cpu"), make())
        pm.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs


def ours_mixed(cfg, dtype, device, ps, new, kind_dirs, store) -> float:
    """Rows cycle through base and every kind: one continuous batch of mixed kinds."""
    release(device)
    serving = _built(build_engine(make_model(cfg, dtype, device), StubTokenizer(),
                                  _engine_config(ps, 8, dtype, device, "auto"), store=store))
    names = [None]
    for d in kind_dirs:
        serving.registry.import_dir(d, d.name)
        names.append(d.name)
    handles = [serving.registry.resolve(names[i % len(names)]) if names[i % len(names)] else None
               for i in range(len(ps))]
    serving.engine.generate(ps[:5], SamplingParams(max_new_tokens=4, ignore_eos=True), adapters=handles[:5])
    _recapture(serving)
    return _timed_generate(serving, ps, SamplingParams(max_new_tokens=new, ignore_eos=True), handles, device,
                           "ours_mixed_kinds")


def throughput(cfg, device, dtype, tmp: Path, batch, new, big_batch, compiled: bool, save) -> dict:
    """Every row, each handed to `save(rows)` as it completes (a run cut short keeps what it did).
    HF's compiled row, the longest and the likeliest to fail on a new stack, comes last."""
    ps = prompts(batch, 64, cfg.vocab_size, 7)
    lora_dirs = make_loras(cfg, device, 32, tmp / "loras")
    res: dict = {}

    def row(name: str, measure) -> None:
        t0 = time.perf_counter()
        try:
            res[name] = round(measure(), 1)
        except Exception as exc:  # one failing row must not cost the others (device minutes are few)
            res[name] = None
            res.setdefault("errors", {})[name] = repr(exc)[:500]
        print(f"{name}: {res[name]} tok/s ({time.perf_counter() - t0:.1f} s)", flush=True)
        save(res)

    for n in (0, 1, 8, 32):
        row(f"ours_{n}_loras_tok_s", lambda n=n: ours(cfg, dtype, device, ps, new, lora_dirs, n, tmp / f"s{n}",
                                                      row=f"ours_{n}_loras"))
    for n in (0, 32):  # the same rows with every step dynamic (`--enforce-eager`): what graphs buy
        row(f"ours_{n}_loras_eager_tok_s", lambda n=n: ours(cfg, dtype, device, ps, new, lora_dirs, n,
                                                            tmp / f"e{n}", mode="dynamic", row=f"ours_{n}_loras_eager"))
    row("ours_mixed_kinds_tok_s", lambda: ours_mixed(cfg, dtype, device, ps, new, make_kinds(cfg, tmp / "kinds"),
                                                     tmp / "mixed"))
    big = prompts(big_batch, 64, cfg.vocab_size, 8)
    row(f"ours_base_batch_{big_batch}_tok_s", lambda: ours(cfg, dtype, device, big, new, lora_dirs, 0, tmp / "big",
                                                           row=f"ours_base_batch_{big_batch}"))
    row("hf_static_base_tok_s", lambda: hf_static(make_model(cfg, dtype, device), ps, new, device))

    def peft_mixed() -> float:
        peft_model = PeftModel.from_pretrained(make_model(cfg, dtype, device), lora_dirs[0], adapter_name="l0")
        for i in range(1, 32):
            peft_model.load_adapter(lora_dirs[i], adapter_name=f"l{i}")
        return hf_static(peft_model, ps, new, device, [f"l{i % 32}" for i in range(batch)])

    row("peft_mixed_32_loras_tok_s", peft_mixed)
    if compiled:
        release(device)
        row("hf_compiled_static_cache_tok_s", lambda: hf_compiled(make_model(cfg, dtype, device), ps, new, device))
    return res


def memory_floor(cfg, dtype, device, batch, prompt, new) -> dict:
    """The decode step's physical floor on this device, measured in the same run: every weight
    and the batch's KV read once per step, at the copy bandwidth measured here (best of 5 copies
    of a large buffer). -> bandwidth, bytes per step, floor step ms and floor tok/s."""
    n = (256 << 20) if torch.device(device).type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    bandwidth = 2 * n / best  # read + write
    del src, dst
    elt = torch.empty((), dtype=dtype).element_size()
    hidden, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or hidden // heads
    per_layer = hidden * hd * (heads + 2 * kvh) + heads * hd * hidden + 3 * hidden * inter
    params = layers * per_layer + cfg.vocab_size * hidden * (1 if cfg.tie_word_embeddings else 2)
    mean_ctx = prompt + new / 2
    kv = batch * mean_ctx * layers * 2 * kvh * hd * elt
    step_bytes = params * elt + kv
    step_s = step_bytes / bandwidth
    return {"bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_bytes": params * elt, "kv_bytes_mean": int(kv),
            "floor_step_ms": round(1e3 * step_s, 3), "floor_tok_s": round(batch / step_s, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--config-dir", default=None, help="a config.json's directory (overrides --shape)")
    ap.add_argument("--big-batch", type=int, default=256, help="the large-batch base row")
    ap.add_argument("--skip-compiled", action="store_true", help="no torch.compile'd HF row (always on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = shape_config(args)
    if args.quick:
        cfg.num_hidden_layers, args.batch, args.new, args.big_batch = 2, 8, 8, 16
        cfg.vocab_size = min(cfg.vocab_size, 4096)
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new,
            "prompt_tokens": 64, "shape": args.config_dir or args.shape, "weights": "random (seeded)"}
    dtype = getattr(torch, args.dtype)

    def save(rows=None) -> None:
        """Write what is known so far (each row as it completes: a run cut short keeps it)."""
        if rows is not None:
            info["throughput"] = rows
        info["step_breakdown_ms"] = BREAKDOWN
        info["graph_capture_seconds"] = CAPTURE_SECONDS
        if args.out:
            Path(args.out).write_text(json.dumps(info, indent=1))

    time_calls(STEP_PHASES, PHASE_SECONDS, PHASE_CALLS)
    with tempfile.TemporaryDirectory() as tmp:
        for key, mode in (("parity_fp32", "dynamic"), ("parity_fp32_fixed_shape", fixed_mode(args.device))):
            try:
                info[key] = parity(cfg, args.device, Path(tmp) / "parity", mode)
            except Exception as exc:  # recorded (and the run fails at the end), the throughput still measured
                info[key] = {"mode": mode, "error": repr(exc)[:1000]}
            save()
        print(json.dumps(info, indent=1), flush=True)
        info["memory_floor"] = floor = memory_floor(cfg, dtype, args.device, args.batch, 64, args.new)
        compiled = args.device.startswith("cuda") and not args.skip_compiled
        t = throughput(cfg, args.device, dtype, Path(tmp), args.batch, args.new, args.big_batch, compiled, save)

    def ratio(a, b):
        return t[a] / t[b] if t.get(a) and t.get(b) else None

    # the floor counts decode only; the measured figure includes the prompt's prefill: a lower bound
    info["ratios"] = {"base_vs_memory_floor": t["ours_0_loras_tok_s"] / floor["floor_tok_s"]
                      if t.get("ours_0_loras_tok_s") else None,
                      "base_vs_hf_eager": ratio("ours_0_loras_tok_s", "hf_static_base_tok_s"),
                      "32_loras_vs_our_base": ratio("ours_32_loras_tok_s", "ours_0_loras_tok_s"),
                      "mixed_kinds_vs_our_base": ratio("ours_mixed_kinds_tok_s", "ours_0_loras_tok_s"),
                      f"batch_{args.big_batch}_vs_batch_{args.batch}":
                          ratio(f"ours_base_batch_{args.big_batch}_tok_s", "ours_0_loras_tok_s"),
                      "base_graphs_vs_eager": ratio("ours_0_loras_tok_s", "ours_0_loras_eager_tok_s"),
                      "32_loras_graphs_vs_eager": ratio("ours_32_loras_tok_s", "ours_32_loras_eager_tok_s")}
    if compiled:
        info["ratios"]["base_vs_hf_compiled"] = ratio("ours_0_loras_tok_s", "hf_compiled_static_cache_tok_s")
    save(t)
    print(json.dumps(info, indent=1))
    failed = [k for k in ("parity_fp32", "parity_fp32_fixed_shape") if info[k].get("equal") != info[k].get("rows")]
    if failed or t.get("errors"):
        raise SystemExit(f"failed: {failed + sorted(t.get('errors', {}))}")

if __name__ == "__main__":
    main()
