"""The command line shared by `python -m zoo.llama.infer` and `python -m zoo.qwen.infer`."""
from __future__ import annotations

import argparse
import json
import sys
import time

from zoo.api import embedded_model_path, load
from zoo.compile_config import CompileConfigError
from zoo.config import ConfigError
from zoo.device import DeviceError
from zoo.engine import RequestError
from zoo.loader import CheckpointError

DEFAULT_PROMPT = "Beautiful is"


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
    try:
        model = load(args.model_path or embedded_model_path(family), device=args.device, dtype=args.dtype,
                     compiled=args.compiled, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                     compile_config=args.compile_config, cache_dir=args.cache_dir,
                     inductor_options=dict(_parse_option(o) for o in args.inductor_option), verbose=True)
    except (FileNotFoundError, ConfigError, CompileConfigError, CheckpointError, DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    buckets = model.engine.runner.buckets
    longest = max(len(model.tokenizer.encode(p)) for p in prompts)
    if longest >= model.engine.max_seq_len:
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
    new_tokens = sum(len(r.token_ids) for r in results)
    ttft = sum(r.ttft_ms for r in results) / len(results)
    tpots = [r.tpot_ms for r in results if r.tpot_ms is not None]
    tpot = f"{sum(tpots) / len(tpots):.2f} ms" if tpots else "n/a"
    print(f"[zoo] {len(results)} prompt(s), {new_tokens} new tokens in {wall:.2f} s | time to first token "
          f"{ttft:.1f} ms | time per output token {tpot} | {new_tokens / wall:.1f} tok/s | "
          f"compile/warm-up {model.compile_seconds:.1f} s", file=sys.stderr)
