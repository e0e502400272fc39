"""The parity suite's oracles: what "the same tokens as PEFT" means, in one place.

- `generate_oracle`: `model.generate` (HF for the base, `PeftModel.generate` for adapters), greedy.
  Right for the base and for weight adapters (LoRA, (IA)3, bottleneck), whose math lives in the
  modules and not in generate's cache plumbing.
- `forward_oracle`: a greedy loop over `model.forward` without any cache, re-running the whole
  sequence every step. For prompt-learning kinds (prompt tuning, P-tuning, prefix tuning) this is
  the method's definition — it is what PEFT trains through — and it does not depend on how
  `PeftModel.prepare_inputs_for_generation` and transformers' generate hand the cache to each
  other, which changed under us in transformers 5.24 (docs/design.md, "Supported versions").
- `oracle`: the one the parity tests compare against: `forward_oracle` for prompt-learning
  models, `generate_oracle` otherwise. Whether PEFT's generate still agrees with the forward
  definition is checked on its own, loudly, by tests/test_oracle_plumbing.py.
"""

from __future__ import annotations

import torch


def versions() -> str:
    import peft
    import transformers

    return f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"


def is_prompt_learning(model) -> bool:
    """True for a PeftModel whose active adapter is a prompt-learning method."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def generate_oracle(model, ids: list[int], new: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new, do_sample=False)
    # [1, len(ids) + new] (PEFT's prompt-learning generate also returns only the real tokens);
    # slicing at len(ids) rather than -new keeps an early EOS from shifting the window
    return out[0, len(ids):].tolist()


@torch.no_grad()
def forward_oracle(model, ids: list[int], new: int) -> list[int]:
    seq = list(ids)
    for _ in range(new):
        logits = model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                       use_cache=False).logits  # [1, virtual + len(seq), V]
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def oracle(model, ids: list[int], new: int) -> list[int]:
    return (forward_oracle if is_prompt_learning(model) else generate_oracle)(model, ids, new)
