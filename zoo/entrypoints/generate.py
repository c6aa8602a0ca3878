"""`python -m zoo.llama.infer` / `python -m zoo.qwen.infer`: generate (or chat) from the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from zoo.entrypoints.options import (ArgumentParser, add_model_options, check_before_load, handled_errors,
                                     positive_int, report, settings_from_args)
from zoo.errors import ChatTemplateError, RequestError, TPWorkerError

DEFAULT_PROMPT = "Beautiful is"
_PRINT_SUMMARY = True  # False on torchrun ranks other than 0
# the command each embedded family is the default of
COMMANDS = {"llama": "python -m zoo.llama.infer", "qwen2": "python -m zoo.qwen.infer"}


def load_from(settings):
    """zoo.api.load_from, imported only once the options have passed their checks: torch (seconds to
    import) is not loaded to refuse a typo."""
    from zoo.api import load_from as load

    return load(settings)


def build_parser(family: str) -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=COMMANDS.get(family, "python -m zoo.entrypoints.generate"),
        description=f"Generate text with zoo's hand-adapted {family} model (eager or compiled graphs).")
    add_model_options(p, defaults={"model_path": f"(here: the embedded tiny {family})"})
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", help=f"prompt text; repeat for a batch (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming")
    g.add_argument("--chat", action="store_true",
                   help="chat: each --prompt is a user message, formatted with the tokenizer's chat template, and "
                        "the reply stops at the end-of-turn token. Without --prompt: an interactive conversation "
                        "when stdin is a terminal, else all of stdin is one user message")
    g.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the conversation")
    return p


def main(family: str, argv: list[str] | None = None) -> int:
    parser = build_parser(family)
    args = parser.parse_args(argv)
    if args.system is not None and not args.chat:
        parser.error("--system is a chat message: it needs --chat")  # exits with code 2
    launched = _torchrun_env()
    under_torchrun = launched is not None and launched[1] > 1
    rank = 0
    try:
        prompts = _prompts(args, under_torchrun)
        settings = settings_from_args(args, verbose=True)  # refuses bad options before torch is imported
        if settings.model_path is None:
            from zoo.models import embedded_model_path

            settings = check_before_load(settings.replace(model_path=embedded_model_path(family)))
        if under_torchrun:  # this process is one rank of torchrun's group
            rank, world_size = launched
            if args.tp not in (None, 1, world_size):
                raise ValueError(f"--tp {args.tp} does not match torchrun's WORLD_SIZE {world_size}")
            settings = settings.replace(tp=_torchrun_rank(rank, world_size, args))
        model = load_from(settings)
        if under_torchrun:
            _same_default_seed(model)
    except handled_errors() as e:
        return report(e)
    if rank != 0:  # under torchrun only rank 0 prints; the others run the same steps in lockstep
        sys.stdout = open(os.devnull, "w")
        global _PRINT_SUMMARY
        _PRINT_SUMMARY = False
    try:
        problem = _chat_problem(model) if args.chat else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if prompts is None:
            return _interactive_chat(model, args)
        return _generate(model, args, prompts)
    except TPWorkerError as e:
        return report(e)
    finally:
        model.close()


def _prompts(args, under_torchrun: bool) -> list[str] | None:
    """The prompts (user messages with --chat) to run as one batch; None = an interactive chat."""
    if args.prompt:
        return args.prompt
    if not args.chat:
        return [DEFAULT_PROMPT]
    if under_torchrun:  # every rank would read the same stdin, and rank 0's loop cannot lead the others
        raise ValueError("under torchrun, --chat needs --prompt (no interactive chat, no message from stdin)")
    if sys.stdin.isatty():
        return None
    # Piped input (`echo hi | ... --chat`): all of it is one user message, so it may span lines.
    message = sys.stdin.read().strip()
    if not message:
        raise ValueError("--chat without --prompt read an empty message from stdin")
    return [message]


def _chat_problem(model) -> str | None:
    """Why this model cannot chat, checked once before anything runs; None when it can."""
    if model.tokenizer is None:
        return f"--chat needs a tokenizer with a chat template, but {model.path!r} has no tokenizer files"
    if not model.tokenizer.has_chat_template:
        return (f"--chat needs a chat template, but the tokenizer in {model.path!r} has none (no 'chat_template' "
                "in tokenizer_config.json, no chat_template.jinja); run without --chat")
    return None


def _conversation(system: str | None, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a conversation, ending with the assistant's header. A template that rejects the
    messages (e.g. one without a system role) is a usage error, not a crash."""
    try:
        return tokenizer.apply_chat_template(messages)
    except ChatTemplateError:
        raise
    except Exception as e:  # jinja2 raises its own errors from inside the template
        raise ValueError(f"the chat template could not format the conversation: {e}") from None


