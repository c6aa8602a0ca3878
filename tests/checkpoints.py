"""Tiny random-weight Hugging Face checkpoints, built locally with transformers (no network)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
             vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5)

SPECS = {
    # Llama 3.1-style: GQA and llama3 rope scaling
    "llama3_gqa": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    # Llama 2-style: multi-head attention, plain rope
    "llama2": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    # Qwen2: q/k/v biases, tied embeddings, GQA
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # rope variants
    "llama_linear": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2,
                                                         rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama_dynamic": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, max_position_embeddings=16,
                                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}


def build_checkpoint(kind: str, out_dir: str, seed: int = 0, **overrides) -> str:
    """Save a random-weight model of `kind` to out_dir. Weights ~ N(0, 0.2) so logits are spread
    out (greedy ties, which would make token comparisons flaky, are unlikely)."""
    config_cls, model_cls, extra = SPECS[kind]
    config = config_cls(**{**SMALL, **extra, **overrides})
    config.architectures = [model_cls.__name__]
    config.eos_token_id = None  # no EOS: greedy runs go the full length on both sides
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out_dir)
    return out_dir
