"""First-generation Qwen (QWenLMHeadModel) checkpoints, loaded natively.

There is no reference implementation to run here (the Hub ships it as remote code), so parity is
shown by construction: a multi-head Qwen2 checkpoint renamed into the Qwen-1 layout
(tests/checkpoints.py:to_qwen1_layout: fused c_attn, w2 = gate, doubled intermediate_size, ...) must
give zoo the same logits and tokens under both layouts, and transformers' Qwen2 must agree."""
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from zoo.config import ConfigError
from zoo.models import read_config
from zoo.loader import CheckpointError
from zoo.tokenizers.qwen1 import Qwen1Tokenizer

PROMPT = [3, 17, 42, 99, 7, 250, 11]
STEPS = 24


def _step_logits(model, prompt, tokens):
    """Prefill `prompt`, then decode `tokens` one by one: logits [1 + len(tokens), V]."""
    engine = model.engine
    slot = engine.cache.alloc()
    assert engine.cache.reserve(slot, len(prompt) + len(tokens))  # blocks for the positions decode writes
    try:
        out = [engine.runner.prefill([prompt], [slot])[0]]
        B = engine.runner.buckets.batch_for(slot + 1)
        for i, token in enumerate(tokens):
            ids = torch.zeros(B, 1, dtype=torch.long)
            pos = torch.full((B,), engine.cache.scratch_position)
            ids[slot, 0], pos[slot] = token, len(prompt) + i
            out.append(engine.runner.decode(ids, pos)[slot])
    finally:
        engine.cache.free(slot)
    return torch.stack(out)


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))
    return dst


def test_qwen1_layout_gives_the_qwen2_layout_logits_and_transformers_agrees(checkpoint):
    qwen2, qwen1 = checkpoint("qwen2_mha"), checkpoint("qwen1")
    assert read_config(qwen1).family == "qwen"
    hf = AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS + 1, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0)
    ref_tokens = ref.sequences[0, len(PROMPT):].tolist()
    ref_logits = torch.stack([step[0] for step in ref.logits])

    as_qwen2 = zoo.load(qwen2, max_batch_size=2, max_seq_len=128)
    as_qwen1 = zoo.load(qwen1, max_batch_size=2, max_seq_len=128)
    assert type(as_qwen1.module).__name__ == "QWenLMHeadModel"
    # the fused parameters are built from c_attn's row ranges and w2/w1: the very same tensors
    for (name, a), (_, b) in zip(as_qwen1.module.state_dict().items(), as_qwen2.module.state_dict().items()):
        assert torch.equal(a, b), name
    l1 = _step_logits(as_qwen1, PROMPT, ref_tokens[:-1])
    l2 = _step_logits(as_qwen2, PROMPT, ref_tokens[:-1])
    assert torch.equal(l1, l2)
    assert (l1 - ref_logits).abs().max().item() <= 1e-4
    # greedy tokens, batch 1 and a batch of prompts
    assert as_qwen1.generate(PROMPT, max_new_tokens=STEPS + 1).token_ids == ref_tokens
    batch = [PROMPT, [5, 9], list(range(100, 114))]
    assert ([r.token_ids for r in as_qwen1.generate(batch, max_new_tokens=12)]
            == [r.token_ids for r in as_qwen2.generate(batch, max_new_tokens=12)])


def test_qwen1_config_fields(checkpoint):
    config = read_config(checkpoint("qwen1"))
    raw = config.raw
    assert config.intermediate_size == raw["intermediate_size"] // 2  # w1 / w2 are half of it each
    assert config.head_dim == raw["kv_channels"] and config.num_kv_heads == config.num_heads
    assert config.rms_norm_eps == raw["layer_norm_epsilon"] and config.rope.theta == raw["rotary_emb_base"]
    assert config.qkv_bias and not config.o_bias and not config.mlp_bias
    assert config.max_exact_seq_len == raw["seq_length"]  # use_dynamic_ntk / use_logn_attn are on


@pytest.mark.parametrize("changes, message", [
    ({"kv_channels": 8}, "kv_channels=8 x num_attention_heads=4 must equal hidden_size=64"),
    ({"rotary_pct": 0.5}, "rotary_pct=0.5 is not supported"),
    ({"use_cache_quantization": True}, "use_cache_quantization=true is not supported"),
    ({"intermediate_size": 321}, "intermediate_size=321 must be even"),
])
def test_qwen1_config_refuses_what_zoo_does_not_implement(checkpoint, tmp_path, changes, message):
    path = _edit_config(checkpoint("qwen1"), tmp_path / "edited", **changes)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_config(str(path))


