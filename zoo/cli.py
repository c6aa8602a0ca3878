"""The command line shared by `python -m zoo.llama.infer` and `python -m zoo.qwen.infer`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from zoo.api import embedded_model_path, load
from zoo.compile_config import CompileConfigError
from zoo.config import ConfigError
from zoo.device import DeviceError
from zoo.engine import RequestError
from zoo.loader import CheckpointError
from zoo.parallel import TPWorkerError, init_rank, torchrun_env

DEFAULT_PROMPT = "Beautiful is"
_PRINT_SUMMARY = True  # False on torchrun ranks other than 0


def build_parser(family: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m zoo.{'qwen' if family == 'qwen2' else family}.infer",
        description=f"Generate text with zoo's hand-adapted {family} model (eager or compiled graphs).")
    p.add_argument("--model-path", help=f"Hugging Face checkpoint folder (default: the embedded tiny {family})")
    p.add_argument("--prompt", action="append", help=f"prompt text; repeat for a batch (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compiled", nargs="?", const=True, default=False, metavar="EXPORT_DIR",
                   help="run prefill/decode as compiled graphs: torch.compile'd (cached on disk), or, given "
                        "EXPORT_DIR, the AOTInductor graphs `python -m zoo.export` wrote there")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] | npu[:N]")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--max-batch-size", type=int, help="KV-cache slots (default 8, or the export's)")
    p.add_argument("--max-seq-len", type=int, help="KV-cache length (default: min(max_position_embeddings, 2048))")
    p.add_argument("--compile-config", metavar="FILE",
                   help="compile config TOML (default: zoo/compile_configs/<family>.<device>.toml)")
    p.add_argument("--cache-dir", help="graph cache root (default: ~/.cache/zoo or $ZOO_CACHE_DIR)")
    p.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inductor option, e.g. cpp_wrapper=false (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel size: spawn N ranks here (under torchrun, its WORLD_SIZE is used)")
    p.add_argument("--use-mc2", action="store_true",
                   help="overlap each row-parallel matmul with its all-reduce (chunked; npu_mm_all_reduce_base on npu)")
    return p


def _parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--inductor-option expects KEY=VALUE, got {text!r}")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def main(family: str, argv: list[str] | None = None) -> int:
    args = build_parser(family).parse_args(argv)
    prompts = args.prompt or [DEFAULT_PROMPT]
    launched = torchrun_env()
    rank = 0
    try:
        tp = args.tp
        if launched is not None and launched[1] > 1:  # torchrun: this process is one rank
            rank, world_size = launched
            if args.tp not in (1, world_size):
                raise ValueError(f"--tp {args.tp} does not match torchrun's WORLD_SIZE {world_size}")
            tp = _torchrun_rank(rank, world_size, args)
        if args.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {args.tp}")
        model = load(args.model_path or embedded_model_path(family), device=args.device, dtype=args.dtype,
                     compiled=args.compiled, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                     compile_config=args.compile_config, cache_dir=args.cache_dir,
                     inductor_options=dict(_parse_option(o) for o in args.inductor_option), verbose=rank == 0,
                     tp=tp, use_mc2=args.use_mc2)
        if launched is not None and launched[1] > 1:
            _same_default_seed(model)
            model.engine.runner.log_compiles = rank == 0
    except (FileNotFoundError, ConfigError, CompileConfigError, CheckpointError, DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TPWorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if rank != 0:  # under torchrun only rank 0 prints; the others run the same steps in lockstep
        sys.stdout = open(os.devnull, "w")
        global _PRINT_SUMMARY
        _PRINT_SUMMARY = False
    try:
        return _generate(model, args, prompts)
    except TPWorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if hasattr(model, "close"):
            model.close()


def _torchrun_rank(rank: int, world_size: int, args):
    from zoo.device import resolve_device

    return init_rank(rank, world_size, resolve_device(args.device), "env://", use_mc2=args.use_mc2)


def _same_default_seed(model) -> None:
    """torchrun ranks: the engine's default generator gets rank 0's seed, so sampling agrees."""
    import torch
    import torch.distributed as dist

    seed = [int(torch.randint(0, 2**62, ()).item())]
    dist.broadcast_object_list(seed, src=0)
    model.engine.seed_default_generator(seed[0])


def _generate(model, args, prompts) -> int:
    if args.compiled and model.tokenizer is not None:
        _warm_up_for(model, prompts)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=args.stop)
    try:
        if args.json:
            _run_json(model, prompts, sampling)
        else:
            _run_streaming(model, prompts, sampling)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _warm_up_for(model, prompts) -> None:
    """Compile the graphs these prompts start with, so the timings below exclude compiling
    (a bucket first reached later, e.g. a smaller decode batch, still compiles on first use)."""
    buckets = model.buckets
    longest = max(len(model.tokenizer.encode(p)) for p in prompts)
    if longest >= model.max_seq_len:
        return  # generate() reports the too-long prompt
    model.warmup(batch_sizes=[buckets.batch_for(min(len(prompts), buckets.batch_sizes[-1]))], prompt_lens=[longest])


def _run_json(model, prompts, sampling) -> None:
    for r in model.generate(prompts, **sampling):
        print(json.dumps({"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids,
                          "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                          "ttft_ms": round(r.ttft_ms, 3),
                          "tpot_ms": None if r.tpot_ms is None else round(r.tpot_ms, 3)}), flush=True)


def _run_streaming(model, prompts, sampling) -> None:
    """Prompts run as one batch; the output shows them in order, the current one live."""
    pending = [[] for _ in prompts]  # text of prompts not yet on screen
    done = [False] * len(prompts)
    shown = 0  # index of the prompt being streamed live

    def start_prompt(i: int) -> None:
        sys.stdout.write((f"\n--- [{i}] " if len(prompts) > 1 else "") + prompts[i] + "".join(pending[i]))

    start = time.perf_counter()
    start_prompt(0)
    stream = model.stream(prompts, **sampling)
    for event in stream:
        if event.index == shown:
            sys.stdout.write(event.text)
        else:
            pending[event.index].append(event.text)
        done[event.index] = done[event.index] or event.finish_reason is not None
        while shown < len(prompts) and done[shown]:  # move on to the next prompt, in order
            shown += 1
            if shown < len(prompts):
                start_prompt(shown)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _summary(model, time.perf_counter() - start, stream.results)


def _summary(model, wall: float, results) -> None:
    if not _PRINT_SUMMARY:
        return
    new_tokens = sum(len(r.token_ids) for r in results)
    ttft = sum(r.ttft_ms for r in results) / len(results)
    tpots = [r.tpot_ms for r in results if r.tpot_ms is not None]
    tpot = f"{sum(tpots) / len(tpots):.2f} ms" if tpots else "n/a"
    print(f"[zoo] {len(results)} prompt(s), {new_tokens} new tokens in {wall:.2f} s | time to first token "
          f"{ttft:.1f} ms | time per output token {tpot} | {new_tokens / wall:.1f} tok/s | "
          f"compile/warm-up {model.compile_seconds:.1f} s", file=sys.stderr)
