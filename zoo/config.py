"""ModelConfig: the subset of a Hugging Face config.json that zoo's modeling code implements.

Everything the model code does not implement is refused here, with the name of the field, so a
checkpoint never silently runs with the wrong math (a sliding window, an unknown rope type, ...).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from zoo.errors import ConfigError


# dtype names a checkpoint's torch_dtype and zoo's options use (zoo.device maps them to torch dtypes)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# rope types and the extra keys each one needs.
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    type: str = "default"  # default | linear | dynamic | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


# Weight-only quantization modes (zoo.layers.quant) and the CPU int4 kernel's group sizes.
QUANT_MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 64
QUANT_METHOD = "zoo-weight-only"  # config.json quantization_config.quant_method of `python -m zoo.quantize`
QUANT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Quantization:
    """How a model's linear weights are held: `mode` for the decoder layers, `lm_head` for the LM
    head (None: float). int4 uses groups of `group_size` input columns (a layer whose width it does
    not divide uses the largest smaller size of INT4_GROUP_SIZES that does)."""

    mode: str
    group_size: int = DEFAULT_INT4_GROUP_SIZE
    lm_head: str | None = "int8"

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise ConfigError(f"unknown quantization {self.mode!r}; use one of {', '.join(QUANT_MODES)}")
        if self.lm_head not in (None, *QUANT_MODES):
            raise ConfigError(f"unknown LM-head quantization {self.lm_head!r}; use one of {', '.join(QUANT_MODES)}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group size must be one of {list(INT4_GROUP_SIZES)}, got {self.group_size!r}")

    def to_hf(self) -> dict[str, Any]:
        """config.json's quantization_config for a checkpoint in this form (see docs/quantization.md)."""
        return {"quant_method": QUANT_METHOD, "format_version": QUANT_FORMAT_VERSION, "mode": self.mode,
                "group_size": self.group_size, "lm_head": self.lm_head}

    @classmethod
    def from_hf(cls, raw: Any, source: str) -> "Quantization":
        if not isinstance(raw, dict) or raw.get("quant_method") != QUANT_METHOD:
            method = raw.get("quant_method") if isinstance(raw, dict) else raw
            raise ConfigError(f"{source}: quantization_config with quant_method {method!r} is not supported; zoo "
                              f"reads its own weight-only format ({QUANT_METHOD!r}, written by python -m "
                              "zoo.quantize from a float checkpoint)")
        if raw.get("format_version") != QUANT_FORMAT_VERSION:
            raise ConfigError(f"{source}: quantization_config format_version {raw.get('format_version')!r} is not "
                              f"{QUANT_FORMAT_VERSION}")
        return cls(raw.get("mode"), raw.get("group_size", DEFAULT_INT4_GROUP_SIZE), raw.get("lm_head"))

    def describe(self) -> str:
        int4 = f" (groups of {self.group_size})" if "int4" in (self.mode, self.lm_head) else ""
        return f"{self.mode} weights{int4}, LM head {self.lm_head or 'float'}"


@dataclass(frozen=True)
class ModelConfig:
    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on each q and k head before rope (Qwen3)
    # Longest context zoo's math is exact for, when the architecture changes its math past some
    # length (Qwen-1's dynamic NTK rope and logn attention start past seq_length); None = no limit.
    max_exact_seq_len: int | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: Quantization | None = None  # weight-only quantized linears (None: float weights)
    source: str = ""  # path of the config.json, for error messages
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str, *, family: str, architecture: str,
                qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False, qk_norm: bool = False,
                original: dict[str, Any] | None = None) -> "ModelConfig":
        """The fields every architecture shares, read from a config.json in Llama's field names
        (`raw`); what differs per architecture (biases, q/k norms) comes from its modeling class,
        through zoo.models.registry. `original` is the file's own contents (kept as `raw`)."""
        def need(key: str):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return raw[key]

        hidden = _positive_int(need("hidden_size"), "hidden_size", source)
        heads = _positive_int(need("num_attention_heads"), "num_attention_heads", source)
        kv_heads = _positive_int(raw.get("num_key_value_heads") or heads, "num_key_value_heads", source)
        head_dim = _positive_int(raw.get("head_dim") or hidden // heads, "head_dim", source)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp={raw['pretraining_tp']} is not supported (only 1)")

        quant_raw = (original or raw).get("quantization_config")
        quantization = None if quant_raw is None else Quantization.from_hf(quant_raw, source)

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

        return cls(
            family=family,
            architecture=architecture,
            vocab_size=_positive_int(need("vocab_size"), "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_positive_int(need("intermediate_size"), "intermediate_size", source),
            num_layers=_positive_int(need("num_hidden_layers"), "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_parse_rope(raw, head_dim, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=qk_norm,
            max_exact_seq_len=raw.get("max_exact_seq_len"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=quantization,
            source=source,
            raw=raw if original is None else original,
        )


def refuse_active_sliding_window(raw: dict[str, Any], source: str) -> None:
    """Qwen2 can slide the attention window on layers >= max_window_layers; zoo attends fully.

    A window is "in use" only when it is switched on, shorter than the context, and some layer has it.
    """
    window = raw.get("sliding_window")
    max_pos = raw.get("max_position_embeddings", 0)
    if not raw.get("use_sliding_window") or window is None or window >= max_pos:
        return
    num_layers = raw.get("num_hidden_layers", 0)
    first_sliding = raw.get("max_window_layers", 0)
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)
    ]
    if "sliding_attention" in layer_types:
        raise ConfigError(
            f"{source}: use_sliding_window=true with sliding_window={window} < "
            f"max_position_embeddings={max_pos} on some layers; zoo's attention has no sliding "
            "window (field 'use_sliding_window')"
        )


def _parse_rope(raw: dict[str, Any], head_dim: int, source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs use rope_theta + rope_scaling.
    params = raw.get("rope_parameters")
    field_name = "rope_parameters"
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        field_name = "rope_scaling"
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(
            f"{source}: {field_name}.rope_type={rope_type!r} is not supported "
            f"(supported: {', '.join(_ROPE_KEYS)})"
        )
    for key in _ROPE_KEYS[rope_type]:
        if key not in params:
            if key == "original_max_position_embeddings" and raw.get("max_position_embeddings"):
                params[key] = raw["max_position_embeddings"]
                continue
            raise ConfigError(f"{source}: {field_name}.{key} is required for rope_type={rope_type!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: {field_name}.partial_rotary_factor is not supported")
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim={head_dim} must be even for rotary embeddings")
    theta = float(params.get("rope_theta", 10000.0))
    if not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"{source}: {field_name}.rope_theta={theta} must be positive")
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
    )


def tp_head_split_problem(num_heads: int, num_kv_heads: int, tp_size: int) -> str | None:
    """Why `tp_size` ranks cannot share these attention heads, or None when they can: q heads split
    evenly, kv heads split evenly or (fewer kv heads than ranks) replicated."""
    if num_heads % tp_size:
        return f"num_attention_heads ({num_heads}) must be divisible by the tensor-parallel size {tp_size}"
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        return (f"num_key_value_heads ({num_kv_heads}) and the tensor-parallel size {tp_size} must divide one "
                "another (kv heads are split across ranks, or replicated when there are fewer than ranks)")
    return None


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    return int(value)


def read_config_json(model_dir: str) -> tuple[dict[str, Any], str]:
    """(contents of model_dir/config.json, its path); FileNotFoundError / ConfigError naming the problem."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in model folder {model_dir!r}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw, path
