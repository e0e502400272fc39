"""Classification accuracy and served throughput measured THROUGH the serving engine.

Why through the engine and not the trainer's own decoder: the number in a comparison report
should be the number a user gets from `peftserve serve`. So an adapter is registered with the
server's registry (`registry.import_dir`, the same code path as `--adapters DIR` / upload), and
each test prompt is a request to `LLMEngine.generate` with greedy sampling and one new token,
tokenised exactly as `POST /generate` tokenises a `prompt` (`tokenizer(prompt).input_ids`). The
prediction is that first generated token; it is correct only if it is the gold label word's token
(any other token, including the other label word, is wrong). A test checks the predictions
against the HTTP server on a few rows.

Layering: this module imports the engine and `adapters`, so it lives in `peftserve.server.evaluation`
(a server-side tool: server may import adapters); `adapters/` never imports `server`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class ServingEvalError(RuntimeError):
    """An evaluation could not be set up (bad label words, adapter the registry refuses, ...)."""


@dataclass(frozen=True)
class LabelSpace:
    """label -> the token id of its label word (each label word must be exactly one token)."""

    token_ids: dict[str, int]

    @classmethod
    def from_words(cls, tokenizer, words: dict[str, str]) -> "LabelSpace":
        ids = {}
        for label, word in words.items():
            toks = tokenizer(word, add_special_tokens=False).input_ids
            if len(toks) != 1:
                raise ServingEvalError(f"label word {word!r} is {len(toks)} tokens {toks}; the serving evaluation "
                                       "reads the first generated token, so each label word must be one token")
            ids[label] = toks[0]
        if len(set(ids.values())) != len(ids):
            raise ServingEvalError(f"label words share a token: {ids}")
        return cls(ids)

    def label_of(self, token_id: int) -> str | None:
        return next((lab for lab, t in self.token_ids.items() if t == token_id), None)


def engine_config(max_model_len: int = 256, max_batch_size: int = 32, device: str = "cpu"):
    from peftserve.server.engine.config import EngineConfig

    return EngineConfig(max_batch_size=max_batch_size, max_model_len=max_model_len,
                        max_num_batched_tokens=max(512, max_batch_size), max_adapters_per_batch=4, device=device)


class ServingEvaluator:
    """One engine over one base model; adapters are imported into its registry by name.

    `model` is what `load_base_model` takes ("default" or an HF directory). For full fine-tuning
    the fine-tuned directory itself is the base model (it is not an adapter) and `classify` is
    called with adapter=None.
    """

    def __init__(self, model: str | Path, *, max_model_len: int = 256, max_batch_size: int = 32,
                 store: Path | None = None, device: str = "cpu"):
        from peftserve.adapters.base_model import load_base_model
        from peftserve.server.build import build_engine

        hf_model, self.tokenizer, self.model_dir = load_base_model(model, device=device)
        self._tmp = None
        if store is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="peftserve-eval-store-")
            store = Path(self._tmp.name)
        self.serving = build_engine(hf_model, self.tokenizer, engine_config(max_model_len, max_batch_size, device),
                                     store=Path(store))

    def add_adapter(self, path: Path, name: str) -> None:
        from peftserve.adapters.errors import AdapterError

        try:
            self.serving.registry.import_dir(Path(path), name)
        except AdapterError as exc:
            raise ServingEvalError(f"the server refuses {path}: {exc}") from None

    def _handles(self, adapter: str | None, n: int) -> list | None:
        if adapter is None:
            return None
        return [self.serving.registry.resolve(adapter) for _ in range(n)]

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [list(self.tokenizer(p).input_ids) for p in prompts]  # == server/api/generate.py tokenize()

    def first_tokens(self, prompts: list[str], adapter: str | None, chunk: int = 128, progress: str | None = None
                     ) -> list[int]:
        """Greedy first generated token of each prompt through engine.generate (continuous batch)."""
        from tqdm.auto import tqdm

        from peftserve.server.engine.request import SamplingParams

        ids, out = self.prompt_ids(prompts), []
        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        with tqdm(total=len(ids), desc=progress or "classify", disable=progress is None, leave=False) as bar:
            for i in range(0, len(ids), chunk):
                part = ids[i:i + chunk]
                seqs = self.serving.engine.generate(part, params, adapters=self._handles(adapter, len(part)))
                for s in seqs:
                    if s.finish_reason is not None and s.finish_reason.value == "error" or not s.output_ids:
                        raise ServingEvalError(f"the engine failed a request (adapter {adapter!r})")
                    out.append(s.output_ids[0])
                bar.update(len(part))
        return out

    def classify(self, rows: list[dict], labels: LabelSpace, adapter: str | None, progress: str | None = None
                 ) -> dict:
        """Accuracy of the served greedy label word over `rows` ({"prompt", "label", "id"})."""
        t0 = time.perf_counter()
        toks = self.first_tokens([r["prompt"] for r in rows], adapter, progress=progress)
        seconds = time.perf_counter() - t0
        preds = [{"id": r.get("id"), "label": r["label"], "token": t, "pred": labels.label_of(t)}
                 for r, t in zip(rows, toks)]
        correct = sum(p["pred"] == p["label"] for p in preds)
        return {"n": len(rows), "accuracy": correct / len(rows) if rows else float("nan"),
                "off_label": sum(p["pred"] is None for p in preds), "seconds": seconds,
                "requests_per_s": len(rows) / seconds if seconds else None, "predictions": preds}

    def mixed_throughput(self, adapter: str | None, prompts: list[str], *, requests: int = 32,
                         new_tokens: int = 16) -> dict:
        """Generated tokens/s of `requests` requests submitted at once, every other one with
        `adapter` and the rest on the plain base model (a mixed continuous batch); ignore_eos so
        every request decodes exactly `new_tokens` tokens."""
        from peftserve.server.engine.request import SamplingParams

        ids = self.prompt_ids([prompts[i % len(prompts)] for i in range(requests)])
        handles = [self.serving.registry.resolve(adapter) if adapter is not None and i % 2 == 0 else None
                   for i in range(requests)]
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        seqs = self.serving.engine.generate(ids, params, adapters=handles)
        seconds = time.perf_counter() - t0
        generated = sum(len(s.output_ids) for s in seqs)
        return {"requests": requests, "adapter_requests": sum(h is not None for h in handles),
                "new_tokens": new_tokens, "prompt_tokens": sum(map(len, ids)), "seconds": seconds,
                "generated_tokens_per_s": generated / seconds, "requests_per_s": requests / seconds}

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

