"""End of a run: write the final adapter and assemble training_report.json (main process only)."""

from __future__ import annotations

import time

from .evaluate import eval_loss, exact_match, new_token_budget
from .methods import count_params
from .report import peak_memory_mb


def final_eval(trainer) -> dict:
    """Eval loss + exact match of greedy generation on the eval set (first eval_max_examples rows)."""
    a, model = trainer.args, trainer._unwrapped()
    if not trainer.eval_rows:
        return {"loss": None, "exact_match": None, "n_loss": 0, "n_generated": 0}
    if trainer.last_eval is not None and trainer.last_eval[0] == trainer.step:  # just computed: reuse
        _, loss, loss_time = trainer.last_eval
    else:
        t0 = time.perf_counter()
        loss = eval_loss(model, trainer.eval_rows, trainer.pad_id, a.eval_batch_size, trainer.acc.device)
        loss_time = time.perf_counter() - t0
    rows = trainer.eval_rows[: a.eval_max_examples]
    t1 = time.perf_counter()
    acc, samples = exact_match(model, trainer.tok, rows, batch_size=a.eval_batch_size,
                               max_new_tokens=new_token_budget(rows, a.max_new_tokens), device=trainer.acc.device)
    gen_time = time.perf_counter() - t1
    return {"loss": loss, "exact_match": acc, "n_loss": len(trainer.eval_rows), "n_generated": len(rows),
            "loss_time_s": loss_time, "generate_time_s": gen_time,
            "eval_examples_per_s": len(trainer.eval_rows) / loss_time if loss_time else None,
            "generate_examples_per_s": len(rows) / gen_time if gen_time else None,
            "samples": samples[:5]}


def build_report(trainer, speed: dict, *, interrupted: bool) -> dict:
    a = trainer.args
    if not interrupted:
        trainer.trainable.save(trainer.out)  # the final adapter, PEFT format (bottleneck: ours)
    trainable, total = count_params(trainer._unwrapped())
    evaluation = None if interrupted else final_eval(trainer)
    return {
        "method": a.method,
        "adapter_config": trainer.trainable.describe(),
        "options": vars(a.options) if hasattr(a.options, "__dict__") else a.options,
        "model": a.model,
        "model_dir": str(trainer.model_dir),
        "data": {"train": a.data, "eval": a.eval_data, "eval_split": a.eval_split,
                 "n_train": len(trainer.train_rows), "n_eval": len(trainer.eval_rows)},
        "hyperparameters": {"lr": trainer.lr, "batch_size": a.batch_size, "grad_accum": a.grad_accum,
                            "max_length": a.max_length, "seed": a.seed, "total_steps": trainer.total,
                            "warmup_steps": trainer.warmup, "world_size": trainer.acc.num_processes},
        "params": {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / total},
        "memory": peak_memory_mb(),
        "speed": speed,
        "step": trainer.step,
        "interrupted": interrupted,
        "history": trainer.history,
        "best": trainer.best,
        "eval": evaluation,
    }
