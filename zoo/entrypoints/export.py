"""python -m zoo.export --out DIR [--model-path DIR] [--batch-sizes 1,2] [--prefill-lens 32,64] ...

Exports a model's prefill / decode graphs ahead of time with AOTInductor (see zoo.graphs.aoti), so a
service can load them with zoo.graphs.aoti.ExportedGraphs.load without tracing or compiling. Progress
goes to stderr; the export folder is printed on stdout when it is complete. Inductor builds in
~/.cache/zoo/inductor (or $ZOO_CACHE_DIR/inductor) unless TORCHINDUCTOR_CACHE_DIR is set.
"""
from __future__ import annotations

import argparse
import sys

from zoo.entrypoints.options import (ArgumentParser, add_model_options, handled_errors, positive_int_list, report,
                                     settings_from_args)


def _context_lens(text: str) -> list[int]:
    return [] if text.strip().lower() == "none" else positive_int_list(text)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
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
                   help="prompt-length buckets, e.g. 32,64 (default: the model's, as zoo.load picks them; powers of "
                        "two from 32 when its compile config has dynamic lengths)")
    g.add_argument("--context-lens", type=_context_lens,
                   help="decode context buckets ending at max_seq_len, e.g. 256,512 (default: the model's, as "
                        "zoo.load picks them; none when its compile config has dynamic lengths); 'none' = decode "
                        "attends over the whole cache, one graph per batch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    max_batch_size = args.max_batch_size or (max(args.batch_sizes) if args.batch_sizes else 8)
    max_seq_len = args.max_seq_len or (max(args.prefill_lens) if args.prefill_lens else None)
    try:
        settings = settings_from_args(args, max_batch_size=max_batch_size, max_seq_len=max_seq_len, verbose=True)
        from zoo.api import load_from  # torch: only once the options have passed their checks
        from zoo.graphs import Buckets
        from zoo.graphs.aoti import export_graphs

        model = load_from(settings)
        # Unless the lists are given, the buckets zoo.load chose for this model (its compile config's).
        buckets = model.buckets
        if buckets.dynamic_lengths:  # exported graphs are static-shaped: power-of-two length buckets
            buckets = Buckets.default(model.kv_cache.num_slots, model.max_seq_len)
        chosen = Buckets(tuple(args.batch_sizes or buckets.batch_sizes), tuple(args.prefill_lens or buckets.prefill_lens),
                         tuple(args.context_lens if args.context_lens is not None else buckets.context_lens))
        _check_loadable(chosen, model.kv_cache.num_slots, model.max_seq_len)  # before minutes of compiling
        export_graphs(model.module, model.kv_cache, args.out, list(chosen.batch_sizes), list(chosen.prefill_lens),
                      list(chosen.context_lens))
    except handled_errors() as e:
        return report(e)
    print(args.out)
    return 0


def _check_loadable(buckets, max_batch_size: int, max_seq_len: int) -> None:
    """The buckets zoo.load(compiled=DIR) will accept for this export (it sizes the KV cache from it):
    checked before anything compiles, naming the flags to change."""
    flags = {"batch_sizes": ("--batch-sizes", "--max-batch-size", max_batch_size),
             "prefill_lens": ("--prefill-lens", "--max-seq-len", max_seq_len),
             "context_lens": ("--context-lens", "--max-seq-len", max_seq_len)}
    try:
        buckets.validate(max_batch_size, max_seq_len)
    except ValueError as e:
        field = str(e).split()[0].removeprefix("buckets.")
        flag, limit_flag, limit = flags.get(field, ("the buckets", "the cache size", "?"))
        raise ValueError(f"{flag} {list(getattr(buckets, field, []))} cannot be loaded back: zoo.load(compiled=DIR) "
                         f"needs them to end at {limit_flag} ({limit}) ({e}); nothing was exported") from None


if __name__ == "__main__":
    sys.exit(main())
