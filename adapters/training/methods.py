"""One trainable wrapper per method. PEFT does every method it has; bottleneck is ours.

prefix-tuning vs p-tuning-v2 (both PEFT PrefixTuningConfig, i.e. learned key/value prefixes at
EVERY layer): `prefix-tuning` trains the per-layer prefixes directly (prefix_projection=False);
`p-tuning-v2` reparameterises them through a 2-layer MLP (prefix_projection=True). `--projection`
/ `--no-projection` overrides either default.

`full` (full fine-tuning) is the baseline the comparison needs, not an adapter: every base weight
trains and the result is a whole model (HF directory, safetensors). The server cannot load it as
an adapter (no adapter_config.json); it would be served as its own base model (`--model DIR`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftserve.adapters import bottleneck as bn

METHODS = ("lora", "prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2", "ia3", "bottleneck")  # adapters
FULL = "full"
TRAIN_METHODS = METHODS + (FULL,)  # what `--method` accepts
# Learning rates that work for a few hundred steps; soft prompts need far larger steps than LoRA.
DEFAULT_LR = {"lora": 1e-3, "prompt-tuning": 3e-2, "p-tuning": 3e-3, "prefix-tuning": 1e-2,
              "p-tuning-v2": 3e-3, "ia3": 1e-2, "bottleneck": 1e-3, FULL: 3e-5}
DEFAULT_INIT_TEXT = "Read the input carefully and answer with exactly the expected output."


@dataclass
class MethodOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "all-linear"  # comma list or "all-linear" (LoRA only)
    num_virtual_tokens: int = 20
    init: str = "text"  # prompt tuning: text | random
    init_text: str = DEFAULT_INIT_TEXT
    encoder: str = "mlp"  # p-tuning: mlp | lstm
    encoder_hidden_size: int = 128
    projection: bool | None = None  # prefix: None -> method default
    reduction_factor: float = 16
    placement: str = "pfeiffer"
    non_linearity: str = "relu"
    scaling: float = 1.0


def peft_config(method: str, opts: MethodOptions, model_dir: str | Path):
    import peft

    common = {"task_type": "CAUSAL_LM"}
    if method == "lora":
        targets = opts.target_modules if opts.target_modules == "all-linear" else \
            [t.strip() for t in opts.target_modules.split(",") if t.strip()]
        return peft.LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                               target_modules=targets, **common)
    if method == "prompt-tuning":
        init = peft.PromptTuningInit.TEXT if opts.init == "text" else peft.PromptTuningInit.RANDOM
        extra = {"prompt_tuning_init_text": opts.init_text, "tokenizer_name_or_path": str(model_dir)} \
            if opts.init == "text" else {}
        return peft.PromptTuningConfig(num_virtual_tokens=opts.num_virtual_tokens, prompt_tuning_init=init,
                                       **extra, **common)
    if method == "p-tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=opts.num_virtual_tokens,
                                        encoder_reparameterization_type=opts.encoder.upper(),
                                        encoder_hidden_size=opts.encoder_hidden_size, **common)
    if method in ("prefix-tuning", "p-tuning-v2"):
        projection = (method == "p-tuning-v2") if opts.projection is None else opts.projection
        return peft.PrefixTuningConfig(num_virtual_tokens=opts.num_virtual_tokens, prefix_projection=projection,
                                       encoder_hidden_size=opts.encoder_hidden_size, **common)
    if method == "ia3":
        return peft.IA3Config(**common)  # PEFT's per-architecture default targets (k, v, down_proj)
    raise ValueError(f"unknown PEFT method {method!r}")


class TrainableAdapter:
    """What the trainer needs: `model` (forward with labels -> .loss, and generate), the trainable
    tensors by stable name (for checkpoints), save(), and a JSON description of the method."""

    method: str
    model: nn.Module

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        live = self.trainable_state()
        if set(live) != set(tensors):
            diff = sorted(set(live) ^ set(tensors))
            raise ValueError(f"checkpoint tensors do not match this method/options (e.g. {diff[0]})")
        with torch.no_grad():
            for name, p in live.items():
                if p.shape != tensors[name].shape:
                    raise ValueError(f"checkpoint tensor {name} has shape {list(tensors[name].shape)}, "
                                     f"expected {list(p.shape)}")
                p.copy_(tensors[name])

    def save(self, out_dir: str | Path) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class PeftTrainable(TrainableAdapter):
    def __init__(self, method: str, base: nn.Module, model_dir: str | Path, opts: MethodOptions):
        import peft

        self.method, self.config = method, peft_config(method, opts, model_dir)
        self.model = peft.get_peft_model(base, self.config)
        if self.config.is_prompt_learning:
            check_reaches_model(self.model, method)

    def save(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(str(out_dir))

    def describe(self) -> dict:
        return self.config.to_dict()


class BottleneckTrainable(TrainableAdapter):
    def __init__(self, base: nn.Module, model_dir: str | Path, opts: MethodOptions, seed: int):
        self.method = "bottleneck"
        rf = opts.reduction_factor
        rf = int(rf) if float(rf).is_integer() else rf  # write 16, not 16.0, into adapter_config.json
        self.config = bn.BottleneckConfig(reduction_factor=rf, placement=opts.placement,
                                          non_linearity=opts.non_linearity, scaling=opts.scaling,
                                          base_model_name_or_path=str(model_dir))
        self.model = base
        self.handle = bn.attach_bottleneck(base, self.config, trainable=True, seed=seed)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.handle.named_tensors()  # names = the file format's tensor names

    def save(self, out_dir: str | Path) -> None:
        bn.save_bottleneck(out_dir, self.config, self.handle.weights())

    def describe(self) -> dict:
        return self.config.to_dict()


class FullTrainable(TrainableAdapter):
    """Full fine-tuning: every base parameter trains; saved as a whole HF model (safetensors)."""

    def __init__(self, base: nn.Module, model_dir: str | Path):
        self.method, self.model, self.model_dir = FULL, base, str(model_dir)
        base.requires_grad_(True)

    def save(self, out_dir: str | Path) -> None:
        """A self-contained HF directory (weights + the base's tokenizer), usable as `--model DIR`."""
        from transformers import AutoTokenizer

        self.model.save_pretrained(str(out_dir), safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_dir).save_pretrained(str(out_dir))

    def describe(self) -> dict:
        return {"method": FULL, "base_model_name_or_path": self.model_dir, "servable_as_adapter": False}


@torch.no_grad()
def check_reaches_model(model: nn.Module, method: str) -> None:
    """Refuse to train a prompt-learning adapter that cannot reach the base model's forward.

    Soft prompts and prefixes travel into the model through kwargs (`inputs_embeds`,
    `past_key_values`) whose names and handling transformers changes between releases
    (5.24 renamed the cache kwarg to `cache`; 5.40 drops `past_key_values`). If a PEFT +
    transformers combination drops them, the loss still goes down a little (nothing), the run
    "succeeds", and the saved adapter does nothing. A freshly initialised soft prompt or prefix
    always changes the logits (it adds attended positions), so equal logits with and without it
    mean the plumbing is dead. Cost: two forwards of 8 tokens.
    """
    import peft
    import transformers

    probe = (torch.arange(8) * 7 + 3).remainder(model.get_base_model().config.vocab_size)[None]  # [1, 8]
    was_training = model.training
    model.eval()
    try:
        with_adapter = model(input_ids=probe, use_cache=False).logits[:, -probe.shape[1]:]  # [1, 8, V]
        without = model.get_base_model()(input_ids=probe, use_cache=False).logits  # [1, 8, V]
    finally:
        model.train(was_training)
    if torch.equal(with_adapter, without):
        raise ValueError(
            f"PEFT {peft.__version__} with transformers {transformers.__version__}: the {method} adapter does not "
            "reach the model's forward (its logits equal the base model's), so training would produce an adapter "
            "that does nothing. Install the tested versions (make install, deploy/requirements.lock).")


def build_trainable(method: str, base: nn.Module, model_dir: str | Path, opts: MethodOptions,
                    seed: int) -> TrainableAdapter:
    """Freeze the base and attach a fresh adapter (seeded, so runs are reproducible)."""
    if method not in TRAIN_METHODS:
        raise ValueError(f"unknown --method {method!r}; choose from {', '.join(TRAIN_METHODS)}")
    base.requires_grad_(False)
    torch.manual_seed(seed)
    if method == FULL:
        return FullTrainable(base, model_dir)
    if method == "bottleneck":
        return BottleneckTrainable(base, model_dir, opts, seed)
    return PeftTrainable(method, base, model_dir, opts)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); parameters() dedupes tied weights."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
