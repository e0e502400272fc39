"""Held-out exact-match accuracy of the base model vs a LoRA trained for a few CPU minutes.

    .venv/bin/python benchmarks/train_accuracy.py --task extraction --minutes 4

Greedy-decodes the eval split with the frozen default model (same raw prompts the adapter is
trained on), trains a LoRA with `train-adapter`'s Trainer (time-boxed), then scores the trained
adapter on the same rows. Not part of the test suite; results go to stdout and OUTPUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from peftserve.adapters.base_model import load_base_model
from peftserve.adapters.training.data import encode, read_examples
from peftserve.adapters.training.evaluate import exact_match, new_token_budget
from peftserve.adapters.training.methods import MethodOptions
from peftserve.adapters.training.tasks.generate import TASKS, task_paths
from peftserve.adapters.training.trainer import TrainArgs, Trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="extraction")
    p.add_argument("--minutes", type=float, default=4.0, help="training wall-time budget")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--eval-examples", type=int, default=80)
    p.add_argument("--model", default="default")
    p.add_argument("--output", default="runs/bench-train-accuracy")
    ns = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

    train_path, eval_path = task_paths(ns.task)
    model, tok, model_dir = load_base_model(ns.model)
    rows = encode(read_examples(eval_path, tok), tok, 256)[: ns.eval_examples]
    t0 = time.perf_counter()
    base_acc, base_samples = exact_match(model, tok, rows, batch_size=16, device="cpu",
                                         max_new_tokens=new_token_budget(rows, 64))
    base_time = time.perf_counter() - t0
    print(f"base model: exact match {base_acc:.3f} on {len(rows)} {ns.task} eval rows ({base_time:.0f} s)")
    print(f"  e.g. expected {base_samples[0]['expected']!r}, got {base_samples[0]['predicted']!r}")

    args = TrainArgs(method="lora", data=str(train_path), eval_data=str(eval_path), output=ns.output,
                     model=ns.model, max_steps=ns.max_steps, max_time_s=ns.minutes * 60, lr=ns.lr,
                     batch_size=ns.batch_size, eval_every=10**9, eval_max_examples=ns.eval_examples,
                     overwrite=True, options=MethodOptions(r=ns.r, alpha=2 * ns.r))
    report = Trainer(args, base=(model, tok, model_dir)).run()
    ev = report["eval"]
    result = {"task": ns.task, "model": ns.model, "eval_rows": len(rows), "base_exact_match": base_acc,
              "lora_exact_match": ev["exact_match"], "lora_eval_loss": ev["loss"], "steps": report["step"],
              "batch_size": ns.batch_size, "train_time_s": report["speed"]["train_time_s"],
              "steps_per_s": report["speed"]["steps_per_s"], "trainable_params": report["params"]["trainable"],
              "peak_rss_mb": report["memory"]["peak_rss_mb"], "example": ev["samples"][0]}
    Path(ns.output, "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"LoRA r={ns.r} after {report['step']} steps ({report['speed']['train_time_s']:.0f} s): "
          f"exact match {ev['exact_match']:.3f} (base {base_acc:.3f}), eval loss {ev['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
