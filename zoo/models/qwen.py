"""First-generation Qwen (QWenLMHeadModel: Qwen-7B/14B/72B and their -Chat models), loaded natively.

The Hub ships this architecture only as remote code, which zoo neither downloads nor runs. Its math
is Llama's, with a bias on the fused q/k/v projection and none elsewhere (by default), full
multi-head attention and rotate-half rope, so zoo runs it on the Llama graph entry points. What
differs is naming and conventions (qwen1_as_llama_fields translates the config fields):

  Qwen-1 checkpoint tensor            zoo parameter
  transformer.wte                     model.embed_tokens
  transformer.h.N.ln_1 / ln_2         model.layers.N.input_layernorm / post_attention_layernorm
  transformer.h.N.attn.c_attn         model.layers.N.self_attn.qkv_proj  (rows [q; k; v], with bias)
  transformer.h.N.attn.c_proj         model.layers.N.self_attn.o_proj
  transformer.h.N.mlp.w2 / w1         model.layers.N.mlp.gate_up_proj    (w2 is the gate: a1 * silu(a2))
  transformer.h.N.mlp.c_proj          model.layers.N.mlp.down_proj
  transformer.ln_f                    model.norm
  lm_head                             lm_head

c_attn is read as three row ranges (zoo.loader.CheckpointRows), so tensor-parallel ranks read
only their heads' rows of it, as they do for separate q/k/v tensors.
"""
import re
from typing import Any

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.models.llama import LlamaForCausalLM
from zoo.loader import CheckpointRows
from zoo.distributed.comm import TPContext

# Llama-style checkpoint name -> Qwen-1 name (q/k/v are handled apart: they share c_attn)
_RENAMES = [
    (r"^model\.embed_tokens\.", "transformer.wte."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln_1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.h.\1.ln_2."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"transformer.h.\1.mlp.w2."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.c_proj."),
    (r"^lm_head\.", "lm_head."),
]
_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)$")


def qwen1_as_llama_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A first-generation Qwen config.json (model_type "qwen", QWenLMHeadModel) in the field names
    ModelConfig.from_hf reads. The architecture is Llama's with a fused, biased c_attn; the
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


class QWenLMHeadModel(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, tp: TPContext | None = None):
        assert config.qkv_bias and config.num_kv_heads == config.num_heads, "Qwen-1: biased c_attn, no GQA"
        super().__init__(config, tp)

    @classmethod
    def hf_config_as_llama(cls, raw: dict, source: str) -> dict:
        return qwen1_as_llama_fields(raw, source)

    @classmethod
    def hf_config_flags(cls, raw: dict, source: str) -> dict:  # raw: already in Llama's field names
        return {"qkv_bias": True, "o_bias": raw["o_bias"], "mlp_bias": raw["mlp_bias"]}

    def checkpoint_sources(self) -> dict[str, list[str | CheckpointRows]]:
        c = self.config
        # where q, k and v sit in c_attn's rows
        offsets = {"q": (0, c.q_size), "k": (c.q_size, c.q_size + c.kv_size),
                   "v": (c.q_size + c.kv_size, c.q_size + 2 * c.kv_size)}
        plan = {}
        for name, sources in super().checkpoint_sources().items():
            plan[name] = [self._qwen1_source(src, offsets) for src in sources]
        return plan

    @staticmethod
    def _qwen1_source(llama_name: str, offsets: dict) -> str | CheckpointRows:
        qkv = _QKV.match(llama_name)
        if qkv:
            layer, which, leaf = qkv.groups()
            return CheckpointRows(f"transformer.h.{layer}.attn.c_attn.{leaf}", *offsets[which])
        for pattern, replacement in _RENAMES:
            renamed, n = re.subn(pattern, replacement, llama_name)
            if n:
                return renamed
        raise KeyError(f"no Qwen-1 checkpoint name for parameter {llama_name!r}")
