"""Does PEFT's `generate` still apply prompt-learning adapters on the installed versions?

The parity suite compares prompt-learning kinds against PEFT's no-cache forward loop
(tests/oracle.py), which cannot drift with generate's cache plumbing. This file checks that
plumbing on its own and fails loudly, naming the versions, when it breaks — as it did with
transformers 5.24 + PEFT 0.21.2 (the cache reaches the model as `cache=`, PEFT looks for
`past_key_values`: prefixes were dropped, soft prompts re-injected at every step). Users who
evaluate adapters with `PeftModel.generate` would get wrong answers on such a combination;
`make install` pins a combination where this passes (deploy/requirements.lock).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

from tests.oracle import forward_oracle, generate_oracle, versions
from tests.tiny import tiny_llama

VOCAB, NEW = 512, 8
KINDS = {
    "prompt-tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
    "prefix-tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "p-tuning-v2": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                              encoder_hidden_size=32),
}
PROMPTS = [[7, 99, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


def _base():
    model = tiny_llama(0, vocab_size=VOCAB)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module", params=list(KINDS))
def adapter(request, tmp_path_factory):
    """(kind, PeftModel reloaded from disk, base-model continuations)."""
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(3)
    pm = get_peft_model(_base(), KINDS[request.param]())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # PEFT starts some encoders near zero: make the adapter matter
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(path)
    ref = PeftModel.from_pretrained(_base(), path).eval()
    ref.generation_config.eos_token_id = None
    base = [generate_oracle(_base(), p, NEW) for p in PROMPTS]
    return request.param, ref, base


def test_forward_definition_is_not_vacuous(adapter):
    kind, ref, base = adapter
    assert [forward_oracle(ref, p, NEW) for p in PROMPTS] != base, f"{kind}: the adapter changes nothing"


def test_peft_generate_applies_prompt_learning_adapters(adapter):
    kind, ref, base = adapter
    by_generate = [generate_oracle(ref, p, NEW) for p in PROMPTS]
    by_forward = [forward_oracle(ref, p, NEW) for p in PROMPTS]
    if by_generate == base:
        pytest.fail(f"PeftModel.generate ignores the {kind} adapter on {versions()}: it returns the base "
                    "model's tokens. Install the locked versions (make install) or a PEFT release that "
                    "reads transformers' `cache` kwarg.")
    assert by_generate == by_forward, (
        f"PeftModel.generate disagrees with PeftModel.forward for {kind} on {versions()}: generate's cache "
        "plumbing is broken for prompt learning on this combination (see docs/design.md, Supported versions)")
