"""Llama (2, 3, 3.1/3.2) hand-adapted for graph mode.

Two entry points, each compiled into one static-shape graph per bucket:
  prefill(input_ids [B, S], lengths [B], slot_ids [B], k_caches, v_caches) -> logits [B, V]
  decode (input_ids [B, 1], positions [B],            k_caches, v_caches) -> logits [B, V]
Lengths, positions and batch slots are tensors, never Python ints taken from data, so one graph
serves every prompt length inside its bucket. The KV cache is one k and one v tensor per layer,
shape [slots, KV, T, hd], passed in and updated in place. Decode row i always uses cache slot i.

Tensor parallelism: the layers take a TPContext (zoo.distributed.comm) and hold this rank's shard
(zoo.layers.linear / embedding); this file does no rank arithmetic. KV is then this rank's kv heads.
With no TPContext (or world size 1) every layer is the plain single-device one.
"""
import torch
from torch import nn

from zoo.config import ModelConfig
from zoo.layers import (Attention, AttentionMetadata, GatedMLP, ParallelLMHead, RMSNorm, RotaryEmbedding,
                        VocabParallelEmbedding)
from zoo.distributed.comm import TPContext, as_context


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPContext):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config.hidden_size, config.num_heads, config.num_kv_heads,
                                   config.head_dim, config.qkv_bias, config.o_bias, tp,
                                   qk_norm_eps=config.rms_norm_eps if config.qk_norm else None)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias, tp)

    def forward(self, x, meta: AttentionMetadata, k_cache, v_cache):  # x [B, S, D]
        h = x + self.self_attn(self.input_layernorm(x), meta, k_cache, v_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


# The decoder layer as one compile region: torch.compile traces and compiles it once per input shape
# and stamps the same code out for every layer (a no-op outside torch.compile). LlamaModel uses it
# when `regional_compile` is set (compile config `regional = true`).
_layer_region = torch.compiler.nested_compile_region(LlamaDecoderLayer.forward)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.regional_compile = False  # compile one layer and reuse it for all (see _layer_region)

    def forward(self, input_ids, meta, k_caches, v_caches):  # [B, S] -> [B, S, D] (before final norm)
        h = self.embed_tokens(input_ids)
        run_layer = _layer_region if self.regional_compile else LlamaDecoderLayer.__call__
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches):
            h = run_layer(layer, h, meta, k_cache, v_cache)
        return h


class LlamaForCausalLM(nn.Module):
    # Our fused parameter <- the checkpoint tensors it is concatenated from (along dim 0).
    FUSED_FROM_CHECKPOINT = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(self, config: ModelConfig, tp: TPContext | None = None):
        super().__init__()
        self.config = config
        self.tp = as_context(tp)
        self.model = LlamaModel(config, self.tp)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, self.tp)
        # kv heads this rank's cache holds (all of them without tensor parallelism)
        self.num_local_kv_heads = self.model.layers[0].self_attn.num_kv_heads
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)

    # ---- config.json ---------------------------------------------------------------------------
    @classmethod
    def hf_config_as_llama(cls, raw: dict, source: str) -> dict:
        """config.json in Llama's field names (what ModelConfig.from_hf reads); Llama's already are."""
        return raw

    @classmethod
    def hf_config_flags(cls, raw: dict, source: str) -> dict:
        """What this architecture's config means for the shared layers (ModelConfig.from_hf keywords)."""
        bias = bool(raw.get("attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(raw.get("mlp_bias", False))}

    # ---- weights ---------------------------------------------------------------------------
    def checkpoint_sources(self) -> dict[str, list[str]]:
        """Each parameter to load -> the checkpoint tensor names it is built from."""
        plan = {}
        for name, _ in self.named_parameters():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # shares the embedding table, see tie_weights()
            module_path, _, leaf = name.rpartition(".")
            parent, _, proj = module_path.rpartition(".")
            if proj in self.FUSED_FROM_CHECKPOINT:
                plan[name] = [f"{parent}.{part}.{leaf}" for part in self.FUSED_FROM_CHECKPOINT[proj]]
            else:
                plan[name] = [name]
        return plan

    def set_attention_ops(self, ops) -> None:
        """Use a device backend's KV-write / attention kernels in every layer (zoo.layers.ops)."""
        for layer in self.model.layers:
            layer.self_attn.ops = ops

    def use_regional_compile(self, on: bool) -> None:
        """Under torch.compile, trace and compile one decoder layer and reuse it for every layer
        (compile time independent of depth) instead of one graph of the whole stack."""
        self.model.regional_compile = on

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- graph entry points ----------------------------------------------------------------
    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V] float32
        return self.lm_head(self.model.norm(h)).float()

    def prefill(self, input_ids, lengths, slot_ids, k_caches, v_caches):
        """Whole prompts from position 0. input_ids [B, S] right-padded; lengths [B] real lengths
        (>= 1); slot_ids [B] cache slot each row's keys/values are written to -> logits of each
        row's last real token [B, V]."""
        h = self.prefill_hidden(input_ids, lengths, slot_ids, k_caches, v_caches)  # [B, S, D]
        B = h.shape[0]
        h_last = h[torch.arange(B, device=h.device), lengths - 1]  # [B, D] last real token per row
        return self.compute_logits(h_last)

    def prefill_hidden(self, input_ids, lengths, slot_ids, k_caches, v_caches):
        """prefill's decoder stack: hidden states at every position [B, S, D] (before the final
        norm). Called alone (eagerly) for prompt logprobs."""
        input_ids = input_ids.clone()  # a fresh tensor keeps the FX graph input stable
        B, S = input_ids.shape
        device = input_ids.device
        positions = torch.arange(S, device=device).expand(B, S)  # [B, S]
        cos, sin = self.rotary(positions, lengths)
        # causal inside the prompt; keys past a row's length are padding
        q_pos, k_pos = positions[:, :, None], positions[:, None, :]  # [B, S, 1], [B, 1, S]
        mask = (k_pos <= q_pos) & (k_pos < lengths[:, None, None])  # [B, S, S]
        heads = torch.arange(self.num_local_kv_heads, device=device)
        meta = AttentionMetadata(
            cos, sin,
            kv_write_index=(slot_ids[:, None, None], heads[None, :, None], positions[:, None, :]),
            mask=mask[:, None], attend_to_cache=False,
        )
        return self.model(input_ids, meta, k_caches, v_caches)  # [B, S, D]

    def decode(self, input_ids, positions, k_caches, v_caches, context_len: int | None = None):
        """One new token per slot. input_ids [B, 1]; positions [B] where each token goes (rows of
        idle slots point at the cache's scratch column T-1, which no real row ever attends to).
        context_len (static: one graph per value): attend over cache positions [0, context_len)
        only, which must hold every real row's position; None = the whole cache."""
        input_ids = input_ids.clone()
        B = input_ids.shape[0]
        device = input_ids.device
        T = context_len or k_caches[0].shape[2]  # attended positions
        pos = positions[:, None]  # [B, 1]
        cos, sin = self.rotary(pos, positions + 1)
        mask = torch.arange(T, device=device)[None, :] <= pos  # [B, T]
        heads = torch.arange(self.num_local_kv_heads, device=device)
        meta = AttentionMetadata(
            cos, sin,
            kv_write_index=(torch.arange(B, device=device)[:, None, None], heads[None, :, None], pos[:, None, :]),
            mask=mask[:, None, None, :], attend_to_cache=True,
        )
        h = self.model(input_ids, meta, k_caches, v_caches)  # [B, 1, D]
        return self.compute_logits(h[:, 0])
