import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from zoo.loader import CheckpointError

from checkpoints import build_checkpoint


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_weights(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_fused_weights_hold_the_checkpoint_tensors(checkpoint):
    path = checkpoint("qwen2")
    model = zoo.load(path, max_batch_size=1, max_seq_len=16)
    raw = load_file(os.path.join(path, "model.safetensors"))
    attn = model.module.model.layers[1].self_attn
    p = "model.layers.1.self_attn."
    assert torch.equal(attn.qkv_proj.weight, torch.cat([raw[p + "q_proj.weight"], raw[p + "k_proj.weight"],
                                                        raw[p + "v_proj.weight"]]))
    assert torch.equal(attn.qkv_proj.bias, torch.cat([raw[p + "q_proj.bias"], raw[p + "k_proj.bias"],
                                                      raw[p + "v_proj.bias"]]))
    mlp = model.module.model.layers[1].mlp
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([raw["model.layers.1.mlp.gate_proj.weight"],
                                                           raw["model.layers.1.mlp.up_proj.weight"]]))
    # tied: the LM head is the embedding table itself, not a copy
    assert model.module.lm_head.weight.data_ptr() == model.module.model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoint_loads_identically(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = checkpoint("llama3_gqa")
    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    a = zoo.load(src, max_batch_size=1, max_seq_len=64).generate([1, 2, 3], max_new_tokens=8)
    b = zoo.load(sharded, max_batch_size=1, max_seq_len=64).generate([1, 2, 3], max_new_tokens=8)
    assert a.token_ids == b.token_ids


def test_dtype_conversion_on_load(checkpoint):
    model = zoo.load(checkpoint("llama2"), dtype="bfloat16", max_batch_size=1, max_seq_len=16)
    assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}
    assert model.engine.cache.k[0].dtype == torch.bfloat16
    assert len(model.generate([1, 2, 3], max_new_tokens=4).token_ids) == 4


def test_missing_tensor_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint("llama2"), tmp_path / "m")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.weight' "
                                              r"\(expected shape \[64, 64\]\)"):
        zoo.load(path)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint("llama3_gqa"), tmp_path / "m")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' .* has shape \[100, 64\], "
                                              r"expected \[160, 64\]"):
        zoo.load(path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint("llama2"), tmp_path / "m")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(CheckpointError, match=r"does not use: \['model.layers.0.self_attn.q_norm.weight'\]"):
        zoo.load(path)


@pytest.mark.parametrize("value, what", [(float("nan"), "1 NaN and 0 inf"), (float("inf"), "0 NaN and 1 inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(checkpoint, tmp_path, value, what):
    """A NaN weight would make every logit NaN and greedy decoding emit token 0 forever."""
    path = _copy(checkpoint("llama3_gqa"), tmp_path / "m")

    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = value

    _rewrite_weights(path, poison)
    with pytest.raises(CheckpointError, match=rf"'model.layers.1.mlp.up_proj.weight'.*{what}"):
        zoo.load(path, max_batch_size=1, max_seq_len=16)


def test_pickled_weights_are_never_loaded(tmp_path, checkpoint):
    path = _copy(checkpoint("llama2"), tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights .* never loads pickled weights"):
        zoo.load(path)


def test_truncated_file_and_missing_shard(checkpoint, tmp_path):
    path = _copy(checkpoint("llama2"), tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file"):
        zoo.load(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match=r"names shard 'model-00002-of-00002.safetensors', which is missing"):
        zoo.load(path)


RSS_PROBE = textwrap.dedent("""
    import sys, torch, zoo
    from zoo.config import ModelConfig
    from zoo.models import read_config, spec_for
    from zoo.loader import load_weights

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    config = read_config(sys.argv[1])
    with torch.device("meta"):
        module = spec_for(config).model_class(config)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = status("VmRSS")
    load_weights(module, sys.argv[1], torch.float32, torch.device("cpu"))
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())
    print(before, status("VmHWM"), weight_bytes)
""")


def test_peak_rss_while_loading_stays_under_1_3x_weight_bytes(tmp_path):
    # ~100 MB fp32 checkpoint: the embedding table and LM head dominate, like in real models
    path = build_checkpoint("llama3_gqa", str(tmp_path / "big"), hidden_size=384, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, vocab_size=30000)
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, path], capture_output=True, text=True, check=True)
    before, peak, weight_bytes = map(int, out.stdout.split())
    assert weight_bytes > 90e6
    growth = peak - before
    assert growth <= 1.3 * weight_bytes, f"peak RSS grew {growth / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB of weights"
