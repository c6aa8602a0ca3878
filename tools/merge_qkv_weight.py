"""Fuse and split a Hugging Face checkpoint offline into per-rank tensor-parallel shards.

    python tools/merge_qkv_weight.py --model-path HF_DIR --tp-size 2 --output-path OUT [--dtype bfloat16]

OUT/
  zoo-tp-manifest.json   format version, tp size, dtype, architecture, sha256 of the source weights,
                         and each rank file's size and sha256
  config.json, generation_config.json, tokenizer files (copied)
  rank_0/model.safetensors, rank_1/model.safetensors, ...
                         zoo's parameter names (qkv_proj, gate_up_proj: already fused) holding
                         exactly that rank's slice, so a rank reads one file front to back

zoo.load(OUT, tp=N) (and the CLI's --model-path OUT --tp N) reads this layout; a different tp size
is refused with an error that names both. Each rank's shard is produced by zoo's own sharded loader
(zoo.loader.load_weights with that rank's TPContext), so the offline and online splits are the
same code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402

from zoo.device import default_dtype, parse_dtype  # noqa: E402
from zoo.models import read_config, spec_for  # noqa: E402
from zoo.loader import TP_FORMAT_VERSION, TP_MANIFEST, SafetensorsCheckpoint, load_weights  # noqa: E402
from zoo.distributed.comm import TPContext  # noqa: E402


def _sha256(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def merge(model_path: str, tp_size: int, output_path: str, dtype: str | None = None) -> dict:
    config = read_config(model_path)
    torch_dtype = parse_dtype(dtype) if dtype else default_dtype(torch.device("cpu"), config.torch_dtype)
    if os.path.exists(os.path.join(output_path, TP_MANIFEST)):
        shutil.rmtree(output_path)
    os.makedirs(output_path, exist_ok=True)
    weight_files = sorted(set(SafetensorsCheckpoint(model_path).name_to_file.values()))
    files = {}
    for rank in range(tp_size):
        with torch.device("meta"):
            module = spec_for(config).model_class(config, TPContext(rank, tp_size))
        load_weights(module, model_path, torch_dtype, torch.device("cpu"))
        tensors = {name: p.detach().contiguous() for name, p in module.named_parameters()
                   if not (name == "lm_head.weight" and config.tie_word_embeddings)}
        rank_dir = os.path.join(output_path, f"rank_{rank}")
        os.makedirs(rank_dir, exist_ok=True)
        out = os.path.join(rank_dir, "model.safetensors")
        save_file(tensors, out, metadata={"format": "pt", "zoo_tp_rank": str(rank), "zoo_tp_size": str(tp_size)})
        files[f"rank_{rank}/model.safetensors"] = {"bytes": os.path.getsize(out), "sha256": _sha256([out])}
        del module, tensors
    for name in sorted(os.listdir(model_path)):  # config, generation config, tokenizer files
        src = os.path.join(model_path, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            shutil.copy2(src, os.path.join(output_path, name))
    manifest = {
        "format_version": TP_FORMAT_VERSION,
        "tp_size": tp_size,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "architecture": config.architecture,
        "source": {"path": os.path.abspath(model_path), "sha256": _sha256(weight_files),
                   "files": [os.path.basename(f) for f in weight_files]},
        "files": files,
    }
    with open(os.path.join(output_path, TP_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--tp-size", type=int, required=True, help="tensor-parallel size to split for")
    p.add_argument("--output-path", required=True, help="output folder (rank_<r>/ sub-folders and a manifest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    args = p.parse_args(argv)
    if args.tp_size < 1:
        p.error("--tp-size must be >= 1")
    try:
        manifest = merge(args.model_path, args.tp_size, args.output_path, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {args.tp_size} rank shard(s), {total / 2**20:.1f} MiB, to {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