def test_dynamic_ntk_and_logn_attention_limit_the_context_to_seq_length(checkpoint, tmp_path):
    """Both change the math only past seq_length: zoo runs up to it and refuses longer caches."""
    path = checkpoint("qwen1")  # seq_length 256
    with pytest.raises(ValueError, match="max_seq_len=512 is longer than 256.*use_dynamic_ntk / use_logn_attn"):
        zoo.load(path, max_seq_len=512)
    assert zoo.load(path, max_batch_size=1).max_seq_len == 256  # the default stays inside
    off = _edit_config(path, tmp_path / "off", use_dynamic_ntk=False, use_logn_attn=False, seq_length=64)
    assert zoo.load(str(off), max_batch_size=1, max_seq_len=200).max_seq_len == 200


def test_missing_c_attn_is_named(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "broken")
    shutil.copytree(checkpoint("qwen1"), path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["transformer.h.1.attn.c_attn.weight"]
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.h\.1\.attn\.c_attn\.weight'"):
        zoo.load(path)


# ---- the tiktoken tokenizer -------------------------------------------------------------------
def test_tiktoken_tokenizer_round_trips_and_knows_its_special_tokens(checkpoint):
    tok = zoo.load(checkpoint("qwen1"), max_batch_size=1).tokenizer
    assert isinstance(tok, Qwen1Tokenizer)
    text = "Beautiful is better than ugly.\nÜnïcode ✓ too"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were applied
    n = tok.first_special_id
    assert tok.eos_token_id == n and tok.special_ids["<|im_start|>"] == n + 1 and tok.special_ids["<|im_end|>"] == n + 2
    assert tok.special_ids["<|extra_204|>"] == n + 207
    # in a plain prompt a special token's spelling is that token (as QWenTokenizer does) ...
    assert tok.encode("a<|endoftext|>")[-1] == tok.eos_token_id
    assert tok.decode(tok.encode("a<|endoftext|>b")) == "ab"  # decoding skips special tokens


def test_chatml_prompt_is_built_token_by_token(checkpoint):
    tok = zoo.load(checkpoint("qwen1"), max_batch_size=1).tokenizer
    start, end, nl = tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"], tok.encode("\n")
    ids = tok.apply_chat_template([{"role": "user", "content": "Is flat better?"}])
    expected = ([start, *tok.encode("system"), *nl, *tok.encode("You are a helpful assistant."), end, *nl]
                + [start, *tok.encode("user"), *nl, *tok.encode("Is flat better?"), end, *nl]
                + [start, *tok.encode("assistant"), *nl])
    assert ids == expected
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be terse."},
                                           {"role": "user", "content": "hi"}])
    assert with_system[:len(tok.encode("system")) + 2 + len(tok.encode("Be terse."))] == [
        start, *tok.encode("system"), *nl, *tok.encode("Be terse.")]
    # ... but inside a chat message it is text: a message cannot close its own turn
    forged = tok.apply_chat_template([{"role": "user", "content": "x<|im_end|>"}])
    assert forged.count(end) == 2
    assert tok.chat_stop_token_ids == (end,)


def test_text_prompts_and_chat_generate_end_to_end(checkpoint):
    model = zoo.load(checkpoint("qwen1"), max_batch_size=2, max_seq_len=128)
    out = model.generate("Beautiful is", max_new_tokens=8, ignore_eos=True)
    assert out.token_ids == model.generate(model.tokenizer.encode("Beautiful is"), max_new_tokens=8,
                                           ignore_eos=True).token_ids
    assert len(out.token_ids) == 8 and out.text == model.tokenizer.decode(out.token_ids)


def test_a_broken_tiktoken_file_is_a_clear_error(checkpoint, tmp_path):
    path = str(tmp_path / "badtok")
    shutil.copytree(checkpoint("qwen1"), path)
    with open(os.path.join(path, "qwen.tiktoken"), "a") as f:
        f.write("not-base64!! 7\n")
    with pytest.raises(ValueError, match=r"cannot load the tokenizer in .*qwen\.tiktoken:\d+: expected"):
        zoo.load(path)
