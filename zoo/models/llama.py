"""Llama (2, 3, 3.1/3.2) hand-adapted for graph mode.

Graph entry points, each compiled into one static-shape graph per bucket:
  prefill(input_ids [B, S], start_pos [B], lengths [B], block_tables [B, NB], k_caches, v_caches) -> logits [B, V]
  decode (input_ids [B, 1], positions [B],              block_tables [B, NB], k_caches, v_caches) -> logits [B, V]
  prefill_and_decode: both in one forward (a prompt chunk riding with the running rows' decode step)
Lengths, positions and block ids are tensors, never Python ints taken from data, so one graph
serves every prompt length and block layout inside its bucket. The KV cache is a pool of blocks
per layer, k and v of shape [blocks, KV, block_size, hd], passed in and updated in place; a row's
block table lists its blocks in position order (zoo.graphs.kv_cache).

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

    def prefill(self, input_ids, start_pos, lengths, block_tables, k_caches, v_caches,
                context_len: int | None = None):
        """Prompt tokens from position start_pos (0, or where a cached prefix / an earlier chunk
        ends). input_ids [B, S] right-padded; start_pos [B]; lengths [B] real tokens per row (>= 1);
        block_tables [B, NB] each row's cache blocks; context_len (static) the positions attended,
        covering every row's start_pos + length (None: the whole table) -> logits of each row's
        last real token [B, V]."""
        h = self.prefill_hidden(input_ids, start_pos, lengths, block_tables, k_caches, v_caches, context_len)
        B = h.shape[0]
        h_last = h[torch.arange(B, device=h.device), lengths - 1]  # [B, D] last real token per row
        return self.compute_logits(h_last)

    def prefill_hidden(self, input_ids, start_pos, lengths, block_tables, k_caches, v_caches,
                       context_len: int | None = None):
        """prefill's decoder stack: hidden states at every position [B, S, D] (before the final
        norm). Called alone (eagerly) for prompt logprobs."""
        input_ids = input_ids.clone()  # a fresh tensor keeps the FX graph input stable
        meta = self._prefill_metadata(input_ids, start_pos, lengths, block_tables, k_caches[0], context_len)
        return self.model(input_ids, meta, k_caches, v_caches)  # [B, S, D]

    def decode(self, input_ids, positions, block_tables, k_caches, v_caches, context_len: int | None = None):
        """One new token per row. input_ids [B, 1]; positions [B] where each token goes (idle rows
        point at the cache's scratch column, which no row ever attends to); block_tables [B, NB].
        context_len (static: one graph per value): attend over positions [0, context_len) only,
        which must hold every real row's position; None = the whole table."""
        input_ids = input_ids.clone()
        meta = self._decode_metadata(positions, block_tables, k_caches[0], context_len)
        h = self.model(input_ids, meta, k_caches, v_caches)  # [B, 1, D]
        return self.compute_logits(h[:, 0])

    def prefill_and_decode(self, prefill_ids, start_pos, lengths, prefill_tables, decode_ids, positions,
                           decode_tables, k_caches, v_caches, prefill_context: int | None = None,
                           decode_context: int | None = None):
        """A prefill (chunk) and a decode step in one forward: prefill's inputs [Bp, S] and decode's
        [B, 1] as in those methods, their tokens flattened into one sequence for the linear layers,
        which so read every weight once for both (a decode step costs about that read; a prefill
        chunk run apart would cost another). Each group attends over its own rows' blocks.
        -> logits [Bp + B, V]: each prefill row's last real token, then each decode row."""
        prefill_ids, decode_ids = prefill_ids.clone(), decode_ids.clone()
        Bp, S = prefill_ids.shape
        meta = (self._prefill_metadata(prefill_ids, start_pos, lengths, prefill_tables, k_caches[0], prefill_context),
                self._decode_metadata(positions, decode_tables, k_caches[0], decode_context))
        tokens = torch.cat([prefill_ids.reshape(1, -1), decode_ids.reshape(1, -1)], dim=1)  # [1, Bp*S + B]
        h = self.model(tokens, meta, k_caches, v_caches)[0]  # [Bp*S + B, D]
        h_prefill, h_decode = h[:Bp * S].view(Bp, S, -1), h[Bp * S:]  # [Bp, S, D], [B, D]
        h_last = h_prefill[torch.arange(Bp, device=h.device), lengths - 1]  # [Bp, D]
        return self.compute_logits(torch.cat([h_last, h_decode]))

    def _prefill_metadata(self, input_ids, start_pos, lengths, block_tables, cache, context_len) -> AttentionMetadata:
        B, S = input_ids.shape
        positions = start_pos[:, None] + torch.arange(S, device=input_ids.device)  # [B, S]
        valid = torch.arange(S, device=input_ids.device)[None, :] < lengths[:, None]  # [B, S] not padding
        cos, sin = self.rotary(positions, start_pos + lengths)
        return self._attention_metadata(positions, valid, block_tables, cache, context_len, cos, sin, is_decode=False)

    def _decode_metadata(self, positions, block_tables, cache, context_len) -> AttentionMetadata:
        pos = positions[:, None]  # [B, 1]
        cos, sin = self.rotary(pos, positions + 1)
        return self._attention_metadata(pos, torch.ones_like(pos, dtype=torch.bool), block_tables, cache,
                                        context_len, cos, sin, is_decode=True)

    def _attention_metadata(self, positions, valid, block_tables, cache, context_len, cos, sin,
                            is_decode: bool) -> AttentionMetadata:
        """Where the rows' keys/values go in the paged cache and what each query attends to.
        positions [B, S]; valid [B, S] (False: padding, written to the scratch block);
        block_tables [B, NB]; cache one layer's pool [blocks, KV, bs, hd] (its last block is scratch)."""
        device = positions.device
        bs, scratch = cache.shape[2], cache.shape[0] - 1
        columns = (positions // bs).clamp(max=block_tables.shape[1] - 1)  # [B, S] (padding may run past)
        blocks = torch.where(valid, block_tables.gather(1, columns), scratch)  # [B, S]
        heads = torch.arange(self.num_local_kv_heads, device=device)
        T = context_len or (block_tables.shape[1] - 1) * bs  # the last column is scratch: never attended
        k_pos = torch.arange(T, device=device)  # [T]
        read_blocks = block_tables.index_select(1, k_pos // bs)  # [B, T] the block of each attended position
        mask = k_pos[None, None, :] <= positions[:, :, None]  # [B, S, T] causal; includes any cached prefix
        return AttentionMetadata(
            cos, sin,
            kv_write_index=(blocks[:, None, :], heads[None, :, None], (positions % bs)[:, None, :]),
            # (its own head index: inputs of a nested compile region may not alias one another)
            kv_read_index=(read_blocks[:, None, :], heads.clone()[None, :, None], (k_pos % bs)[None, None, :]),
            block_tables=block_tables,
            mask=mask[:, None], is_decode=is_decode,
        )
