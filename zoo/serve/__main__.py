"""python -m zoo.serve [--model-path DIR] [--compiled [EXPORT_DIR]] [--host H] [--port P] ... — see --help."""
from __future__ import annotations

import argparse
import logging
import socket
import sys

from zoo.entrypoints.options import ArgumentParser, add_model_options, handled_errors, report, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m zoo.serve",
                                description="OpenAI-compatible HTTP server (completions, chat completions, "
                                            "streaming, /metrics) on zoo's continuous-batching engine.")
    m = add_model_options(p, defaults={"model_path": "(here: the embedded tiny Llama)"})
    m.add_argument("--warmup", nargs="?", const="all", metavar="PROMPT_LENS",
                   help="build the graphs before listening: every bucket, or only the prefill buckets of these "
                        "comma-separated prompt lengths (all batch sizes), e.g. --warmup 32,128. Without it, "
                        "--compiled builds every bucket in the background and runs a bucket eagerly until its graph "
                        "is ready (with --tp: each bucket compiles on first use)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one; the line '[zoo] listening on "
                                                          "http://HOST:PORT' on stderr tells which)")
    s.add_argument("--served-model-name", help="the `model` name clients use (default: the folder's name)")
    s.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use instead of the tokenizer's")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    s.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection whose request headers are not complete this long after it opened or "
                        "after its last response (default 10)")
    s.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="answer 408 when a request body is not received in full this long after its headers "
                        "(default 30)")
    s.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting for a KV slot beyond this get 503 (default 1024)")
    s.add_argument("--pd-peer", action="append", default=[], metavar="[ID=]HOST:PORT",
                   help="separated prefill/decode: prefill on this prompt process (`python -m zoo.pd --role prompt "
                        "--listen HOST:PORT --cluster-id ID`, same model and dtype) and decode here; repeatable "
                        "(ids default to 0, 1, ... in order), requests go round robin over the peers that are up")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--access-log", action="store_true", help="log every HTTP request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args, verbose=True)  # bad options are refused before torch loads
    except handled_errors() as e:
        return report(e)
    if settings.compiled is True and not args.warmup and settings.tp_size == 1:
        # answer from the first second: buckets run eagerly until their graph is built in the background
        settings = settings.replace(compile_in_background=True)
    try:
        pd_peers = _pd_peers(args.pd_peer, settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import prometheus_client
    import uvicorn  # imported here so that --help works without the serve extra

    prometheus_client.disable_created_metrics()  # no *_created series next to every counter

    from zoo.serve.app import ServerSettings, create_app, default_model_name
    from zoo.serve.connections import with_header_timeout

    logging.basicConfig(level=args.log_level.upper(), format="[zoo] %(levelname)s %(name)s: %(message)s")
    chat_template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        except OSError as e:
            print(f"error: cannot read --chat-template: {e}", file=sys.stderr)
            return 2
    # Bind first: a busy port fails before a long model load, and --port 0 gets its port. Connections are
    # refused until uvicorn listens, after the load. proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY
    # only on such sockets, and without it a keep-alive client waits ~40 ms (Nagle + delayed ACK) per response.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    try:
        from zoo.api import load_from

        # --threads applies here, before the engine thread starts: it inherits the setting
        model = load_from(settings)
        if args.warmup:
            lens = None if args.warmup == "all" else [int(x) for x in args.warmup.split(",") if x]
            model.warmup(prompt_lens=lens)
    except handled_errors() as e:
        sock.close()
        return report(e)
    if pd_peers:  # this process decodes; the peers prefill (zoo.serve.pd_engine)
        import atexit

        from zoo.pd.protocol import LLMException
        from zoo.serve.pd_engine import link_prompt_peers

        try:
            model = link_prompt_peers(model, pd_peers)
        except LLMException as e:
            sock.close()
            print(f"error: {e}", file=sys.stderr)
            return 1
        atexit.register(model.close)  # unlink (a KV process group left open would abort the exit)
        print(f"[zoo] prefilling on prompt processes {model.peers}", file=sys.stderr)
    server_settings = ServerSettings(served_model_name=args.served_model_name or default_model_name(model),
                              max_body_bytes=args.max_body_bytes, max_queued_requests=args.max_queued_requests,
                              body_timeout_s=args.body_timeout,
                              chat_template=chat_template)
    app = create_app(model, server_settings)  # with --tp N, a TPModel: see zoo.serve.tp_engine

    shown = f"[{host}]" if family == socket.AF_INET6 else host
    engine = app.state.server.engine  # read here, not through a TPModel (its kv_cache would travel whole)
    tp_note = f", tensor-parallel over {settings.tp} ranks" if settings.spawns_ranks else ""
    print(f"[zoo] serving `{server_settings.served_model_name}` (max batch {engine.cache.num_slots}, max_seq_len "
          f"{engine.max_seq_len}{tp_note})", file=sys.stderr)
    print(f"[zoo] listening on http://{shown}:{port}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log, timeout_graceful_shutdown=5,
                            http=with_header_timeout(args.header_timeout))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if settings.spawns_ranks:
            model.close()  # stops the rank processes
    return 0


def _pd_peers(peers: list[str], settings) -> dict[int, str]:
    """--pd-peer options -> {prompt cluster id: 'host:port'}, checked before torch loads (ValueError)."""
    out: dict[int, str] = {}
    for i, peer in enumerate(peers):
        cid, sep, address = peer.rpartition("=")
        host, colon, port = address.rpartition(":")
        if (sep and not cid.isdigit()) or not colon or not host.strip("[]") or not port.isdigit() \
                or not 0 < int(port) < 65536:
            raise ValueError(f"--pd-peer expects [ID=]HOST:PORT, got {peer!r}")
        cluster_id = int(cid) if sep else i
        if cluster_id in out:
            raise ValueError(f"--pd-peer: prompt cluster id {cluster_id} is given twice")
        out[cluster_id] = address
    if out and settings.spawns_ranks:
        raise ValueError("--pd-peer and --tp cannot be combined: the decoder runs in one process")
    return out


if __name__ == "__main__":
    sys.exit(main())