def _with_chat_stops(model, sampling: dict) -> dict:
    """The reply ends at an end-of-turn token (<|eot_id|>, <|im_end|>), which is often not the EOS."""
    stops = set(sampling.get("stop_token_ids") or ()) | set(model.tokenizer.chat_stop_token_ids)
    return {**sampling, "stop_token_ids": sorted(stops)}


def _torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun (RANK / WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _torchrun_rank(rank: int, world_size: int, args):
    from zoo.device import resolve_device
    from zoo.distributed.comm import init_rank

    return init_rank(rank, world_size, resolve_device(args.device), "env://", args.tp_timeout_s, args.use_mc2)


def _same_default_seed(model) -> None:
    """torchrun ranks: the engine's default generator gets rank 0's seed, so sampling agrees."""
    import torch
    import torch.distributed as dist

    seed = [int(torch.randint(0, 2**62, ()).item())]
    dist.broadcast_object_list(seed, src=0)
    model.seed_sampling(seed[0])


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def _generate(model, args, prompts) -> int:
    sampling = _sampling(args)
    inputs = prompts  # what the model gets: the prompt texts, or with --chat the formatted ids
    conversations = None
    if args.chat:
        conversations = [_conversation(args.system, p) for p in prompts]
        try:
            inputs = [_chat_ids(model.tokenizer, c) for c in conversations]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sampling = _with_chat_stops(model, sampling)
    if args.compiled and model.tokenizer is not None:
        _warm_up_for(model, inputs, args.max_new_tokens)
    try:
        if args.json:
            _run_json(model, inputs, prompts, conversations, sampling)
        else:
            _run_streaming(model, inputs, _heads(prompts, args.chat), sampling)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _heads(prompts: list[str], chat: bool) -> list[str]:
    """What the streamed output shows before each prompt's text. A plain prompt is shown, since the text
    continues it; a chat shows only the reply (the template's markup is not for reading), under its
    user message when there are several."""
    if len(prompts) == 1:
        return [""] if chat else prompts
    return [f"\n--- [{i}] {p}" + ("\n" if chat else "") for i, p in enumerate(prompts)]


def _warm_up_for(model, inputs, max_new_tokens: int) -> None:
    """Compile the graphs these prompts (texts or token ids) start with, and the decode context
    buckets they can reach, so the timings below exclude compiling (a bucket first reached later,
    e.g. a smaller decode batch, still compiles on first use)."""
    buckets = model.buckets
    longest = max(len(p) if isinstance(p, list) else len(model.tokenizer.encode(p)) for p in inputs)
    if longest >= model.max_seq_len:
        return  # generate() reports the too-long prompt
    reach = min(longest + max_new_tokens, model.max_seq_len)
    contexts = [c for c in buckets.context_lens if c <= buckets.context_len_for(reach)] or None
    model.warmup(batch_sizes=[buckets.batch_for(min(len(inputs), buckets.batch_sizes[-1]))], prompt_lens=[longest],
                 context_lens=contexts)


def _run_json(model, inputs, prompts, conversations, sampling) -> None:
    """One object per prompt; with --chat, "prompt" is the user message and "messages" the conversation."""
    for i, r in enumerate(model.generate(inputs, **sampling)):
        out = {"prompt": prompts[i], "text": r.text, "token_ids": r.token_ids,
               "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
               "ttft_ms": round(r.ttft_ms, 3), "tpot_ms": None if r.tpot_ms is None else round(r.tpot_ms, 3)}
        if conversations is not None:
            out["messages"] = conversations[i]
        print(json.dumps(out), flush=True)


def _run_streaming(model, inputs, heads, sampling) -> None:
    """Inputs run as one batch; the output shows them in order, the current one live, each after its
    head (the prompt itself, which the text continues, or a header)."""
    pending = [[] for _ in inputs]  # text of prompts not yet on screen
    done = [False] * len(inputs)
    shown = 0  # index of the prompt being streamed live

    def start_prompt(i: int) -> None:
        sys.stdout.write(heads[i] + "".join(pending[i]))

    start = time.perf_counter()
    start_prompt(0)
    stream = model.stream(inputs, **sampling)
    for event in stream:
        if event.index == shown:
            sys.stdout.write(event.text)
        else:
            pending[event.index].append(event.text)
        done[event.index] = done[event.index] or event.finish_reason is not None
        while shown < len(inputs) and done[shown]:  # move on to the next prompt, in order
            shown += 1
            if shown < len(inputs):
                start_prompt(shown)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _summary(model, time.perf_counter() - start, stream.results)


# ---- interactive chat ----------------------------------------------------------------------------
USER_PROMPT = "you> "
ASSISTANT_PROMPT = "assistant> "
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def _interactive_chat(model, args) -> int:
    """Read a user line, stream the reply, repeat; the conversation so far goes with every turn."""
    _enable_line_editing()
    sampling = _with_chat_stops(model, _sampling(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)  # system, then user / assistant turns
    print(f"[zoo] chat: {RESET_COMMAND} starts over, {' or '.join(EXIT_COMMANDS)} or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input(USER_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()  # leave the shell prompt on a line of its own
            return 0
        if line in EXIT_COMMANDS:
            return 0
        if line == RESET_COMMAND:
            history = list(system)
            print("[zoo] the conversation starts over", file=sys.stderr)
            continue
        if not line:
            continue
        try:
            messages, ids = _fit_conversation(model, history + [{"role": "user", "content": line}], len(system),
                                              args.max_new_tokens)
        except ValueError as e:  # the message alone is too long, or the template rejects it
            print(f"error: {e}", file=sys.stderr)
            continue
        reply = _stream_reply(model, ids, sampling)
        if reply is not None:  # a failed or interrupted turn is left out of the conversation
            history = messages + [{"role": "assistant", "content": reply}]


def _enable_line_editing() -> None:
    """Arrow keys and history for input() at a terminal; not available everywhere (Windows)."""
    try:
        import readline  # noqa: F401  (importing it is what hooks it into input())
    except ImportError:
        pass


def _fit_conversation(model, messages: list[dict], keep: int, max_new_tokens: int) -> tuple[list[dict], list[int]]:
    """(messages, prompt ids) with the oldest user/assistant turns dropped until the prompt leaves room for
    max_new_tokens in max_seq_len; the first `keep` messages (the system message) always stay. When only
    the newest message is left, it runs if at least one new token fits (the reply may end early)."""
    limit, dropped = model.max_seq_len, 0
    while True:
        ids = _chat_ids(model.tokenizer, messages)
        if len(ids) + max_new_tokens <= limit or len(messages) - keep <= 1:
            break
        messages = messages[:keep] + messages[keep + 2:]  # one turn: a user message and its reply
        dropped += 1
    if len(ids) >= limit:
        raise ValueError(f"this message makes a prompt of {len(ids)} tokens, but max_seq_len is {limit}; "
                         "send a shorter one (or raise --max-seq-len)")
    if dropped:
        print(f"[zoo] the conversation no longer fits in max_seq_len={limit}: dropped the oldest "
              f"{dropped} turn(s)", file=sys.stderr)
    return messages, ids


def _stream_reply(model, ids: list[int], sampling: dict) -> str | None:
    """Stream one reply to stdout; its text, or None when it failed or Ctrl-C cut it short."""
    sys.stdout.write(ASSISTANT_PROMPT)
    sys.stdout.flush()
    stream = model.stream(ids, **sampling)
    try:
        for event in stream:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()  # aborts the request, which frees its KV slot
        print("\n[zoo] interrupted: this turn is left out of the conversation", file=sys.stderr)
        return None
    sys.stdout.write("\n")
    result = stream.results[0]
    if result.finish_reason == "error":
        print(f"error: generation failed: {result.error}", file=sys.stderr)
        return None
    return result.text


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
