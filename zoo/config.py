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


class ConfigError(ValueError):
    """config.json describes something zoo cannot run."""


# config.json `architectures[0]` -> zoo model family. The family names a modeling module.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "QWenLMHeadModel": "qwen",  # first-generation Qwen (Qwen-7B-Chat), remote code on the Hub
}

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
    source: str = ""  # path of the config.json, for error messages
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model folder not found: {model_dir!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in model folder {model_dir!r}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        def need(key: str):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return raw[key]

        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise ConfigError(
                f"{source}: unsupported architecture {arch!r} in field 'architectures' "
                f"(model_type={raw.get('model_type')!r}); zoo supports: {known}"
            )
        family = ARCHITECTURES[arch]
        original = raw
        if family == "qwen":
            raw = _qwen1_as_llama_fields(raw, source)

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp={raw['pretraining_tp']} is not supported (only 1)")

        if family == "qwen2":
            _refuse_active_sliding_window(raw, source)
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif family == "qwen3":
            _refuse_active_sliding_window(raw, source)
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
            mlp_bias = False
        elif family == "qwen":
            qkv_bias, o_bias, mlp_bias = True, raw["o_bias"], raw["mlp_bias"]
        else:
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
            mlp_bias = bool(raw.get("mlp_bias", False))

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

        return cls(
            family=family,
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
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
            qk_norm=family == "qwen3",
            max_exact_seq_len=raw.get("max_exact_seq_len"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            source=source,
            raw=original,
        )


def _qwen1_as_llama_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A first-generation Qwen config.json (model_type "qwen", QWenLMHeadModel) in the field names
    the rest of from_dict reads. The architecture is Llama's with a fused, biased c_attn; the
    differences that matter are in the field conventions:
      - intermediate_size is twice the MLP width (w1 and w2 are each intermediate_size // 2 wide);
      - kv_channels is the head size, and kv_channels * num_attention_heads must be hidden_size;
      - layer_norm_epsilon, rotary_emb_base and seq_length are rms_norm_eps, rope_theta and the
        training context;
      - use_dynamic_ntk and use_logn_attn change the math only past seq_length: zoo runs contexts up
        to seq_length (max_exact_seq_len) when either is on, and refuses longer ones at load time.
    """
    def need(key: str):
        if raw.get(key) is None:
            raise ConfigError(f"{source}: required field {key!r} is missing")
        return raw[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = int(raw.get("kv_channels") or hidden // heads)
    if head_dim * heads != hidden:
        raise ConfigError(f"{source}: kv_channels={head_dim} x num_attention_heads={heads} must equal "
                          f"hidden_size={hidden} (QWenLMHeadModel's c_proj maps one onto the other)")
    if float(raw.get("rotary_pct", 1.0)) != 1.0:
        raise ConfigError(f"{source}: rotary_pct={raw['rotary_pct']} is not supported (only 1.0: rope on the whole head)")
    for flag in ("use_cache_quantization", "use_cache_kernel"):
        if raw.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported (zoo keeps the KV cache in the model dtype)")
    intermediate = int(need("intermediate_size"))
    if intermediate % 2:
        raise ConfigError(f"{source}: intermediate_size={intermediate} must be even (w1 and w2 are each half of it)")
    seq_length = int(raw.get("seq_length") or raw.get("max_position_embeddings") or 2048)
    length_dependent = [f for f in ("use_dynamic_ntk", "use_logn_attn") if raw.get(f)]
    dtype = raw.get("torch_dtype") or next((name for flag, name in (("bf16", "bfloat16"), ("fp16", "float16"),
                                                                      ("fp32", "float32")) if raw.get(flag)), None)
    no_bias = bool(raw.get("no_bias", True))
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,  # no GQA in Qwen-1
        "head_dim": head_dim,
        "num_hidden_layers": need("num_hidden_layers"),
        "vocab_size": need("vocab_size"),
        "intermediate_size": intermediate // 2,
        "rms_norm_eps": raw.get("layer_norm_epsilon", 1e-6),
        "rope_theta": raw.get("rotary_emb_base", 10000.0),
        "max_position_embeddings": raw.get("max_position_embeddings") or seq_length,
        "max_exact_seq_len": seq_length if length_dependent else None,
        "tie_word_embeddings": raw.get("tie_word_embeddings", False),
        "o_bias": not no_bias,  # c_proj
        "mlp_bias": not no_bias,  # w1, w2, mlp.c_proj
        "torch_dtype": dtype,
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
        "hidden_act": "silu",
    }


def _refuse_active_sliding_window(raw: dict[str, Any], source: str) -> None:
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
