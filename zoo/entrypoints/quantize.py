"""python -m zoo.quantize --model-path DIR --out DIR --mode int8|int4 [--group-size G]

Writes a weight-only quantized copy of a float Hugging Face checkpoint folder: every weight of a
linear layer (q/k/v/o, gate/up/down, and the LM head unless it is tied to the embedding table)
is replaced by its stored quantized tensors (`<name>.qweight`, `<name>.scales`[, `<name>.zeros`];
the format is in zoo.layers.quant and docs/quantization.md), everything else is copied as is, and
config.json gains a `quantization_config`. zoo.load reads the folder directly, with or without
tensor parallelism (each rank reads only its rows / columns of the stored tensors).

The input is read one tensor at a time and each input file becomes one output file, so memory
stays near the largest input file's quantized size plus one float32 tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from zoo.config import DEFAULT_INT4_GROUP_SIZE, INT4_GROUP_SIZES, QUANT_MODES, Quantization
from zoo.entrypoints.options import ArgumentParser, handled_errors, report
from zoo.errors import CheckpointError, ConfigError

INDEX_FILE = "model.safetensors.index.json"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m zoo.quantize",
                       description="Quantize a float checkpoint's linear weights to int8 or int4 (weight-only) and "
                                   "write a folder zoo.load reads directly.")
    p.add_argument("--model-path", required=True, help="the float Hugging Face checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--mode", required=True, choices=QUANT_MODES,
                   help="int8: one scale per output channel; int4: a scale and an offset per group of input columns")
    p.add_argument("--group-size", type=int, choices=INT4_GROUP_SIZES, default=None,
                   help=f"int4: input columns per group (default {DEFAULT_INT4_GROUP_SIZE})")
    p.add_argument("--lm-head", choices=(*QUANT_MODES, "float"), default="int8",
                   help="how the LM head is held (default int8; a head tied to the embedding table stays float)")
    return p


def quantized_tensor_modes(model_path: str, quantization: Quantization) -> dict[str, str]:
    """Checkpoint tensor name -> the mode its weight is quantized to: the weights of every linear
    layer zoo's model quantizes, found by building the model on the meta device."""
    import torch

    from zoo.layers.linear import QuantizableLinear, quantize_linear_layers
    from zoo.models import read_config, spec_for

    config = read_config(model_path)
    if config.quantization is not None:
        raise ConfigError(f"{config.source}: the checkpoint is already quantized ({config.quantization.describe()})")
    with torch.device("meta"):
        module = spec_for(config).model_class(config, None)
    lm_head = None if config.tie_word_embeddings else quantization.lm_head
    quantize_linear_layers(module, quantization.mode, quantization.group_size, lm_head)
    modes = {}
    for name, sources in module.checkpoint_sources().items():
        layer_path, _, leaf = name.rpartition(".")
        layer = module.get_submodule(layer_path)
        if leaf != "qweight" or not isinstance(layer, QuantizableLinear):
            continue
        for src in sources:  # a name, or rows of a fused tensor (Qwen-1's c_attn): the whole tensor is quantized
            src_name = getattr(src, "name", src)
            modes[src_name.rpartition(".")[0] + ".weight"] = layer.quant_mode
    return modes


def quantize_checkpoint(model_path: str, out_dir: str, quantization: Quantization) -> dict:
    """Write the quantized copy of model_path to out_dir; returns a summary (bytes in / out, tensors)."""
    import torch
    from safetensors.torch import save_file

    from zoo.layers import quant
    from zoo.loader import SafetensorsCheckpoint

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"--out {out_dir!r} exists and is not empty")
    modes = quantized_tensor_modes(model_path, quantization)
    ckpt = SafetensorsCheckpoint(model_path)
    missing = sorted(set(modes) - ckpt.names())
    if missing:
        raise CheckpointError(f"checkpoint {model_path!r} is missing tensor(s) {missing[:5]}")
    files: dict[str, list[str]] = {}
    for name in sorted(ckpt.names()):
        files.setdefault(ckpt.name_to_file[name], []).append(name)
    os.makedirs(out_dir, exist_ok=True)
    weight_map, bytes_in, bytes_out = {}, 0, 0
    for i, (path, names) in enumerate(sorted(files.items())):
        tensors = {}
        for name in names:
            shape, dtype = ckpt.shape(name), ckpt.dtype(name)
            bytes_in += torch.Size(shape).numel() * dtype.itemsize
            if name in modes:
                w = torch.empty(shape, dtype=torch.float32)
                ckpt.read_into(name, w)
                stem = name.rpartition(".")[0]
                for leaf, value in quant.quantize(w, modes[name], quantization.group_size).items():
                    tensors[f"{stem}.{leaf}"] = value.contiguous()
            else:
                value = torch.empty(shape, dtype=dtype)
                ckpt.read_into(name, value)
                tensors[name] = value
        out_name = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, out_name), metadata={"format": "pt", "zoo_quantization":
                                                                      json.dumps(quantization.to_hf())})
        bytes_out += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: out_name for n in tensors})
    if len(files) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": bytes_out}, "weight_map": weight_map}, f, indent=2)
    _copy_other_files(model_path, out_dir, quantization)
    return {"tensors_quantized": len(modes), "bytes_in": bytes_in, "bytes_out": bytes_out}


def _copy_other_files(model_path: str, out_dir: str, quantization: Quantization) -> None:
    """config.json with its quantization_config; tokenizer, generation config and the rest as they are."""
    for entry in os.listdir(model_path):
        src = os.path.join(model_path, entry)
        if entry.endswith(".safetensors") or entry == INDEX_FILE or not os.path.isfile(src):
            continue
        if entry == "config.json":
            with open(src, encoding="utf-8") as f:
                raw = json.load(f)
            raw["quantization_config"] = quantization.to_hf()
            with open(os.path.join(out_dir, entry), "w", encoding="utf-8") as f:
                json.dump(raw, f, indent=2)
        else:
            shutil.copy2(src, os.path.join(out_dir, entry))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.group_size is not None and args.mode != "int4":
        print("error: --group-size goes with --mode int4", file=sys.stderr)
        return 2
    try:
        quantization = Quantization(args.mode, args.group_size or DEFAULT_INT4_GROUP_SIZE,
                                    None if args.lm_head == "float" else args.lm_head)
        if not os.path.isfile(os.path.join(args.model_path, "config.json")):
            raise CheckpointError(f"{args.model_path!r} has no config.json")
        summary = quantize_checkpoint(args.model_path, args.out, quantization)
    except handled_errors() as e:
        return report(e)
    print(f"[zoo] quantized {summary['tensors_quantized']} linear weights to {quantization.describe()}: "
          f"{summary['bytes_in'] / 2**20:.1f} MiB -> {summary['bytes_out'] / 2**20:.1f} MiB", file=sys.stderr)
    print(args.out)
    return 0
