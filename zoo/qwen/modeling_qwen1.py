"""First-generation Qwen (QWenLMHeadModel: Qwen-7B/14B/72B and their -Chat models), loaded natively.

The Hub ships this architecture only as remote code, which zoo neither downloads nor runs. Its math
is Llama's, with a bias on the fused q/k/v projection and none elsewhere (by default), full
multi-head attention and rotate-half rope, so zoo runs it on the Llama graph entry points. What
differs is naming and conventions (zoo.config translates the config fields):

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

from zoo.config import ModelConfig
from zoo.llama.modeling_llama import LlamaForCausalLM
from zoo.loader import CheckpointRows
from zoo.parallel import TPContext

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
_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


class QWenLMHeadModel(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, tp: TPContext | None = None):
        assert config.qkv_bias and config.num_kv_heads == config.num_heads, "Qwen-1: biased c_attn, no GQA"
        super().__init__(config, tp)

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
