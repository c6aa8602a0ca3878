"""Command line of zoo.pd.

    python -m zoo.pd --role prompt  --listen 127.0.0.1:5555 [--model-path DIR] [--compiled]
    python -m zoo.pd --role decoder --peer 127.0.0.1:5555 [--max-batch-size N] --prompt "Beautiful is" ...
    python -m zoo.pd --role decoder --peer 127.0.0.1:5555 --stdin     # one prompt per line -> JSON events
    python -m zoo.pd demo                                              # both roles on loopback, a few prompts
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING

from zoo.entrypoints.options import ArgumentParser, add_model_options, handled_errors, report, settings_from_args
from zoo.errors import RequestError
from zoo.log import log
from zoo.pd.protocol import LLMException
from zoo.pd.request import LLMReq, LLMRole

# zoo.api, zoo.pd.api and torch are imported inside the functions that run a model: options are
# checked before any of them loads.
if TYPE_CHECKING:
    from zoo.pd.api import LLMEngine

DEMO_PROMPTS = ["Beautiful is", "Explicit is", "Simple is", "Flat is"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m zoo.pd", description=(
        "Separated prefill/decode: a prompt process prefills and holds each request's KV; a decoder "
        "pulls it into a batch slot of its KV cache and decodes. `python -m zoo.pd demo` runs both on "
        "loopback."))
    p.add_argument("--role", choices=["prompt", "decoder"], required=True)
    p.add_argument("--cluster-id", type=int, help="this process's cluster id (default: prompt 0, decoder 1)")
    add_model_options(p, exclude=("tp", "use_mc2", "tp_timeout_s"),
                      defaults={"model_path": "(here: the embedded tiny Llama); both roles must load the same model "
                                              "and dtype",
                                "threads": "With both roles on one host, split the cores between them."})
    p.add_argument("--sync-kv-timeout", type=float, default=10.0, help="seconds for one KV pull (default 10)")
    p.add_argument("--link-timeout", type=float, default=10.0, help="seconds to link (default 10)")
    g = p.add_argument_group("prompt role")
    g.add_argument("--listen", metavar="HOST:PORT", help="control address (port 0 = any free port)")
    g.add_argument("--store-port", type=int, default=0, help="rendezvous TCPStore port (default: any free port)")
    g.add_argument("--kv-ttl", type=float, default=60.0, help="seconds an unpulled KV is held (default 60)")
    g.add_argument("--ready-file", help="write {address, store_port, pid} as JSON here once listening")
    g = p.add_argument_group("decoder role")
    g.add_argument("--peer", action="append", default=[], metavar="[ID=]HOST:PORT",
                   help="a prompt process to link to (repeatable; ids default to 0, 1, ...)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable): streamed to stdout in order")
    g.add_argument("--stdin", action="store_true", help="read prompts from stdin, one per line (or a JSON "
                   "object with LLMReq fields), and print one JSON line per stream event")
    g.add_argument("--json", action="store_true", help="with --prompt: one JSON object per result")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS / stop before this many new tokens")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--logit-bias", action="append", type=_logit_bias, metavar="TOKEN_ID=BIAS",
                   help="add BIAS to the logit of TOKEN_ID (repeatable)")
    g.add_argument("--logprobs", type=int, metavar="N",
                   help="with --json / --stdin: each new token's logprob and its N most likely alternatives")
    g.add_argument("--prefill-timeout", type=float, default=120.0,
                   help="seconds a prefill may take on the prompt side (default 120)")
    return p


def _logit_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if sep:
            return int(token), float(bias)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, e.g. 42=-100, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        return demo(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args, verbose=True)
        from zoo.api import load_from

        model = load_from(settings)
    except handled_errors() as e:
        return report(e)
    try:
        return run_prompt(model, args) if args.role == "prompt" else run_decoder(model, args)
    except (LLMException, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# ---- prompt role ------------------------------------------------------------------------------
def run_prompt(model, args) -> int:
    if not args.listen:
        raise SystemExit("--role prompt needs --listen HOST:PORT")
    cluster_id = 0 if args.cluster_id is None else args.cluster_id
    from zoo.pd.api import LLMEngine

    engine = LLMEngine(LLMRole.PROMPT, cluster_id, model)
    engine.init({"listen": args.listen, "store_port": args.store_port, "kv_ttl": args.kv_ttl,
                 "sync_kv_timeout": args.sync_kv_timeout, "link_timeout": args.link_timeout})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log(f"prompt cluster {cluster_id} listening on {engine.address} (KV rendezvous store on port "
        f"{engine.store_port}, KV TTL {args.kv_ttl:g} s, {engine.kv_backend})", source="zoo.pd")
    if args.ready_file:  # atomically: a reader never sees half a file
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"address": engine.address, "store_port": engine.store_port, "pid": os.getpid(),
                       "cluster_id": cluster_id}, f)
        os.replace(tmp, args.ready_file)
    while not stop.wait(0.5):
        pass
    log(f"prompt cluster {cluster_id} stopping", source="zoo.pd")
    engine.finalize()
    return 0


# ---- decoder role -----------------------------------------------------------------------------
def _parse_peers(peers: list[str]) -> dict[int, str]:
    out = {}
    for i, text in enumerate(peers):
        cid, sep, address = text.partition("=")
        if not sep:
            cid, address = str(i), text
        if not cid.isdigit():
            raise SystemExit(f"--peer expects [ID=]HOST:PORT, got {text!r}")
        out[int(cid)] = address
    return out


def make_decoder(model, args) -> LLMEngine:
    peers = _parse_peers(args.peer)
    if not peers:
        raise SystemExit("--role decoder needs at least one --peer HOST:PORT")
    from zoo.pd.api import LLMEngine

    engine = LLMEngine(LLMRole.DECODER, 1 if args.cluster_id is None else args.cluster_id, model)
    engine.init({"sync_kv_timeout": args.sync_kv_timeout, "link_timeout": args.link_timeout,
                 "prefill_timeout": args.prefill_timeout})
    for cid, address in peers.items():
        engine.link(cid, address)
    return engine


def run_decoder(model, args) -> int:
    engine = make_decoder(model, args)
    try:
        if args.stdin:
            return _serve_stdin(engine, args)
        prompts = args.prompt or ["Beautiful is"]
        reqs = [LLMReq(i, p, **_sampling(args)) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        results = _run_json(engine, reqs) if args.json else stream_in_order(engine, reqs, sys.stdout)
        _summary(engine, results, time.perf_counter() - start)
        return 1 if any(r.finish_reason == "error" for r in results) else 0
    finally:
        engine.finalize()


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()), min_p=args.min_p,
                min_tokens=args.min_tokens, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                logit_bias=dict(args.logit_bias or ()), logprobs=args.logprobs)


def _logprobs_json(logprobs) -> list | None:
    """TokenLogprobs -> [{token_id, logprob, top: [[token_id, logprob], ...]}] (None stays None)."""
    if logprobs is None:
        return None
    return [{"token_id": t.token_id, "logprob": t.logprob, "top": [list(p) for p in t.top]} for t in logprobs]


def _run_json(engine: LLMEngine, reqs: list[LLMReq]):
    results = engine.generate(reqs)
    for req, r in zip(reqs, results):
        print(json.dumps({"req_id": req.req_id, "prompt": r.prompt, "text": r.text, "token_ids": r.token_ids,
                          "finish_reason": r.finish_reason, "error": r.error, "prompt_tokens": r.prompt_tokens,
                          "ttft_ms": round(r.ttft_ms, 3),
                          **({"logprobs": _logprobs_json(r.logprobs)} if r.logprobs is not None else {})}),
              flush=True)
    return results


def stream_in_order(engine: LLMEngine, reqs: list[LLMReq], out) -> list:
    """All requests run together; the output shows them one after the other, the current one live."""
    index = {r.req_id: i for i, r in enumerate(reqs)}
    pending = [[] for _ in reqs]
    done = [False] * len(reqs)
    shown = 0

    def start(i: int) -> None:
        out.write(f"--- [{reqs[i].req_id}] {reqs[i].prompt}" + "".join(pending[i]))

    start(0)
    stream = engine.stream(reqs)
    for event in stream:
        i = index[event.index]
        (out.write if i == shown else pending[i].append)(event.text)
        if event.finish_reason is not None:
            done[i] = True
            if event.finish_reason == "error":
                err = stream.requests[i].error
                (out.write if i == shown else pending[i].append)(f"\n[error] {err}")
        while shown < len(reqs) and done[shown]:
            out.write("\n")
            shown += 1
            if shown < len(reqs):
                start(shown)
        out.flush()
    return stream.results


def _summary(engine: LLMEngine, results, wall: float) -> None:
    ok = [r for r in results if r.finish_reason != "error"]
    new_tokens = sum(len(r.token_ids) for r in results)
    ttft = sum(r.ttft_ms for r in ok) / len(ok) if ok else float("nan")
    moved, secs, n = engine.kv_bytes_received, engine.kv_transfer_seconds, engine.kv_transfers
    per_pull = f", {secs / n * 1e3:.1f} ms per pull" if n else ""
    rate = f", {moved / secs / 1e9:.2f} GB/s" if secs and moved >= 2**20 else ""  # tiny KVs: latency, not rate
    log(f"{len(results)} request(s), {len(results) - len(ok)} failed, {new_tokens} new tokens in {wall:.2f} s | "
         f"mean time to first token {ttft:.1f} ms (waiting for a free slot included) | KV pulled: {n} "
         f"transfer(s), {moved} bytes{per_pull}{rate}", source="zoo.pd")


def _serve_stdin(engine: LLMEngine, args) -> int:
    """Prompts arrive on stdin while others decode; each stream event is printed as a JSON line."""
    import queue

    incoming: queue.Queue = queue.Queue()

    def reader():
        for n, line in enumerate(sys.stdin):
            line = line.rstrip("\n")
            if line.strip():
                incoming.put((n, line))
        incoming.put(None)

    threading.Thread(target=reader, name="zoo-pd-stdin", daemon=True).start()
    active, eof, next_id, failed = [], False, 0, 0
    while not (eof and not active):
        while True:
            try:
                item = incoming.get_nowait()
            except queue.Empty:
                break
            if item is None:
                eof = True
                continue
            try:
                req = _stdin_request(item[1], next_id, args)
                next_id = max(next_id, req.req_id) + 1
                active += engine.submit([req])
            except (LLMException, RequestError, ValueError, TypeError) as e:
                failed += 1
                print(json.dumps({"line": item[0] + 1, "error": str(e)}), flush=True)
        for req in active:
            while req.events:
                ev = req.events.popleft()
                print(json.dumps({"req_id": ev.index, "text": ev.text, "token_ids": ev.token_ids,
                                  "finish_reason": ev.finish_reason,
                                  "error": req.error if ev.finish_reason == "error" else None,
                                  **({"logprobs": _logprobs_json(ev.logprobs)} if ev.logprobs is not None else {})}),
                      flush=True)
                failed += ev.finish_reason == "error"
        active = [r for r in active if not (r.finished and not r.events)]
        engine.poll(0.02)
    return 1 if failed else 0


def _stdin_request(line: str, default_id: int, args) -> LLMReq:
    if line.lstrip().startswith("{"):
        fields = json.loads(line)  # JSON only: data from outside is never unpickled / evaluated
        if not isinstance(fields, dict):
            raise ValueError("a JSON line must be an object with LLMReq fields")
        fields.setdefault("req_id", default_id)
        return LLMReq(**{**_sampling(args), **fields})
    return LLMReq(default_id, line, **_sampling(args))


# ---- demo -------------------------------------------------------------------------------------
def demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo.pd demo", description=(
        "Start a prompt process on loopback, link a decoder with fewer slots than prompts, stream a few "
        "prompts through it, and check the tokens against a colocated run."))
    p.add_argument("--model-path", help="default: the embedded tiny Llama")
    p.add_argument("--compiled", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-batch-size", type=int, default=2, help="decoder slots (default 2)")
    p.add_argument("--prompt", action="append")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: the two processes share this host's cores)")
    args = p.parse_args(argv)
    import torch

    from zoo.api import load
    from zoo.models import embedded_model_path
    from zoo.pd.api import LLMEngine

    torch.set_num_threads(args.threads)
    prompts = args.prompt or DEMO_PROMPTS
    model_path = args.model_path or embedded_model_path("llama")
    extra = ["--compiled"] if args.compiled else []
    with tempfile.TemporaryDirectory(prefix="zoo-pd-demo-") as tmp:
        ready = os.path.join(tmp, "ready.json")
        prompt_proc = subprocess.Popen([sys.executable, "-m", "zoo.pd", "--role", "prompt", "--listen", "127.0.0.1:0",
                                        "--ready-file", ready, "--model-path", model_path,
                                        "--threads", str(args.threads), *extra])
        try:
            info = wait_ready(ready, prompt_proc, timeout=300)
            model = load(model_path, compiled=args.compiled, max_batch_size=args.max_batch_size, verbose=True)
            decoder = LLMEngine(LLMRole.DECODER, 1, model)
            decoder.init({"sync_kv_timeout": 10.0})
            decoder.link(0, info["address"])
            reqs = [LLMReq(i, text, max_new_tokens=args.max_new_tokens) for i, text in enumerate(prompts)]
            log(f"decoder: {len(reqs)} prompts, {args.max_batch_size} batch slots; prefill in process "
                 f"{info['pid']}, decode here (process {os.getpid()})", source="zoo.pd")
            start = time.perf_counter()
            results = stream_in_order(decoder, reqs, sys.stdout)
            _summary(decoder, results, time.perf_counter() - start)
            decoder.finalize()
            colocated = model.generate(prompts, max_new_tokens=args.max_new_tokens)
            same = sum(a.token_ids == b.token_ids for a, b in zip(results, colocated))
            print(f"tokens identical to a colocated run: {same}/{len(prompts)}")
            return 0 if same == len(prompts) else 1
        finally:
            prompt_proc.send_signal(signal.SIGTERM)
            try:
                prompt_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prompt_proc.kill()
                prompt_proc.wait()


def wait_ready(path: str, proc: subprocess.Popen, timeout: float) -> dict:
    """Wait (bounded) for a prompt process's --ready-file; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        if proc.poll() is not None:
            raise RuntimeError(f"the prompt process exited with code {proc.returncode} before it was ready")
        time.sleep(0.05)
    raise TimeoutError(f"the prompt process was not ready within {timeout:g} s")
