"""Closed-schema parsing of untrusted `adapter_config.json` bytes into typed, frozen configs.

PEFT's own loader instantiates classes named in the file and tolerates unknown keys; we do neither.
Every key is classified:
  * used      -> validated and kept on the typed config,
  * harmless  -> known PEFT bookkeeping/initialisation keys, accepted and dropped,
  * refused   -> known PEFT features that change the forward math (DoRA, lora_bias, ...): accepted
                 only at their "off" value, otherwise `unsupported_adapter`,
  * unknown   -> tolerated only when null/false/empty (a forward-compatible "off" flag from a newer
                 PEFT, recorded as a warning); any other value is refused, because we cannot know
                 whether it changes the math.
Nothing named in the config (auto_mapping, tokenizers, megatron_core, ...) is ever imported.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

try:  # stdlib regex parser: Python >= 3.11 keeps it private as re._parser
    from re import _parser as _sre
except ImportError:  # pragma: no cover
    import sre_parse as _sre  # type: ignore[no-redef]

from peftserve.adapters.strict_json import loads_strict
from .errors import INVALID_CONFIG, UNSUPPORTED_ADAPTER, AdapterError, AdapterTooLarge

MAX_CONFIG_BYTES = 64 * 1024
DEFAULT_MAX_RANK = 256
DEFAULT_MAX_VIRTUAL_TOKENS = 512
MAX_PATTERN_CHARS = 512  # per regex / module name: real ones are tens of characters
MAX_LIST_ITEMS = 1024  # per target list / pattern dict
MAX_REGEX_SIZE = 10_000  # nodes after expanding counted repeats (see _regex_size)
MAX_ENCODER_HIDDEN = 1 << 16
MAX_ENCODER_LAYERS = 8
ALL_LINEAR = "all-linear"


class AdapterKind(str, enum.Enum):
    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    IA3 = "IA3"
    BOTTLENECK = "BOTTLENECK"


PROMPT_LEARNING_KINDS = frozenset({AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING, AdapterKind.PREFIX_TUNING})

# `target_modules`-style value: tuple of names (exact or ".suffix" match), a regex (fullmatch),
# ALL_LINEAR, or None (use the base model type's PEFT default).
Targets = Union[tuple[str, ...], str, None]


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: Targets
    exclude_modules: Targets
    rank_pattern: dict[str, int] = field(hash=False)  # insertion order matters: first match wins
    alpha_pattern: dict[str, float] = field(hash=False)
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    fan_in_fan_out: bool
    base_model_name_or_path: str | None
    warnings: tuple[str, ...] = ()
    kind: AdapterKind = field(default=AdapterKind.LORA, init=False)


@dataclass(frozen=True)
class PromptLearningConfig:
    kind: AdapterKind  # PROMPT_TUNING, P_TUNING or PREFIX_TUNING
    num_virtual_tokens: int
    token_dim: int | None  # None -> filled from the base model like PEFT does
    num_layers: int | None
    num_attention_heads: int | None
    num_transformer_submodules: int | None
    encoder_reparameterization_type: str | None  # P_TUNING: "MLP" | "LSTM"
    encoder_hidden_size: int | None
    encoder_num_layers: int | None  # P_TUNING LSTM depth
    prefix_projection: bool  # PREFIX_TUNING
    base_model_name_or_path: str | None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class IA3Config:
    target_modules: Targets
    exclude_modules: Targets
    feedforward_modules: Targets
    fan_in_fan_out: bool
    base_model_name_or_path: str | None
    warnings: tuple[str, ...] = ()
    kind: AdapterKind = field(default=AdapterKind.IA3, init=False)


AdapterConfig = Union[LoraConfig, PromptLearningConfig, IA3Config, Any]  # Any: BottleneckConfig (other module)


# ----------------------------------------------------------------------------------------------
# key classification

_COMMON_USED = {"peft_type", "task_type", "base_model_name_or_path"}
_COMMON_HARMLESS = {"auto_mapping", "peft_version", "revision", "inference_mode", "trust_remote_code"}

_LORA_USED = {"r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "rank_pattern",
              "alpha_pattern", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
              "bias", "modules_to_save", "init_lora_weights"}
# Training-time or initialisation-only knobs: no effect on the forward pass of a loaded adapter.
_LORA_HARMLESS = {"lora_dropout", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                  "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying"}
# Features that change the forward math (or need weights we do not serve): allowed only when "off".
_LORA_REFUSED = {"use_dora", "lora_bias", "use_qalora", "target_parameters", "trainable_token_indices",
                 "layer_replication", "megatron_config", "alora_invocation_tokens", "use_bdlora",
                 "arrow_config", "kasa_config", "velora_config", "monteclora_config"}
# init_lora_weights values that rewrite the *base* weights at load time (PiSSA/OLoRA/CorDA/LoRA-GA)
# or select a LoRA variant (MiCA). A shared multi-adapter base cannot do that: refuse.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "mica")
# Initialisations that only set the starting A/B values (no effect once trained weights are loaded).
# LoftQ does quantise the base when PEFT loads it; we serve it on the unquantised base (a warning).
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "loftq"}

_PROMPT_USED = {"num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                "num_transformer_submodules", "modules_to_save"}
_PROMPT_HARMLESS = {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                    "tokenizer_kwargs", "encoder_dropout", "init_weights"}
_P_TUNING_USED = {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers"}
_PREFIX_USED = {"encoder_hidden_size", "prefix_projection"}

_IA3_USED = {"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save"}
_IA3_HARMLESS = {"init_ia3_weights"}


def _invalid(message: str) -> AdapterError:
    return AdapterError(INVALID_CONFIG, message)


def _unsupported(message: str) -> AdapterError:
    return AdapterError(UNSUPPORTED_ADAPTER, message)


def _is_off(value: Any) -> bool:
    """The value a feature flag has when the feature is not used."""
    return value is None or value is False or value == {} or value == [] or value == ""


def _classify_keys(d: dict[str, Any], used: set[str], harmless: set[str], refused: set[str]) -> list[str]:
    warnings = []
    for key in sorted(d):
        if key in used or key in harmless:
            continue
        if key in refused:
            if not _is_off(d[key]):
                raise _unsupported(f"{key}={_short(d[key])} is not supported by this server")
            continue
        if not _is_off(d[key]):
            raise _unsupported(f"unknown config key {key!r} (value {_short(d[key])}): refusing because it "
                               "may change the adapter math")
        warnings.append(f"ignored unknown config key {key!r}")
    return warnings


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------
# typed field readers


def _int(d: dict, key: str, lo: int, hi: int, *, default: Any = ..., allow_none: bool = False) -> Any:
    v = d.get(key, default)
    if v is ...:
        raise _invalid(f"missing required field {key!r}")
    if v is None and (allow_none or default is None):
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _invalid(f"{key} must be an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def _positive_finite(value: Any, what: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise _invalid(f"{what} must be a finite number > 0, got {_short(value)}")
    return float(value)


def _bool(d: dict, key: str, default: bool = False) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _invalid(f"{key} must be true or false, got {_short(v)}")
    return v


def _opt_str(d: dict, key: str, max_len: int = 4096) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise _invalid(f"{key} must be a string of at most {max_len} characters")
    return v


def _regex_size(parsed: Any) -> int:
    """Node count of a parsed pattern with counted repeats multiplied out.

    The `regex` engine we match with (it supports timeouts, `re` does not) expands counted
    repeats at compile time: `(?:a{65535}){65535}` would take gigabytes before the timeout could
    help. Unbounded repeats (`*`, `+`) are loops and count once (plus their mandatory minimum).
    """
    total = 0
    for op, av in parsed:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            total += max(lo if hi == _sre.MAXREPEAT else hi, 1) * _regex_size(sub)
        elif op is _sre.SUBPATTERN:
            total += _regex_size(av[-1])
        elif op is _sre.BRANCH:
            total += sum(_regex_size(b) for b in av[1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT, _sre.ATOMIC_GROUP):
            total += _regex_size(av[-1] if isinstance(av, tuple) else av)
        elif op is _sre.GROUPREF_EXISTS:
            total += _regex_size(av[1]) + (_regex_size(av[2]) if av[2] is not None else 0)
        else:
            total += 1
        if total > MAX_REGEX_SIZE:
            break
    return total


def _check_regex(pattern: str, what: str) -> None:
    """Reject patterns that are invalid for `re` (PEFT's engine) or too big to compile safely."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _invalid(f"{what}: pattern longer than {MAX_PATTERN_CHARS} characters")
    try:
        parsed = _sre.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise _invalid(f"{what}: invalid regular expression {_short(pattern)}: {exc}") from None
    if _regex_size(parsed) > MAX_REGEX_SIZE:
        raise _invalid(f"{what}: regular expression {_short(pattern)} is too large once its counted "
                       f"repeats are expanded (limit {MAX_REGEX_SIZE} nodes)")


def check_regex(pattern: str, what: str = "pattern") -> None:
    """Public form of the pattern safety check (used again right before compiling)."""
    _check_regex(pattern, what)


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
        raise _invalid(f"{what} must be a list of at most {MAX_LIST_ITEMS} strings")
    if not all(isinstance(s, str) and 0 < len(s) <= MAX_PATTERN_CHARS for s in value):
        raise _invalid(f"{what} must contain non-empty strings of at most {MAX_PATTERN_CHARS} characters")
    return tuple(dict.fromkeys(value))  # PEFT turns the list into a set; keep a stable order


def _targets(d: dict, key: str) -> Targets:
    """list -> tuple of names; str -> regex (fullmatch) or ALL_LINEAR; None stays None."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        if v.lower() == ALL_LINEAR:  # PEFT compares case-insensitively
            return ALL_LINEAR
        _check_regex(v, key)
        return v
    return _names(v, key)


def _pattern_dict(d: dict, key: str, value_check) -> dict[str, Any]:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_LIST_ITEMS:
        raise _invalid(f"{key} must be an object with at most {MAX_LIST_ITEMS} entries")
    out = {}
    for pattern, value in v.items():
        # PEFT interpolates each key into rf"(.*\.)?({key})$", so it must be a valid regex group.
        _check_regex(f"(.*\\.)?({pattern})$", f"{key}[{_short(pattern)}]")
        out[pattern] = value_check(value, f"{key}[{_short(pattern)}]")
    return out


def _layers(d: dict) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """layers_to_transform (int | [int]) and layers_pattern (str | [str]); empty means unset (as in PEFT)."""
    ltt = d.get("layers_to_transform")
    if isinstance(ltt, list) and not ltt:
        ltt = None
    if ltt is not None:
        items = [ltt] if not isinstance(ltt, list) else ltt
        if len(items) > MAX_LIST_ITEMS or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                  for i in items):
            raise _invalid("layers_to_transform must be a non-negative integer or a list of them")
        ltt = tuple(items)
    lp = d.get("layers_pattern")
    if lp is not None and lp != "" and lp != []:
        lp = (lp,) if isinstance(lp, str) else _names(lp, "layers_pattern")
        for p in lp:
            # PEFT interpolates it into rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."
            _check_regex(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "layers_pattern")
        if ltt is None:
            raise _invalid("layers_pattern requires layers_to_transform")
    else:
        lp = None
    return ltt, lp


def _refuse_modules_to_save(d: dict) -> None:
    if not _is_off(d.get("modules_to_save")):
        raise _unsupported("modules_to_save (fully fine-tuned extra modules) is not supported: "
                           f"{_short(d['modules_to_save'])}")


# ----------------------------------------------------------------------------------------------
# per-kind parsers


def _parse_lora(d: dict, max_rank: int) -> LoraConfig:
    warnings = _classify_keys(d, _COMMON_USED | _LORA_USED, _COMMON_HARMLESS | _LORA_HARMLESS, _LORA_REFUSED)
    _refuse_modules_to_save(d)
    if d.get("bias", "none") not in ("none", None):
        raise _unsupported(f"bias={_short(d['bias'])} is not supported (only 'none'): it trains base biases")
    init = d.get("init_lora_weights", True)
    if isinstance(init, str):
        if init.lower().startswith(_BASE_MODIFYING_INITS):
            raise _unsupported(f"init_lora_weights={init!r} modifies the base weights (or is a LoRA variant); "
                               "convert the adapter to plain LoRA first "
                               "(save_pretrained(path_initial_model_for_weight_conversion=...))")
        if init not in _PLAIN_INITS:
            # PEFT selects LoRA variants through some init strings (e.g. "mica"): unknown ones may too.
            raise _unsupported(f"init_lora_weights={_short(init)} is not a known plain-LoRA initialisation")
        if init == "loftq":
            warnings.append("LoftQ adapter served on the unquantised base model: outputs are approximate")
    elif init is not None and not isinstance(init, bool):
        raise _invalid(f"init_lora_weights must be a bool or string, got {_short(init)}")

    r = _int(d, "r", 1, max_rank, default=8)
    alpha = _positive_finite(d.get("lora_alpha", 8), "lora_alpha")
    rank_pattern = _pattern_dict(d, "rank_pattern", lambda v, what: _int({what: v}, what, 1, max_rank))
    alpha_pattern = _pattern_dict(d, "alpha_pattern", _positive_finite)
    target_modules = _targets(d, "target_modules")
    ltt, lp = _layers(d)
    if isinstance(target_modules, str) and (ltt is not None or lp is not None):
        raise _invalid("layers_to_transform/layers_pattern cannot be used when target_modules is a string")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=_bool(d, "use_rslora"),
        target_modules=target_modules,
        exclude_modules=_targets(d, "exclude_modules"),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=ltt,
        layers_pattern=lp,
        fan_in_fan_out=_bool(d, "fan_in_fan_out"),
        base_model_name_or_path=_opt_str(d, "base_model_name_or_path"),
        warnings=tuple(warnings),
    )


def _parse_prompt_learning(d: dict, kind: AdapterKind, max_virtual_tokens: int) -> PromptLearningConfig:
    used = set(_PROMPT_USED)
    if kind is AdapterKind.P_TUNING:
        used |= _P_TUNING_USED
    elif kind is AdapterKind.PREFIX_TUNING:
        used |= _PREFIX_USED
    warnings = _classify_keys(d, _COMMON_USED | used, _COMMON_HARMLESS | _PROMPT_HARMLESS, set())
    _refuse_modules_to_save(d)
    nts = _int(d, "num_transformer_submodules", 1, 2, default=None)
    if nts == 2:
        raise _unsupported("num_transformer_submodules=2 is for encoder-decoder models; this server "
                           "serves decoder-only causal LMs")
    enc_type = None
    if kind is AdapterKind.P_TUNING:
        enc_type = d.get("encoder_reparameterization_type", "MLP")
        if enc_type not in ("MLP", "LSTM"):
            raise _invalid(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {_short(enc_type)}")
    return PromptLearningConfig(
        kind=kind,
        num_virtual_tokens=_int(d, "num_virtual_tokens", 1, max_virtual_tokens),
        token_dim=_int(d, "token_dim", 1, 1 << 20, default=None),
        num_layers=_int(d, "num_layers", 1, 4096, default=None),
        num_attention_heads=_int(d, "num_attention_heads", 1, 4096, default=None),
        num_transformer_submodules=nts,
        encoder_reparameterization_type=enc_type,
        encoder_hidden_size=_int(d, "encoder_hidden_size", 1, MAX_ENCODER_HIDDEN, default=None),
        encoder_num_layers=(_int(d, "encoder_num_layers", 1, MAX_ENCODER_LAYERS, default=2)
                            if kind is AdapterKind.P_TUNING else None),
        prefix_projection=_bool(d, "prefix_projection") if kind is AdapterKind.PREFIX_TUNING else False,
        base_model_name_or_path=_opt_str(d, "base_model_name_or_path"),
        warnings=tuple(warnings),
    )


def _parse_ia3(d: dict) -> IA3Config:
    warnings = _classify_keys(d, _COMMON_USED | _IA3_USED, _COMMON_HARMLESS | _IA3_HARMLESS, set())
    _refuse_modules_to_save(d)
    target_modules = _targets(d, "target_modules")
    feedforward = _targets(d, "feedforward_modules")
    if feedforward == ALL_LINEAR:  # only target_modules understands the shorthand
        _check_regex(d["feedforward_modules"], "feedforward_modules")
        feedforward = d["feedforward_modules"]
    # Same consistency rule as peft IA3Config.__post_init__ (only checkable when both are lists).
    if isinstance(feedforward, tuple) and isinstance(target_modules, tuple):
        if not set(feedforward) <= set(target_modules):
            raise _invalid("feedforward_modules must be a subset of target_modules")
    return IA3Config(
        target_modules=target_modules,
        exclude_modules=_targets(d, "exclude_modules"),
        feedforward_modules=feedforward,
        fan_in_fan_out=_bool(d, "fan_in_fan_out"),
        base_model_name_or_path=_opt_str(d, "base_model_name_or_path"),
        warnings=tuple(warnings),
    )


def _parse_bottleneck(d: dict) -> Any:
    try:
        from peftserve.adapters.bottleneck import BottleneckConfig
    except ImportError:
        raise _unsupported("bottleneck adapters are not available in this build") from None
    try:
        return BottleneckConfig.from_dict(d)
    except AdapterError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise _invalid(f"bottleneck config: {exc}") from None


# ----------------------------------------------------------------------------------------------
# entry point


def load_config_json(config_bytes: bytes, *, max_config_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """Bytes -> JSON object, strictly (size cap, UTF-8, no duplicate keys, no NaN/Infinity)."""
    if len(config_bytes) > max_config_bytes:
        raise AdapterTooLarge(f"adapter_config.json is {len(config_bytes)} bytes, limit is {max_config_bytes}")
    try:
        text = bytes(config_bytes).decode("utf-8-sig")  # tolerate a BOM, nothing else
        d = loads_strict(text, "adapter_config.json", _invalid)
    except AdapterError:
        raise
    except UnicodeDecodeError:
        raise _invalid("adapter_config.json is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"adapter_config.json is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(d, dict):
        raise _invalid("adapter_config.json must be a JSON object")
    return d


def parse_adapter_config(
    config_bytes: bytes,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS,
    max_config_bytes: int = MAX_CONFIG_BYTES,
) -> AdapterConfig:
    """Parse and validate adapter_config.json bytes into a typed config (never imports anything named in it)."""
    d = load_config_json(config_bytes, max_config_bytes=max_config_bytes)
    peft_type = d.get("peft_type")
    if not isinstance(peft_type, str):
        raise _invalid("peft_type must be a string")
    try:
        kind = AdapterKind(peft_type)
    except ValueError:
        raise _unsupported(f"peft_type {_short(peft_type)} is not supported "
                           f"(supported: {', '.join(k.value for k in AdapterKind)})") from None
    if kind is AdapterKind.BOTTLENECK:
        return _parse_bottleneck(d)
    task_type = d.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise _unsupported(f"task_type {_short(task_type)} is not supported (only CAUSAL_LM)")
    if kind is AdapterKind.LORA:
        return _parse_lora(d, max_rank)
    if kind is AdapterKind.IA3:
        return _parse_ia3(d)
    return _parse_prompt_learning(d, kind, max_virtual_tokens)
