"""The models compare_eager_vs_graph.py measures.

- tiny-llama, tiny-qwen2: the checkpoints embedded in zoo (zoo/embedded/), under 1 M parameters.
- medium-llama: a ~1 B-parameter random-weight Llama (hidden 2048, 16 layers, 16 heads, 16 kv heads,
  intermediate 5632, vocab 32000), built locally with transformers and saved once (bf16
  safetensors, ~1.9 GB) under ~/.cache/zoo/bench-models/ (or $ZOO_CACHE_DIR/bench-models/). It is
  rebuilt only when missing or when its spec changes. No network is used.
- any Hugging Face checkpoint folder given with --model-path.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field

MEDIUM_LLAMA = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
MEDIUM_SEED = 0
SPEC_FILE = "zoo-bench-spec.json"

_ELEMENT_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                 "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class ModelSpec:
    name: str  # tiny-llama | tiny-qwen2 | medium-llama | custom:<folder name>
    path: str
    dtypes: list[str]
    kind: str  # tiny | medium | custom
    notes: list[str] = field(default_factory=list)


def bench_models_dir() -> str:
    root = os.environ.get("ZOO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo"))
    return os.path.join(root, "bench-models")


def _complete(path: str, spec: dict) -> bool:
    try:
        with open(os.path.join(path, SPEC_FILE), encoding="utf-8") as f:
            if json.load(f) != spec:
                return False
    except (OSError, ValueError):
        return False
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        n.endswith(".safetensors") for n in os.listdir(path))


def ensure_medium_llama(root: str | None = None) -> str:
    """Path of the random-weight ~1 B Llama, building it (about 20-30 s, ~1.9 GB) only if missing."""

    spec = {"config": MEDIUM_LLAMA, "seed": MEDIUM_SEED, "dtype": "bfloat16", "format": 1}
    path = os.path.join(root or bench_models_dir(), "medium-llama-1b")
    if _complete(path, spec):
        return path
    _log(f"building the medium random-weight Llama (~1 B parameters) in {path} (once)")
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    config = LlamaConfig(**MEDIUM_LLAMA, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    _save_random_model(LlamaForCausalLM, config, path, spec)
    _log(f"  ... built and saved in {time.perf_counter() - t0:.1f} s")
    return path


def _save_random_model(model_cls, config, path: str, spec: dict) -> None:
    """A randomly initialised (std 0.02) bf16 `model_cls(config)` saved to `path` with its spec file;
    written to a temporary folder first, so `path` only ever holds a complete checkpoint."""
    import torch

    torch.manual_seed(spec["seed"])
    model = model_cls._from_config(config, dtype=torch.bfloat16)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="10GB")
    with open(os.path.join(tmp, SPEC_FILE), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    del model
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# The public configs of two small real models (config.json fields as published), for measurements at
# real sizes with random weights. num_hidden_layers may be overridden (compile time vs depth).
PUBLIC_CONFIGS = {
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", {
        "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151643}),
    "llama-3.2-1b": ("LlamaForCausalLM", {
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": 128001}),
}


def ensure_public_config_model(name: str, num_layers: int | None = None, root: str | None = None) -> str:
    """Path of a random-weight bf16 checkpoint with the public config `name` (PUBLIC_CONFIGS), with
    `num_layers` decoder layers if given; built once (transformers, no network)."""
    import transformers

    architecture, fields = PUBLIC_CONFIGS[name]
    fields = {**fields, **({"num_hidden_layers": num_layers} if num_layers else {})}
    spec = {"architecture": architecture, "config": fields, "seed": MEDIUM_SEED, "dtype": "bfloat16", "format": 1}
    path = os.path.join(root or bench_models_dir(), f"{name}-{fields['num_hidden_layers']}l")
    if _complete(path, spec):
        return path
    _log(f"building a random-weight {name} ({fields['num_hidden_layers']} layers) in {path} (once)")
    model_cls = getattr(transformers, architecture)
    config = model_cls.config_class(**copy.deepcopy(fields))  # (transformers edits rope_scaling in place)
    config.architectures = [architecture]
    _save_random_model(model_cls, config, path, spec)
    return path


def resolve_models(names: list[str], model_paths: list[str], medium_dtypes: list[str],
                   dtypes: list[str] | None) -> list[ModelSpec]:
    """--models names (+ --model-path folders) -> specs with the dtypes each one runs in."""
    from zoo.models import embedded_model_path

    specs = []
    for name in names:
        if name == "tiny-llama":
            specs.append(ModelSpec(name, embedded_model_path("llama"), dtypes or ["float32"], "tiny"))
        elif name == "tiny-qwen2":
            specs.append(ModelSpec(name, embedded_model_path("qwen2"), dtypes or ["float32"], "tiny"))
        elif name == "medium-llama":
            specs.append(ModelSpec(name, "", dtypes or medium_dtypes, "medium"))  # path filled in lazily
        else:
            raise ValueError(f"unknown model {name!r}: use tiny-llama, tiny-qwen2, medium-llama or --model-path")
    for path in model_paths:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"--model-path {path!r} has no config.json")
        specs.append(ModelSpec("custom:" + os.path.basename(os.path.normpath(path)), path,
                               dtypes or ["bfloat16"], "custom"))
    return specs


def _safetensors_headers(path: str) -> list[dict]:
    headers = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                headers.append(json.loads(f.read(n)))
    return headers


def weight_stats(path: str, dtype: str) -> dict:
    """Parameter counts from the safetensors headers, and the bytes one decode step streams from
    memory in `dtype`: every weight except the input embedding table (only B rows of it are read);
    with tied embeddings the table is the LM head and is streamed once."""
    elements, embed = 0, 0
    has_lm_head = False
    for header in _safetensors_headers(path):
        for tname, info in header.items():
            if tname == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            elements += numel
            if tname.endswith("embed_tokens.weight"):
                embed += numel
            if tname.endswith("lm_head.weight"):
                has_lm_head = True
    streamed = elements - (embed if has_lm_head else 0)
    size = _DTYPE_SIZE[dtype]
    return {"parameters": elements, "embedding_parameters": embed, "tied_embeddings": not has_lm_head,
            "streamed_parameters": streamed, "weight_bytes": elements * size, "streamed_bytes": streamed * size}


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)
