"""The training loop: completion-only loss, grad accumulation, periodic eval, best/last
checkpoints, resume, Ctrl-C, and data parallelism through accelerate (torchrun-ready; gloo on CPU).

Step bookkeeping: `step` counts finished optimizer steps. Optimizer step s consumes micro-batches
s*grad_accum .. s*grad_accum+grad_accum-1 of the deterministic MicroBatches stream, so a resumed run
sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .data import MicroBatches, collate, encode, read_examples, split_eval
from .evaluate import eval_loss
from .methods import DEFAULT_LR, MethodOptions, build_trainable
from .report import plot_loss, write_report


@dataclass
class TrainArgs:
    method: str
    data: str
    output: str
    model: str = "default"
    eval_data: str | None = None
    eval_split: float | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float | None = None  # None -> DEFAULT_LR[method]
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    seed: int = 0
    eval_every: int = 50
    warmup_steps: int | None = None  # None -> 5% of the steps
    max_time_s: float | None = None  # stop (normally, not as an interrupt) after this much wall time
    max_new_tokens: int = 64
    eval_max_examples: int = 200  # rows scored by (slow) greedy generation
    eval_batch_size: int = 16
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    cpu: bool = False
    options: MethodOptions = field(default_factory=MethodOptions)


class TrainingSetupError(RuntimeError):
    """Bad arguments / output directory state, reported by the CLI as a usage error."""


class _StopFlag:
    """First Ctrl-C asks the loop to stop at the next step boundary (so the saved state is exactly
    a finished step); a second Ctrl-C raises KeyboardInterrupt at once (default handler restored)."""

    def __init__(self):
        self.set, self._old = False, None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: keep the default behaviour
            self._old = None
        return self

    def _handle(self, *_):
        self.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Trainer:
    def __init__(self, args: TrainArgs, base=None, on_step: Callable[[int, float], None] | None = None):
        """base: optional (model, tokenizer, model_dir) to skip load_base_model (tests use a tiny model)."""
        from accelerate import Accelerator

        self.args, self.on_step = args, on_step
        self.acc = Accelerator(cpu=args.cpu)
        self.out = Path(args.output)
        self._prepare_output_dir()
        if base is None:
            # Tokenizer first: bad data is reported in a second, before the (slow) model load.
            from transformers import AutoTokenizer

            from peftserve.adapters.base_model import load_base_model, resolve_model_dir

            self.tok = AutoTokenizer.from_pretrained(resolve_model_dir(args.model))
            self._load_data()
            model, self.tok, self.model_dir = load_base_model(args.model)
        else:
            model, self.tok, self.model_dir = base
            self._load_data()
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        try:
            self.trainable = build_trainable(args.method, model, self.model_dir, args.options, args.seed)
        except ValueError as exc:  # e.g. PEFT: "Target modules {'foo'} not found in the base model"
            raise TrainingSetupError(f"cannot set up --method {args.method}: {exc}") from None
        self.trainable.model.to(self.acc.device).train()
        self.lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
        params = [p for p in self.trainable.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        self.step, self.history, self.best = 0, {"train": [], "eval": []}, None
        self.last_eval: tuple[int, float, float] | None = None  # (step, eval loss, seconds)
        if args.resume:
            self._resume()
        self.model, self.optimizer = self.acc.prepare(self.trainable.model, self.optimizer)
        if len(self.train_rows) < self.acc.num_processes:
            raise TrainingSetupError(f"{len(self.train_rows)} training rows cannot be split over "
                                     f"{self.acc.num_processes} processes")
        self.batches = MicroBatches(self.train_rows, args.batch_size, args.seed,
                                    self.acc.process_index, self.acc.num_processes)
        per_epoch_steps = math.ceil(self.batches.per_epoch / args.grad_accum)
        self.total = args.max_steps if args.max_steps else max(1, math.ceil(args.epochs * per_epoch_steps))
        self.warmup = args.warmup_steps if args.warmup_steps is not None else max(1, self.total // 20)

    # ------------------------------------------------------------------ setup
    def _prepare_output_dir(self) -> None:
        has_ckpt = (self.out / "last").exists() or (self.out / "best").exists()
        if has_ckpt and not (self.args.resume or self.args.overwrite):
            raise TrainingSetupError(f"{self.out} already holds checkpoints: pass --resume to continue "
                                     "or --overwrite to start over")
        if self.args.overwrite and not self.args.resume and self.acc.is_main_process:
            for sub in ("last", "best"):
                shutil.rmtree(self.out / sub, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)

    def _load_data(self) -> None:
        a = self.args
        train = read_examples(a.data, self.tok)
        if a.eval_data:
            evals = read_examples(a.eval_data, self.tok)
        elif a.eval_split:
            train, evals = split_eval(train, a.eval_split, a.seed, a.data)
        else:
            evals = []
        self.train_rows = encode(train, self.tok, a.max_length)
        self.eval_rows = encode(evals, self.tok, a.max_length)

    def _resume(self) -> None:
        meta = ckpt.load_checkpoint(self.out / "last", self.trainable, self.optimizer)
        if meta.get("method") != self.args.method or meta.get("options") != asdict(self.args.options):
            raise ckpt.CheckpointError(f"{self.out / 'last'} was trained with --method {meta.get('method')} "
                                       "and other options; resume with the same method options")
        self.step, self.history, self.best = meta["step"], meta["history"], meta.get("best")

    # ------------------------------------------------------------------ loop
    def lr_at(self, step: int) -> float:
        """Linear warm-up, then linear decay to 10% of the peak at the last step."""
        warm = min(1.0, (step + 1) / self.warmup)
        return self.lr * warm * (1.0 - 0.9 * step / max(1, self.total))

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches -> (mean loss, tokens seen locally)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        losses, tokens = [], 0
        ga = self.args.grad_accum
        for k in range(ga):
            batch = collate(self.batches.batch(self.step * ga + k), self.pad_id)
            batch = {n: t.to(self.acc.device) for n, t in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            # Skip the gradient all-reduce on all but the last micro-batch of the step.
            with self.acc.no_sync(self.model) if k < ga - 1 else nullcontext():
                loss = self.model(**batch).loss
                self.acc.backward(loss / ga)
            losses.append(loss.detach())
        self.acc.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean = torch.stack(losses).mean()
        if self.acc.num_processes > 1:
            mean = self.acc.reduce(mean, reduction="mean")
        return float(mean), tokens

    def _stop_requested(self, flag: _StopFlag) -> bool:
        if self.acc.num_processes == 1:
            return flag.set
        # Every rank must stop at the same step, or the others would hang in the next all-reduce.
        t = torch.tensor([1.0 if flag.set else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum") > 0)

    def _out_of_time(self, run_start: float) -> bool:
        if self.args.max_time_s is None:
            return False
        over = time.perf_counter() - run_start >= self.args.max_time_s
        if self.acc.num_processes > 1:  # ranks must agree, like _stop_requested
            t = torch.tensor([1.0 if over else 0.0], device=self.acc.device)
            over = bool(self.acc.reduce(t, reduction="sum") > 0)
        return over

    def run(self) -> dict:
        from tqdm.auto import tqdm

        start_step, train_time, tokens, interrupted = self.step, 0.0, 0, False
        run_start = time.perf_counter()
        bar = tqdm(total=self.total, initial=self.step, desc=self.args.method, dynamic_ncols=True,
                   disable=not (self.args.progress and self.acc.is_local_main_process))
        try:
            with _StopFlag() as flag:
                while self.step < self.total and not self._out_of_time(run_start):
                    if self._stop_requested(flag):
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    loss, n_tok = self.train_step()
                    train_time += time.perf_counter() - t0
                    tokens += n_tok * self.acc.num_processes
                    self.history["train"].append([self.step, loss])
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_at(self.step - 1):.2e}")
                    if self.step % self.args.eval_every == 0 and self.step < self.total:
                        self.periodic_eval()
                    if self.on_step is not None:
                        self.on_step(self.step, loss)
        except KeyboardInterrupt:
            interrupted = True
            bar.write(f"interrupted at step {self.step}: saving {self.out / 'last'} (continue with --resume)")
        finally:
            bar.close()
        speed = {"steps": self.step - start_step, "train_time_s": train_time,
                 "steps_per_s": (self.step - start_step) / train_time if train_time else None,
                 "tokens_per_s": tokens / train_time if train_time else None}
        if interrupted:
            self.save_last()
            return self.finish(speed, interrupted=True)
        self.periodic_eval()
        self.save_last()
        return self.finish(speed, interrupted=False)

    # ------------------------------------------------------------------ eval / save
    def periodic_eval(self) -> None:
        """Eval loss on the main process (others wait); keep `best` by eval loss, or by the recent
        train loss when there is no eval set."""
        if self.acc.is_main_process:
            if self.eval_rows:
                t0 = time.perf_counter()
                metric = eval_loss(self._unwrapped(), self.eval_rows, self.pad_id, self.args.eval_batch_size,
                                   self.acc.device)
                self.last_eval = (self.step, metric, time.perf_counter() - t0)  # final_eval reuses it
                self.history["eval"].append([self.step, metric])
            else:
                recent = [l for _, l in self.history["train"][-max(1, self.args.eval_every):]]
                metric = sum(recent) / max(1, len(recent))
            if self.best is None or metric < self.best["metric"]:
                self.best = {"step": self.step, "metric": metric,
                             "metric_name": "eval_loss" if self.eval_rows else "train_loss"}
                self.trainable.save(self.out / "best")
                (self.out / "best" / "best.json").write_text(json.dumps(self.best, indent=1))
        self.acc.wait_for_everyone()

    def _unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def save_last(self) -> None:
        if self.acc.is_main_process:
            state = {"step": self.step, "method": self.args.method, "options": asdict(self.args.options),
                     "history": self.history, "best": self.best, "total_steps": self.total}
            ckpt.save_checkpoint(self.out / "last", self.trainable, self.optimizer.optimizer
                                 if hasattr(self.optimizer, "optimizer") else self.optimizer, state)
        self.acc.wait_for_everyone()

    def finish(self, speed: dict, *, interrupted: bool) -> dict:
        """Final adapter into output/, full eval (unless interrupted), report and plot."""
        report = None
        if self.acc.is_main_process:
            from .final import build_report  # local import keeps this module small

            report = build_report(self, speed, interrupted=interrupted)
            write_report(self.out, report)
            data = Path(self.args.data)
            plot_loss(self.out, self.history, f"{self.args.method} on {data.parent.name}/{data.name}")
        self.acc.wait_for_everyone()
        return report or {}


def train(args: TrainArgs, base=None, on_step=None) -> dict:
    return Trainer(args, base=base, on_step=on_step).run()
