"""Tiny random-weight Hugging Face checkpoints, built locally with transformers (no network)."""
from __future__ import annotations

import base64
import collections
import json
import os

import regex
import torch
from safetensors.torch import load_file, save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

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
    # Qwen2 with full multi-head attention and an untied head: the shape of a first-generation Qwen
    "qwen2_mha": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=False,
                                                     vocab_size=640)),
    # Qwen3: q/k norms, explicit head_dim (4 heads x 32 = 128 != hidden 64), GQA, tied embeddings
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    # Qwen3 with attention_bias (q/k/v and o), untied head, multi-head
    "qwen3_bias": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=4, head_dim=16, attention_bias=True,
                                                       tie_word_embeddings=False)),
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


# ---- first-generation Qwen (QWenLMHeadModel), built by renaming a Qwen2 checkpoint ------------
def to_qwen1_layout(qwen2_dir: str, out_dir: str, seq_length: int = 256, **config_overrides) -> str:
    """Rewrite a multi-head Qwen2 checkpoint (see "qwen2_mha") in the Qwen-1 layout: tensor names
    of QWenLMHeadModel, q/k/v fused into c_attn, w2 = gate and w1 = up, and a Qwen-1 config.json
    (intermediate_size doubled, kv_channels, layer_norm_epsilon, rotary_emb_base, seq_length). The
    math is unchanged, so zoo must give the same logits under both layouts."""
    with open(os.path.join(qwen2_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"], "Qwen-1 has no GQA"
    src = load_file(os.path.join(qwen2_dir, "model.safetensors"))
    out = {"transformer.wte.weight": src["model.embed_tokens.weight"],
           "transformer.ln_f.weight": src["model.norm.weight"], "lm_head.weight": src["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for leaf in ("weight", "bias"):
            out[f"{q}attn.c_attn.{leaf}"] = torch.cat([src[f"{p}self_attn.{x}_proj.{leaf}"] for x in "qkv"])
        out.update({f"{q}ln_1.weight": src[f"{p}input_layernorm.weight"],
                    f"{q}ln_2.weight": src[f"{p}post_attention_layernorm.weight"],
                    f"{q}attn.c_proj.weight": src[f"{p}self_attn.o_proj.weight"],
                    f"{q}mlp.w2.weight": src[f"{p}mlp.gate_proj.weight"],
                    f"{q}mlp.w1.weight": src[f"{p}mlp.up_proj.weight"],
                    f"{q}mlp.c_proj.weight": src[f"{p}mlp.down_proj.weight"]})
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, "model.safetensors"))
    rope = cfg.get("rope_parameters") or {}
    qwen1 = {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": cfg["num_hidden_layers"], "num_attention_heads": cfg["num_attention_heads"],
        "kv_channels": cfg["hidden_size"] // cfg["num_attention_heads"],
        "intermediate_size": 2 * cfg["intermediate_size"],
        "layer_norm_epsilon": cfg["rms_norm_eps"],
        "rotary_emb_base": rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), "rotary_pct": 1.0,
        "max_position_embeddings": cfg["max_position_embeddings"], "seq_length": seq_length,
        "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False,
        "bf16": False, "fp16": False, "fp32": False, "use_cache_quantization": False, "use_flash_attn": "auto",
        "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "scale_attn_weights": True,
        **config_overrides,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(qwen1, f, indent=2)
    return out_dir


QWEN1_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def write_tiny_qwen_tiktoken(out_dir: str, corpus: str, merges: int = 120) -> str:
    """A small byte-level BPE vocabulary in Qwen-1's qwen.tiktoken format ("<base64> <rank>" lines),
    learned from `corpus` with the Qwen pre-tokenizer: the 256 bytes, then `merges` merges."""
    ranks = {bytes([b]): b for b in range(256)}
    words = collections.Counter(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(QWEN1_PATTERN, corpus))
    for _ in range(merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    path = os.path.join(out_dir, "qwen.tiktoken")
    with open(path, "w") as f:
        for token, rank in ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return path
