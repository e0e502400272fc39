"""`peftserve train-adapter` / `train-adapter`: train one adapter, or `compare` all methods.

Exit codes: 0 ok, 2 bad data / arguments / checkpoint (one clear line, no traceback),
130 interrupted by Ctrl-C (a valid `output/last` checkpoint was written; continue with --resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .methods import DEFAULT_INIT_TEXT, TRAIN_METHODS, MethodOptions

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _add_method_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=8)
    g.add_argument("--alpha", type=int, default=16)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--target-modules", default="all-linear", help="comma list, or all-linear")
    g = p.add_argument_group("prompt tuning / p-tuning / prefix tuning")
    g.add_argument("--num-virtual-tokens", type=int, default=20)
    g.add_argument("--init", choices=("text", "random"), default="text", help="prompt-tuning init")
    g.add_argument("--init-text", default=DEFAULT_INIT_TEXT)
    g.add_argument("--encoder", choices=("mlp", "lstm"), default="mlp", help="p-tuning prompt encoder")
    g.add_argument("--encoder-hidden-size", type=int, default=128)
    g.add_argument("--projection", action=argparse.BooleanOptionalAction, default=None,
                   help="prefix MLP reparameterisation (default: off for prefix-tuning, on for p-tuning-v2)")
    g = p.add_argument_group("bottleneck")
    g.add_argument("--reduction-factor", type=float, default=16)
    g.add_argument("--placement", choices=("houlsby", "pfeiffer", "parallel"), default="pfeiffer")
    g.add_argument("--non-linearity", choices=("relu", "gelu", "silu", "tanh"), default="relu")
    g.add_argument("--scaling", type=float, default=1.0)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftserve train-adapter",
                                description="Train a PEFT adapter (or our bottleneck adapter) on JSONL data. "
                                            "Subcommand: `compare --task NAME` trains every method.")
    p.add_argument("--method", choices=TRAIN_METHODS, required=True,
                   help="an adapter kind, or `full` (full fine-tuning: a whole model, not servable as an adapter)")
    p.add_argument("--data", required=True, help="JSONL: prompt/completion, instruction/input/output, or messages")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--model", default="default", help='"default" (SmolLM2-135M-Instruct) or a local HF dir')
    ev = p.add_mutually_exclusive_group()
    ev.add_argument("--eval-data", help="held-out JSONL")
    ev.add_argument("--eval-split", type=float, help="hold out this fraction of --data instead")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="stop training after this wall time")
    p.add_argument("--lr", type=float, help="default depends on the method")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50, help="steps between eval-loss checks (best checkpoint)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-new-tokens", type=int, default=64, help="cap for exact-match generation")
    p.add_argument("--eval-max-examples", type=int, default=200, help="eval rows scored by generation")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last")
    p.add_argument("--overwrite", action="store_true", help="discard checkpoints already in OUTPUT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    p.add_argument("--upload", metavar="URL", help="POST the adapter to URL/adapters when done")
    p.add_argument("--admin-key", help="admin key for --upload (or env PEFTSERVE_ADMIN_KEY)")
    p.add_argument("--name", help="adapter name for --upload (default: the output dir name)")
    _add_method_options(p)
    return p


def args_from_namespace(ns: argparse.Namespace):
    from .trainer import TrainArgs

    opts = MethodOptions(r=ns.r, alpha=ns.alpha, dropout=ns.dropout, target_modules=ns.target_modules,
                         num_virtual_tokens=ns.num_virtual_tokens, init=ns.init, init_text=ns.init_text,
                         encoder=ns.encoder, encoder_hidden_size=ns.encoder_hidden_size, projection=ns.projection,
                         reduction_factor=ns.reduction_factor, placement=ns.placement,
                         non_linearity=ns.non_linearity, scaling=ns.scaling)
    return TrainArgs(method=ns.method, data=ns.data, output=ns.output, model=ns.model, eval_data=ns.eval_data,
                     eval_split=ns.eval_split, epochs=ns.epochs, max_steps=ns.max_steps, max_time_s=ns.max_time,
                     lr=ns.lr, batch_size=ns.batch_size, grad_accum=ns.grad_accum, max_length=ns.max_length,
                     seed=ns.seed, eval_every=ns.eval_every, warmup_steps=ns.warmup_steps,
                     max_new_tokens=ns.max_new_tokens, eval_max_examples=ns.eval_max_examples,
                     eval_batch_size=ns.eval_batch_size, resume=ns.resume, overwrite=ns.overwrite,
                     progress=not ns.no_progress, cpu=ns.cpu, options=opts)


def _validate(p: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    for name in ("batch_size", "grad_accum", "max_length", "eval_every", "num_virtual_tokens", "r"):
        if getattr(ns, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if ns.max_steps is not None and ns.max_steps < 1:
        p.error("--max-steps must be >= 1")
    if ns.eval_split is not None and not 0 < ns.eval_split < 1:
        p.error("--eval-split must be between 0 and 1")
    if ns.epochs <= 0 or ns.reduction_factor <= 0:
        p.error("--epochs and --reduction-factor must be > 0")


def run_train(argv: list[str]) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .trainer import Trainer, TrainingSetupError

    p = train_parser()
    ns = p.parse_args(argv)
    _validate(p, ns)
    try:
        report = Trainer(args_from_namespace(ns)).run()
    except (DataError, CheckpointError, TrainingSetupError) as exc:
        print(f"train-adapter: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if report.get("interrupted"):
        print(f"interrupted at step {report['step']}; resume with: --resume --output {ns.output}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if report:  # main process only
        ev = report.get("eval") or {}
        print(f"saved {ns.output} | trainable {report['params']['trainable']:,} "
              f"({report['params']['trainable_percent']:.3f}%) | eval loss {ev.get('loss')} | "
              f"exact match {ev.get('exact_match')}")
        if ns.upload:
            from .upload import UploadError, upload_adapter

            try:
                print(upload_adapter(ns.output, ns.upload, name=ns.name, admin_key=ns.admin_key))
            except UploadError as exc:
                print(f"train-adapter: upload failed: {exc}", file=sys.stderr)
                return 1
    return 0


SERVING_COMPARISON_TASKS = ("zh-reviews",)
SERVING_COMPARISON_MODULE = "peftserve.server.evaluation.compare_zh"


def _wants_serving_comparison(argv: list[str]) -> bool:
    return any(a == f"--task={t}" for a in argv for t in SERVING_COMPARISON_TASKS) or any(
        a == "--task" and i + 1 < len(argv) and argv[i + 1] in SERVING_COMPARISON_TASKS for i, a in enumerate(argv))


def _exec_serving_comparison(argv: list[str]) -> int:
    """`compare --task zh-reviews` scores every method through the serving engine, so it lives in
    `peftserve.server.evaluation` (server side). It is started as its own process, not imported:
    `adapters/` never imports `server`, and the training package works without it. exec (not a
    child process) keeps one PID, so Ctrl-C / `timeout` reach the comparison directly."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", SERVING_COMPARISON_MODULE, *argv])
    return 1  # not reached: execv replaces the process or raises OSError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Known-harmless library chatter that would otherwise interleave with the progress bar.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Position ids are not supported.*")
    if argv and argv[0] == "compare":
        if _wants_serving_comparison(argv[1:]):
            return _exec_serving_comparison(argv[1:])
        from .compare import main as compare_main

        return compare_main(argv[1:])
    return run_train(argv)


if __name__ == "__main__":
    sys.exit(main())
