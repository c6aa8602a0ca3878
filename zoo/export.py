"""python -m zoo.export --out DIR [--model-path DIR] [--batch-sizes 1,2] [--prefill-lens 32,64] ...

Exports a model's prefill / decode graphs ahead of time with AOTInductor (see zoo.aoti), so a
service can load them with zoo.aoti.ExportedGraphs.load without tracing or compiling. Progress
goes to stderr; the export folder is printed on stdout when it is complete. Inductor builds in
~/.cache/zoo/inductor (or $ZOO_CACHE_DIR/inductor) unless TORCHINDUCTOR_CACHE_DIR is set.
"""
from __future__ import annotations

import argparse
import sys


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _context_lens(text: str) -> list[int]:
    return [] if text.strip().lower() == "none" else _int_list(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zoo.export",
        description="Export a model's prefill/decode graphs with AOTInductor (one package per shape bucket, "
                    "weights not included: they are fed from the checkpoint at load time).")
    p.add_argument("--model-path", help="Hugging Face checkpoint folder (default: the embedded tiny llama)")
    p.add_argument("--out", required=True, help="folder to write the packages and manifest.json to")
    p.add_argument("--max-batch-size", type=int,
                   help="KV-cache slots the graphs are built for (default: the largest --batch-sizes, else 8)")
    p.add_argument("--max-seq-len", type=int, help="KV-cache length the graphs are built for (default: the "
                   "largest --prefill-lens, else min(max_position_embeddings, 2048))")
    p.add_argument("--batch-sizes", type=_int_list,
                   help="batch buckets, e.g. 1,2,4 (default: the model's, as zoo.load picks them)")
    p.add_argument("--prefill-lens", type=_int_list,
                   help="prompt-length buckets, e.g. 32,64 (default: the model's, as zoo.load picks them)")
    p.add_argument("--context-lens", type=_context_lens,
                   help="decode context buckets ending at max_seq_len, e.g. 256,512 (default: the model's, as "
                        "zoo.load picks them); 'none' = decode attends over the whole cache, one graph per batch")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--device", default="cpu", help="cpu (tested) | cuda[:N]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from zoo.api import embedded_model_path, load
    from zoo.aoti import export_graphs
    from zoo.config import ConfigError
    from zoo.device import DeviceError
    from zoo.loader import CheckpointError

    max_batch_size = args.max_batch_size or (max(args.batch_sizes) if args.batch_sizes else 8)
    max_seq_len = args.max_seq_len or (max(args.prefill_lens) if args.prefill_lens else None)
    try:
        model = load(args.model_path or embedded_model_path("llama"), device=args.device, dtype=args.dtype,
                     max_batch_size=max_batch_size, max_seq_len=max_seq_len, verbose=True)
        # Unless the lists are given, the buckets zoo.load chose for this model (its compile config's).
        buckets = model.engine.runner.buckets
        contexts = args.context_lens if args.context_lens is not None else list(buckets.context_lens)
        export_graphs(model, args.out, args.batch_sizes or list(buckets.batch_sizes),
                      args.prefill_lens or list(buckets.prefill_lens), contexts)
    except (FileNotFoundError, ConfigError, CheckpointError, DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
