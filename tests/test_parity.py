"""Parity with the transformers reference on the same weights: fp32 logits within 1e-4 at every
step, and identical greedy tokens for 32+ new tokens, at batch 1 and for a batch of 3 prompts."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo

KINDS = ["llama3_gqa", "llama2", "qwen2", "qwen3", "qwen3_bias", "llama_linear", "llama_dynamic"]
PROMPTS = [[3, 17, 42, 99, 7, 250, 11], [5, 9], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 1, 2]]
NEW_TOKENS = 40


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_at_every_step(checkpoint, kind):
    path = checkpoint(kind)
    hf = _hf(path)
    model = zoo.load(path, max_batch_size=2, max_seq_len=128)
    prompt = PROMPTS[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0)
    ref_tokens = ref.sequences[0, len(prompt):].tolist()

    # drive zoo's graph entry points directly, feeding the reference tokens, and compare each step
    engine = model.engine
    slot = engine.cache.alloc()
    assert engine.cache.reserve(slot, len(prompt) + NEW_TOKENS)  # blocks for the positions decode writes
    try:
        logits = engine.runner.prefill([prompt], [slot])[0]
        diffs = [(logits - ref.logits[0][0]).abs().max().item()]
        B = engine.runner.buckets.batch_for(slot + 1)
        for step, token in enumerate(ref_tokens[:-1], start=1):
            ids = torch.zeros(B, 1, dtype=torch.long)
            pos = torch.full((B,), engine.cache.scratch_position)
            ids[slot, 0], pos[slot] = token, len(prompt) + step - 1
            logits = engine.runner.decode(ids, pos)[slot]
            diffs.append((logits - ref.logits[step][0]).abs().max().item())
    finally:
        engine.cache.free(slot)
    assert len(diffs) == NEW_TOKENS
    assert max(diffs) <= 1e-4, f"max |zoo - transformers| logits per step: {max(diffs):.3g}"


@pytest.mark.parametrize("kind", ["llama3_gqa", "llama2", "qwen2", "qwen3", "llama_dynamic"])
def test_greedy_tokens_match_transformers_batch_1(checkpoint, kind):
    path = checkpoint(kind)
    hf = _hf(path)
    model = zoo.load(path, max_batch_size=4, max_seq_len=128)
    for prompt in PROMPTS:
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS)
        assert out.token_ids == ref[0, len(prompt):].tolist()
        assert out.finish_reason == "length" and len(out.token_ids) == NEW_TOKENS


@pytest.mark.parametrize("kind", ["llama3_gqa", "llama2", "qwen2", "qwen3"])
def test_greedy_tokens_match_transformers_batch_of_3(checkpoint, kind):
    """transformers runs the batch left-padded with an attention mask; zoo right-pads into slots."""
    path = checkpoint(kind)
    hf = _hf(path)
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    model = zoo.load(path, max_batch_size=4, max_seq_len=128)
    outs = model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    for i, out in enumerate(outs):
        assert out.token_ids == ref[i, width:].tolist(), f"prompt {i}"


def test_decode_context_buckets_match_transformers(checkpoint):
    """Decode attends over the smallest context bucket holding every running sequence: generations
    that cross buckets (16 -> 32 -> 64) give transformers' tokens, batch 1 and a batch of 3."""
    from zoo.graphs import Buckets

    path = checkpoint("llama3_gqa")
    hf = _hf(path)
    buckets = Buckets((1, 2, 4), (32, 64, 128), context_lens=(16, 32, 64, 128))
    model = zoo.load(path, max_batch_size=4, max_seq_len=128, buckets=buckets)
    outs = model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    for prompt, out in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    assert model.engine.runner.buckets.context_len_for(len(PROMPTS[2]) + NEW_TOKENS) == 64
