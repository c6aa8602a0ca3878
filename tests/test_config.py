import json

import pytest

from zoo.config import ConfigError
from zoo.models import config_from_dict, read_config

BASE = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, intermediate_size=128, vocab_size=100, max_position_embeddings=256)


def parse(**fields):
    return config_from_dict({**BASE, **fields})


def test_llama3_rope_in_transformers5_format():
    c = parse(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert (c.family, c.rope.type, c.rope.theta, c.rope.factor) == ("llama", "llama3", 500000.0, 8.0)
    assert c.rope.original_max_position_embeddings == 8192 and c.head_dim == 16 and c.num_kv_heads == 2


def test_legacy_rope_scaling_with_type_key():
    c = parse(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    assert (c.rope.type, c.rope.theta, c.rope.factor) == ("linear", 1e6, 2.0)
    c = parse(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert c.rope.type == "dynamic"


def test_qwen2_has_qkv_bias_and_tied_embeddings():
    c = parse(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True, use_sliding_window=False,
              sliding_window=4096)
    assert c.family == "qwen2" and c.qkv_bias and not c.o_bias and c.tie_word_embeddings


def test_unknown_architecture_is_named():
    with pytest.raises(ConfigError, match=r"unsupported architecture 'MistralForCausalLM'.*'architectures'"):
        parse(architectures=["MistralForCausalLM"])


def test_unsupported_rope_type_is_named():
    with pytest.raises(ConfigError, match=r"rope_scaling.rope_type='yarn' is not supported"):
        parse(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_missing_rope_field_is_named():
    with pytest.raises(ConfigError, match=r"rope_parameters.low_freq_factor is required"):
        parse(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "high_freq_factor": 4.0})


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_sliding_window_in_use_is_refused(arch):
    with pytest.raises(ConfigError, match=r"use_sliding_window"):
        parse(architectures=[arch], use_sliding_window=True, sliding_window=64, max_window_layers=0)


def test_qwen3_has_qk_norm_explicit_head_dim_and_optional_bias():
    c = parse(architectures=["Qwen3ForCausalLM"], head_dim=128)
    assert c.family == "qwen3" and c.qk_norm and c.head_dim == 128 and not c.qkv_bias and not c.o_bias
    c = parse(architectures=["Qwen3ForCausalLM"], attention_bias=True)
    assert c.qkv_bias and c.o_bias
    assert not parse(architectures=["LlamaForCausalLM"]).qk_norm


def test_sliding_window_not_in_use_is_accepted():
    # switched on, but no layer reaches max_window_layers: every layer attends fully
    parse(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=64, max_window_layers=2)
    # switched on, window as long as the context: no effect
    parse(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=256, max_window_layers=0)


def test_missing_required_field_is_named():
    raw = dict(BASE)
    del raw["intermediate_size"]
    with pytest.raises(ConfigError, match=r"'intermediate_size' is missing"):
        config_from_dict(raw)


def test_missing_folder_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder not found"):
        read_config(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"not valid JSON"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match=r"hidden_act='gelu'"):
        read_config(str(tmp_path))


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", r"config.json: expected a JSON object, got list"),
    (b"\xff\xfe{}", r"config.json: not UTF-8 text"),
    (json.dumps({**BASE, "hidden_size": "abc"}).encode(), r"field 'hidden_size' must be a positive integer, got 'abc'"),
    (json.dumps({**BASE, "num_attention_heads": 0}).encode(), r"field 'num_attention_heads' must be a positive"),
    (json.dumps({**BASE, "vocab_size": 1.5}).encode(), r"field 'vocab_size' must be a positive integer"),
    (json.dumps({**BASE, "num_hidden_layers": True}).encode(), r"field 'num_hidden_layers' must be a positive"),
    (json.dumps({**BASE, "architectures": "LlamaForCausalLM"}).encode(), r"unsupported architecture None"),
])
def test_malformed_config_json_names_the_file_and_field(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        read_config(str(tmp_path))
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("content, message", [
    ("{broken", r"generation_config.json: not valid JSON"),
    ("[]", r"generation_config.json: expected a JSON object"),
    ('{"eos_token_id": "two"}', r"field 'eos_token_id' must be a token id or a list of them"),
])
def test_broken_generation_config_is_a_config_error(checkpoint, tmp_path, content, message):
    import shutil

    import zoo

    folder = tmp_path / "model"
    shutil.copytree(checkpoint("llama3_gqa"), folder)
    (folder / "generation_config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        zoo.load(str(folder), max_batch_size=1, max_seq_len=16)


@pytest.mark.parametrize("module", ["zoo.llama.infer", "zoo.qwen.infer"])
def test_both_clis_report_config_errors_in_one_line_with_exit_2(tmp_path, module):
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({**BASE, "num_attention_heads": 0}))
    run = subprocess.run([sys.executable, "-m", module, "--model-path", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "num_attention_heads" in run.stderr
