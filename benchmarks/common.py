"""Shared helpers for benchmarks/{serving,lora,kinds}.py (see benchmarks/README.md).

Prompts, percentiles, Markdown tables + JSON output, the HF `generate` baseline with per-step
timestamps, PEFT adapter creation, and the real HTTP server as a subprocess with an SSE client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/ (peftserve console script)

warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# -- arguments / environment ----------------------------------------------------------------
def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="same dtype on both sides")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (ours, HF and the server)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (finishes in < 2 min)")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default", help="`default` (SmolLM2-135M-Instruct) or a local HF model dir")
    return p


def setup(args) -> torch.dtype:
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    sizes = "QUICK (smoke) sizes" if args.quick else "full sizes"
    print(f"# torch {torch.__version__} | torch threads = {torch.get_num_threads()} (--threads) | dtype {args.dtype}"
          f" | {os.cpu_count()} cpus | load avg {os.getloadavg()[0]:.2f} | {sizes}", flush=True)
    return getattr(torch, args.dtype)


def environment(args) -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "threads": torch.get_num_threads(), "dtype": args.dtype, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg(),
            "quick": args.quick, "seed": args.seed, "argv": sys.argv[1:]}


def load_model(args, dtype):
    """A fresh (model, tokenizer): each engine and each HF baseline gets its own instance."""
    from transformers.utils import logging as hf_logging

    from peftserve.adapters.base_model import load_base_model

    hf_logging.disable_progress_bar()
    model, tok, _ = load_base_model(args.model, dtype=dtype)
    return model, tok


def hf_baseline(args, dtype):
    """HF model for `generate` baselines: EOS disabled (= ignore_eos), explicit pad id."""
    model, tok = load_model(args, dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return model, tok


# -- workloads ------------------------------------------------------------------------------
def token_pool(tokenizer, vocab_size: int) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(vocab_size) if i not in special]


def random_prompt(rng: random.Random, pool: list[int], n: int) -> list[int]:
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def zipf_choices(rng: random.Random, n_items: int, s: float, k: int) -> list[int]:
    weights = [1.0 / (i + 1) ** s for i in range(n_items)]
    return rng.choices(range(n_items), weights=weights, k=k)


# -- statistics / output --------------------------------------------------------------------
def pct(values, q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(records: list[dict], makespan: float) -> dict:
    """records: {"arrival": s, "times": [token timestamps, s]} on one clock -> serving metrics."""
    done = [r for r in records if r["times"]]
    ttft = [r["times"][0] - r["arrival"] for r in done]
    itl = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]
    e2e = [r["times"][-1] - r["arrival"] for r in done]
    tokens = sum(len(r["times"]) for r in done)
    return {"requests": len(records), "completed": len(done), "tokens": tokens, "makespan_s": makespan,
            "tok_s": tokens / makespan if makespan > 0 else float("nan"),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99), "e2e_p50_s": pct(e2e, 50)}


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def table(title: str, headers: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(fmt(v) for v in row) + " |")
    sys.stdout.flush()


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed ones."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scratch_dir(prefix: str) -> Path:
    """A temporary directory for a benchmark's adapters and stores (gigabytes for lora.py), removed
    when the process exits, unless PEFTSERVE_KEEP_BENCH_TMP=1 (then its path is printed)."""
    import atexit
    import shutil

    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("PEFTSERVE_KEEP_BENCH_TMP") == "1":
        print(f"# scratch directory kept: {path}", flush=True)
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}")


# -- timing inside the engine ---------------------------------------------------------------
def time_calls(phases: dict[str, tuple[object, str]], seconds: dict, calls: dict | None = None) -> None:
    """Wrap each `getattr(owner, name)` of `phases` (label -> (owner, name)) so every call adds
    its wall time to `seconds[label]` (and 1 to `calls[label]`). For the benchmarks' breakdowns;
    permanent for the process."""
    for label, (owner, name) in phases.items():
        inner = getattr(owner, name)

        def timed(*args, _inner=inner, _label=label, **kwargs):
            t0 = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                seconds[_label] += time.perf_counter() - t0
                if calls is not None:
                    calls[_label] += 1

        setattr(owner, name, timed)


# -- HF / PEFT baselines --------------------------------------------------------------------
class StepTimes:
    """A `generate` streamer recording when each step's tokens exist (first put = the prompt)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter() - self.t0)

    def end(self) -> None:
        pass

    @property
    def token_times(self) -> list[float]:
        return self.puts[1:]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, **kwargs):
    """Greedy static batch (left-padded) -> (seconds, per-step token times from start, new ids)."""
    ids, mask = left_pad(prompts, model.generation_config.pad_token_id)
    streamer = StepTimes()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, streamer=streamer, **kwargs)
    seconds = time.perf_counter() - streamer.t0
    return seconds, streamer.token_times, out[:, ids.shape[1]:]


def make_peft_adapter(model, out_dir: Path, config, seed: int) -> Path:
    """Create a random PEFT adapter on `model` with PEFT itself, save it, restore `model`."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, config)  # LoRA: init_lora_weights=False; prompt learning: random init
    pm.save_pretrained(out_dir)
    if config.peft_type.value == "LORA":
        pm.unload()  # removes the injected LoRA layers: `model` is the plain base again
    return Path(out_dir)


def perturbed_copy(weights_file: Path, seed: int) -> bytes:
    """Same PEFT tensors scaled by a seeded random factor: a distinct adapter (new content hash)."""
    from safetensors.torch import load_file, save

    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(weights_file))
    out = {k: (v.float() * (0.5 + torch.rand((), generator=g))).to(v.dtype).contiguous() for k, v in tensors.items()}
    return save(out)


# -- the real HTTP server -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`peftserve serve` as a subprocess on 127.0.0.1 (waits for GET /ready; SIGINT on exit)."""

    def __init__(self, args, extra: list[str] = (), timeout_s: float = 240.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = [str(BIN / "peftserve")]
        if not (BIN / "peftserve").exists():  # no console script (e.g. not pip-installed): run the module
            exe = [sys.executable, "-m", "peftserve.server.cli"]
        self.cmd = [*exe, "serve", "--model", str(args.model), "--host", "127.0.0.1",
                    "--port", str(self.port), "--dtype", args.dtype, "--threads", str(args.threads),
                    "--log-level", "warning", *extra]
        self.timeout_s = timeout_s

    def __enter__(self) -> "Server":
        import httpx

        self.log = tempfile.NamedTemporaryFile("w+", prefix="peftserve-bench-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server did not become ready: {' '.join(self.cmd)}\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def sse_generate(client, url: str, body: dict, t0: float, rec: dict) -> None:
    """POST /generate with stream=true; appends client-side token timestamps (s since t0)."""
    async with client.stream("POST", url + "/generate", json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "token_id" in ev:
                rec["times"].append(time.perf_counter() - t0)
            elif "error" in ev:
                rec["error"] = ev["error"]
            else:
                rec["usage"] = ev.get("usage")


async def replay(submit, requests: list[dict]) -> tuple[list[dict], float]:
    """Start each request at its `arrival` (s); submit(req, t0, rec) fills rec["times"].
    -> (records, makespan from t0 to the last token)."""
    t0 = time.perf_counter()
    recs = [{"arrival": r["arrival"], "times": []} for r in requests]

    async def one(req, rec):
        delay = req["arrival"] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        await submit(req, t0, rec)

    await asyncio.gather(*(one(r, rec) for r, rec in zip(requests, recs)))
    end = max((rec["times"][-1] for rec in recs if rec["times"]), default=time.perf_counter() - t0)
    return recs, end
