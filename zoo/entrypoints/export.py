"""python -m zoo.export --out DIR [--model-path DIR] [--batch-sizes 1,2] [--prefill-lens 32,64] ...

Exports a model's prefill / decode graphs ahead of time with AOTInductor (see zoo.graphs.aoti), so a
service can load them with zoo.graphs.aoti.ExportedGraphs.load without tracing or compiling. Progress
goes to stderr; the export folder is printed on stdout when it is complete. Inductor builds in
~/.cache/zoo/inductor (or $ZOO_CACHE_DIR/inductor) unless TORCHINDUCTOR_CACHE_DIR is set.
"""
from __future__ import annotations

import argparse
import sys

from zoo.api import load_from
from zoo.entrypoints.options import (add_model_options, handled_errors, positive_int_list, report,
                                     settings_from_args)
from zoo.graphs.aoti import export_graphs


def _context_lens(text: str) -> list[int]:
    return [] if text.strip().lower() == "none" else positive_int_list(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zoo.export",
        description="Export a model's prefill/decode graphs with AOTInductor (one package per shape bucket, "
                    "weights not included: they are fed from the checkpoint at load time).")
    add_model_options(p, exclude=("compiled", "tp", "use_mc2", "tp_timeout_s", "inductor_options", "cache_dir"),
                      defaults={"max_batch_size": "(here: the largest --batch-sizes, else 8)",
                                "max_seq_len": "(here: the largest --prefill-lens, else the model's default)"})
    g = p.add_argument_group("export")
    g.add_argument("--out", required=True, help="folder to write the packages and manifest.json to")
    g.add_argument("--batch-sizes", type=positive_int_list,
                   help="batch buckets, e.g. 1,2,4 (default: the model's, as zoo.load picks them)")
    g.add_argument("--prefill-lens", type=positive_int_list,
                   help="prompt-length buckets, e.g. 32,64 (default: the model's, as zoo.load picks them)")
    g.add_argument("--context-lens", type=_context_lens,
                   help="decode context buckets ending at max_seq_len, e.g. 256,512 (default: the model's, as "
                        "zoo.load picks them); 'none' = decode attends over the whole cache, one graph per batch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    max_batch_size = args.max_batch_size or (max(args.batch_sizes) if args.batch_sizes else 8)
    max_seq_len = args.max_seq_len or (max(args.prefill_lens) if args.prefill_lens else None)
    try:
        settings = settings_from_args(args, max_batch_size=max_batch_size, max_seq_len=max_seq_len, verbose=True)
        model = load_from(settings)
        # Unless the lists are given, the buckets zoo.load chose for this model (its compile config's).
        buckets = model.buckets
        contexts = args.context_lens if args.context_lens is not None else list(buckets.context_lens)
        export_graphs(model.module, model.kv_cache, args.out, args.batch_sizes or list(buckets.batch_sizes),
                      args.prefill_lens or list(buckets.prefill_lens), contexts)
    except handled_errors() as e:
        return report(e)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
