"""Qwen2 / Qwen2.5 hand-adapted for graph mode.

Architecturally Qwen2 is Llama with biases on the q/k/v projections (none on o_proj) and, for the
small sizes, the LM head tied to the embedding table. The shared layers take both from the
config (ModelConfig.qkv_bias, tie_word_embeddings), and the checkpoint uses Llama's tensor names,
so the graph entry points (prefill / decode) and the weight plan are Llama's. A sliding window,
which Qwen2 configs can switch on, is refused (hf_config_flags).
"""
from zoo.config import ModelConfig, refuse_active_sliding_window
from zoo.models.llama import LlamaForCausalLM
from zoo.distributed.comm import TPContext


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, tp: TPContext | None = None):
        assert config.qkv_bias and not config.o_bias, "Qwen2 has q/k/v bias and no o_proj bias"
        super().__init__(config, tp)

    @classmethod
    def hf_config_flags(cls, raw: dict, source: str) -> dict:
        refuse_active_sliding_window(raw, source)
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
