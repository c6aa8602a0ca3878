"""Qwen3 (dense) hand-adapted for graph mode.

Qwen3 is Llama with an RMSNorm over head_dim applied to every query and key head before rope
(`self_attn.q_norm` / `k_norm`, one weight of [head_dim] each, shared by the heads), head_dim given
explicitly in the config (q_size = num_heads * head_dim need not be hidden_size), no q/k/v bias by
default (`attention_bias` puts one on q/k/v and o), and tied embeddings for the small sizes. The
shared Attention layer implements the norms (qk_norm_eps), so prefill / decode, the weight plan
(Hugging Face's tensor names) and tensor parallelism are Llama's. An active sliding window is
refused (hf_config_flags).
"""
from zoo.config import ModelConfig, refuse_active_sliding_window
from zoo.models.llama import LlamaForCausalLM
from zoo.distributed.comm import TPContext


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, tp: TPContext | None = None):
        assert config.qk_norm, "Qwen3 normalizes q and k per head (ModelConfig.qk_norm)"
        super().__init__(config, tp)

    @classmethod
    def hf_config_flags(cls, raw: dict, source: str) -> dict:
        refuse_active_sliding_window(raw, source)
        bias = bool(raw.get("attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False, "qk_norm": True}
