"""The FastAPI app: OpenAI-compatible completions and chat completions on a zoo Model.

Handlers run on the event loop and never call into the engine directly. A request is tokenized
and validated in a worker thread (engine.make_request raises before anything is queued), handed
to the EngineLoop thread, and its StreamEvents come back into a per-call asyncio.Queue via
loop.call_soon_threadsafe. A client that goes away (mid-stream or while waiting for a
non-streamed answer) gets its requests aborted, which frees their KV slots before the next step.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from zoo.engine import GenerationResult, StreamEvent, encode_prompt
from zoo.api import TPModel
from zoo.engine import Request as EngineRequest
from zoo.engine.choices import keep_best, sample_params
from zoo.engine.sampling import SamplingParams
from zoo.serve.engine_loop import EngineLoop, EngineStopped
from zoo.serve.logprobs import chat_logprobs, completion_logprobs, token_text_fn
from zoo.serve.metrics import Metrics
from zoo.serve.protocol import APIError, ChatCompletionBody, CompletionBody, bad_request, parse_body
from zoo.serve.tp_engine import TPServedModel
from zoo.errors import ChatTemplateError, RequestError

log = logging.getLogger("zoo.serve")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; send temperature 0 for greedy
# Past the body limit the rest is still read (and dropped) up to this size, so the client sees the
# 413 instead of a connection reset; a bigger body gets the 413 and the connection is closed.
_DRAIN_LIMIT = 16 << 20


class ClientGone(Exception):
    """The client disconnected while sending its request: nothing to answer, nothing to log."""


@dataclass
class ServerSettings:
    served_model_name: str
    max_body_bytes: int = 1 << 20
    max_queued_requests: int = 1024  # waiting (not yet in a KV slot) beyond this -> 503
    body_timeout_s: float = 30.0  # a request body not received in full by then -> 408
    chat_template: str | None = None  # overrides the tokenizer's


def default_model_name(model) -> str:
    return os.path.basename(os.path.normpath(model.path)) or "zoo"


def create_app(model, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `model` (a zoo.Model, or a zoo.TPModel: see zoo.serve.tp_engine). Its engine
    thread starts and stops with the app's lifespan; nothing else may generate with `model` while the
    app runs."""
    if isinstance(model, TPModel):  # the ranks' engines, driven with one round trip per step
        model = TPServedModel(model)
    if not hasattr(model, "engine"):
        raise TypeError(f"create_app needs a single-process zoo.Model (with an engine), got {type(model).__name__}")
    settings = settings or ServerSettings(default_model_name(model))
    server = _Server(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # the engine thread hands each step's events to the event loop in one call
        server.engine_loop.start(dispatch=asyncio.get_running_loop().call_soon_threadsafe)
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine_loop.stop)  # joins the thread: not on the loop

    app = FastAPI(title="zoo", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return server.error_response(exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        # nobody reads this answer; 499 is nginx's "client closed request" (not an error of ours)
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return server.error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                              type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return server.error_response(bad_request(str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return server.error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                              type="server_error"))

    @app.get("/health")
    async def health():
        if not server.engine_loop.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        failure = getattr(server.engine, "failure", None)  # tensor-parallel ranks that died or hung
        if failure is not None:
            return JSONResponse({"status": "engine failed", "error": failure}, status_code=503)
        return {"status": "ok", "running": server.engine_loop.running(), "waiting": server.engine_loop.queued()}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    async def generate(request: Request, body_type, make_requests, chat: bool):
        body = parse_body(await server.read_body(request), body_type)
        server.check_model(body.model)
        body.check_supported()
        requests = await run_in_threadpool(make_requests, body)
        return await server.respond(request, body, requests, chat=chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionBody, server.completion_requests, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionBody, server.chat_requests, chat=True)

    return app


class _Server:
    def __init__(self, model, settings: ServerSettings):
        self.model, self.settings = model, settings
        self.name = settings.served_model_name
        self.engine = model.engine
        self.max_seq_len = self.engine.max_seq_len
        self.metrics = Metrics(self.name)
        self.engine_loop = EngineLoop(self.engine, self.metrics)
        self.token_text = token_text_fn(model.tokenizer)  # token id -> text, for logprobs
        self.metrics.bind(self.engine_loop)
        self.created = int(time.time())

    # ---- plumbing ------------------------------------------------------------------------------
    def error_response(self, exc: APIError) -> JSONResponse:
        self.metrics.http_errors.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                           code="request_too_large")
        if length.isdigit() and int(length) > _DRAIN_LIMIT:
            raise too_big
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size <= limit:
                        chunks.append(chunk)
                    elif size > _DRAIN_LIMIT:
                        break
        except TimeoutError:
            raise APIError(408, f"the request body was not received within {self.settings.body_timeout_s:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise ClientGone() from None
        if size > limit:
            raise too_big
        return b"".join(chunks)

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "zoo",
                "max_model_len": self.max_seq_len}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.name}`.",
                           param="model", code="model_not_found")

    # ---- requests ------------------------------------------------------------------------------
    def check_queue_room(self, n: int) -> None:
        """503 when n more requests would pass the queue limit (checked before any tokenizing)."""
        limit, queued = self.settings.max_queued_requests, self.engine_loop.queued()
        if n > limit:
            raise APIError(503, f"this request has {n} prompts, more than the server queues at once "
                                f"(max_queued_requests={limit}); send fewer per request", type="server_error",
                           code="overloaded")
        if queued + n > limit:
            raise APIError(503, f"the server is overloaded: {queued} requests are waiting for a KV slot and this "
                                f"request adds {n}, past max_queued_requests={limit}; retry later",
                           type="server_error", code="overloaded")

    def completion_requests(self, body: CompletionBody) -> list[EngineRequest]:
        """Tokenize and validate (in a worker thread); nothing is queued if any prompt is bad."""
        prompts = body.prompt_list()
        self.check_queue_room(len(prompts) * body.draws)
        try:
            encoded = [encode_prompt(self.model.tokenizer, p, f"prompt {i}", self.name) for i, p in enumerate(prompts)]
        except RequestError as e:
            raise bad_request(str(e), param="prompt") from None
        # echo with max_tokens 0 scores the prompt: one token is generated and not shown
        asked = 1 if body.scores_only else body.max_tokens
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        return self._make_requests(body, encoded, [p if isinstance(p, str) else None for p in prompts],
                                   asked, DEFAULT_COMPLETION_MAX_TOKENS, "prompt", logprobs=body.logprobs,
                                   prompt_logprobs=prompt_logprobs)

    def chat_requests(self, body: ChatCompletionBody) -> list[EngineRequest]:
        tok = self.model.tokenizer
        missing = bad_request(f"the model `{self.name}` has no chat template (no 'chat_template' in its tokenizer "
                              "files), so /v1/chat/completions cannot format messages; use /v1/completions, or "
                              "start the server with --chat-template FILE", param="messages",
                              code="chat_template_missing")
        if tok is None:
            raise missing
        messages = body.template_messages()  # 400 naming the message for content zoo cannot take
        try:
            ids = tok.apply_chat_template(messages, template=self.settings.chat_template)
        except ChatTemplateError:
            raise missing from None
        except Exception as e:  # jinja2 errors (e.g. a template that insists on alternating roles)
            raise bad_request(f"the chat template could not format these messages: {e}", param="messages") from None
        # The reply ends at the end-of-turn token (e.g. <|eot_id|>), which need not be the model's EOS; it
        # counts as one, so ignore_eos (fixed-length benchmarks) ignores it too, as vLLM does.
        end_of_turn = () if body.ignore_eos else tuple(tok.chat_stop_token_ids)
        # No prompt text goes along: nothing in the server reads it back, the ids are what runs.
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return self._make_requests(body, [ids], [None], body.token_limit, None, "messages",
                                   stop_token_ids=end_of_turn, logprobs=logprobs)

    def _make_requests(self, body, encoded: list[list[int]], texts: list[str | None], asked: int | None,
                       default: int | None, prompt_param: str, stop_token_ids: tuple[int, ...] = (),
                       logprobs: int | None = None, prompt_logprobs: int | None = None) -> list[EngineRequest]:
        """body.draws requests per prompt, index = prompt * draws + sample; nothing is queued if any is bad."""
        stops = body.stop_list()
        self.check_queue_room(len(encoded) * body.draws)
        requests = []
        for i, ids in enumerate(encoded):
            params = SamplingParams(
                max_new_tokens=self._max_new_tokens(len(ids), asked, default, prompt_param),
                temperature=DEFAULT_TEMPERATURE if body.temperature is None else float(body.temperature),
                top_k=body.top_k, top_p=body.top_p, min_p=body.min_p or 0.0, seed=body.seed, stop=stops,
                stop_token_ids=tuple(dict.fromkeys(stop_token_ids + tuple(body.stop_token_ids or ()))),
                ignore_eos=body.ignore_eos, min_tokens=body.min_tokens or 0,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                logit_bias=body.token_bias(), logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            for j, sample in enumerate(sample_params(params, body.draws, keep=body.choices)):
                try:
                    requests.append(self.engine.make_request(i * body.draws + j, ids, sample, texts[i]))
                except RequestError as e:
                    raise bad_request(str(e), param=_param_of(str(e), prompt_param)) from None
        return requests

    def _max_new_tokens(self, prompt_len: int, asked: int | None, default: int | None, prompt_param: str) -> int:
        room = self.max_seq_len - prompt_len
        if room < 1:
            raise bad_request(f"This model's maximum context length is {self.max_seq_len} tokens. However, your "
                              f"{prompt_param} has {prompt_len} tokens, which leaves no room for new tokens.",
                              param=prompt_param, code="context_length_exceeded")
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise bad_request(f"This model's maximum context length is {self.max_seq_len} tokens. However, you "
                              f"requested {prompt_len + asked} tokens ({prompt_len} in the {prompt_param}, {asked} "
                              "in the completion). Please reduce the prompt or max_tokens.",
                              param="max_tokens", code="context_length_exceeded")
        return asked

    # ---- answering -----------------------------------------------------------------------------
    async def respond(self, request: Request, body, requests: list[EngineRequest], chat: bool) -> Response:
        queue: asyncio.Queue[tuple[EngineRequest, list[StreamEvent]]] = asyncio.Queue()

        def sink(req: EngineRequest, events: list[StreamEvent]) -> None:  # runs on the event loop
            queue.put_nowait((req, events))

        try:
            self.engine_loop.submit(requests, sink)
        except EngineStopped as e:
            raise APIError(503, f"the server is not accepting requests: {e}", type="server_error") from None
        call = _Call(self, body, requests, queue, chat)
        if body.stream:
            return EventStreamResponse(call.sse(), on_close=lambda: self.engine_loop.abort(requests))
        collector = asyncio.ensure_future(call.wait_all())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collector.done():  # the client went away (or the server is stopping)
                collector.cancel()
                self.engine_loop.abort(requests)
        if not collector.done() or collector.cancelled():
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(call.full_response())


class _Call:
    """One HTTP call's requests, their events as they arrive, and the OpenAI objects built from them."""

    def __init__(self, server: _Server, body, requests: list[EngineRequest], queue: asyncio.Queue, chat: bool):
        self.server, self.body, self.requests, self.queue, self.chat = server, body, requests, queue, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    async def events(self) -> AsyncIterator[tuple[EngineRequest, StreamEvent]]:
        """The events of every request, until each has had its last one (the one with a finish_reason).
        Whatever piled up while the consumer was busy is merged, one event per request, so a slow
        client or a busy event loop gets fewer, larger chunks instead of falling further behind."""
        remaining = len(self.requests)
        while remaining:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            merged: dict[int, tuple[EngineRequest, StreamEvent]] = {}
            for req, events in batch:
                for e in events:
                    if req.index not in merged:
                        merged[req.index] = (req, replace(e, token_ids=list(e.token_ids)))
                    else:
                        m = merged[req.index][1]
                        m.text += e.text
                        m.token_ids += e.token_ids
                        if m.logprobs is not None:
                            m.logprobs = m.logprobs + (e.logprobs or [])
                        m.finish_reason = e.finish_reason or m.finish_reason
            for req, e in merged.values():
                yield req, e
                if e.finish_reason is not None:
                    remaining -= 1

    async def wait_all(self) -> None:
        async for _ in self.events():
            pass

    def usage(self) -> dict:
        """Prompt tokens once per prompt (its n / best_of samples share it), completion tokens of every
        sample generated (best_of ones too: they were computed); echoed tokens are prompt tokens."""
        draws = self.body.draws
        prompt = sum(len(r.prompt_ids) for r in self.requests if r.index % draws == 0)
        completion = 0 if self.scores_only else sum(len(r.output_ids) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def scores_only(self) -> bool:
        return not self.chat and self.body.scores_only

    def _failure(self) -> APIError | None:
        failed = [r for r in self.requests if r.finish_reason == "error"]
        if not failed:
            return None
        return APIError(500, f"generation failed: {failed[0].error}", type="server_error")

    def _echo(self, req: EngineRequest | GenerationResult) -> str:
        """The prompt's text, in front of the completion when the request asks for echo."""
        if self.chat or not self.body.echo:
            return ""
        if req.prompt is not None:
            return req.prompt
        tokenizer = self.server.model.tokenizer  # a prompt sent as token ids
        return tokenizer.decode(req.prompt_ids) if tokenizer is not None else ""

    def _completion_logprobs(self, prompt_ids, prompt_entries, token_ids, entries, offset: int) -> dict | None:
        """A completion choice's logprobs: the echoed prompt's (when echoed) then the new tokens'."""
        if self.body.logprobs is None:
            return None
        text = self.server.token_text
        ids, all_entries = list(token_ids), list(entries or [])
        if prompt_entries is not None:
            ids, all_entries = list(prompt_ids) + ids, list(prompt_entries) + all_entries
        return completion_logprobs(all_entries, ids, text, offset)

    def full_response(self) -> dict:
        failure = self._failure()
        if failure is not None:
            raise failure
        results = keep_best([r.result() for r in self.requests], self.body.choices, self.body.draws,
                            logprobs_asked=True)
        choices = []
        for r in results:
            tokens, entries, text = r.token_ids, r.logprobs, r.text
            finish = r.finish_reason
            if self.scores_only:
                tokens, entries, text, finish = [], [], "", "length"
            if self.chat:
                logprobs = chat_logprobs(entries, self.server.token_text) if self.body.logprobs else None
                choice = {"index": r.index, "message": {"role": "assistant", "content": text},
                          "logprobs": logprobs, "finish_reason": finish}
            else:
                echo = self._echo(r)
                logprobs = self._completion_logprobs(r.prompt_token_ids, r.prompt_logprobs, tokens, entries, 0)
                choice = {"index": r.index, "text": echo + text, "logprobs": logprobs, "finish_reason": finish}
            if self.body.return_token_ids:
                choice["token_ids"] = list(tokens)
            choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.server.name,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, choices: list[dict], usage=None) -> str:
        chunk = {"id": self.id, "object": self.object + ".chunk" if self.chat else self.object,
                 "created": self.created, "model": self.server.name, "choices": choices}
        if self.body.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per engine event with new text (or the finish), an optional
        usage chunk, then `data: [DONE]`. With echo, a request's first chunk is its prompt."""
        if self.chat:
            for r in self.requests:
                yield self._chunk([{"index": r.index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}])
        offsets: dict[int, int] = {}  # completion index -> characters sent so far (text_offset)
        async for req, e in self.events():
            if e.finish_reason == "error":
                err = APIError(500, f"generation failed: {req.error}", type="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                continue
            if not self.chat and self.body.echo and e.index not in offsets:
                echo = self._echo(req)
                offsets[e.index] = len(echo)
                prompt_lp = self._completion_logprobs(req.prompt_ids, req.prompt_logprobs, [], [], 0)
                yield self._chunk([{"index": e.index, "text": echo, "logprobs": prompt_lp, "finish_reason": None}])
            text, token_ids, entries = e.text, e.token_ids, e.logprobs
            if self.scores_only:
                text, token_ids, entries = "", [], []
            wants_ids = self.body.return_token_ids or (self.body.logprobs is not None and self.body.logprobs is not False)
            if not (text or e.finish_reason or (wants_ids and token_ids)):
                continue
            if self.chat:
                logprobs = chat_logprobs(entries or [], self.server.token_text) if self.body.logprobs else None
                choice = {"index": e.index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                          "finish_reason": e.finish_reason}
            else:
                offset = offsets.get(e.index, 0)
                logprobs = self._completion_logprobs([], None, token_ids, entries, offset)
                offsets[e.index] = offset + len(text)
                choice = {"index": e.index, "text": text, "logprobs": logprobs,
                          "finish_reason": "length" if self.scores_only and e.finish_reason else e.finish_reason}
            if self.body.return_token_ids:
                choice["token_ids"] = token_ids
            yield self._chunk([choice])
        if self.body.include_usage:
            yield self._chunk([], usage=self.usage())
        yield "data: [DONE]\n\n"


# SamplingParams field -> the request field it comes from, for 400s that name the parameter
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "prompt_logprobs": "logprobs", "top_k": "top_k", "seed": "seed",
                "min_tokens": "min_tokens", "logit_bias": "logit_bias", "logprobs": "logprobs",
                "stop_token_ids": "stop_token_ids", "stop": "stop"}


def _param_of(message: str, prompt_param: str) -> str:
    """The request field a RequestError is about (its message starts with the SamplingParams field)."""
    return _PARAM_NAMES.get(message.split(" ", 1)[0], prompt_param)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the request body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse(StreamingResponse):
    """text/event-stream from an async iterator of str. Whatever ends it (the last chunk, the client
    going away, the server stopping) calls `on_close` once, which aborts unfinished requests.
    Unlike StreamingResponse under ASGI spec >= 2.4, it notices a client that went away even while
    no chunk is being sent (a request still waiting for a KV slot)."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await self.chunks.aclose()
            self.on_close()
        if pumping.done() and not pumping.cancelled() and isinstance(pumping.exception(), Exception) \
                and not isinstance(pumping.exception(), OSError):
            raise pumping.exception()
