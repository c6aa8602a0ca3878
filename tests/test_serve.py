"""The OpenAI-compatible server (python -m zoo.serve) end to end, with the official openai client.

One server process (the embedded tiny Llama, eager) on a free loopback port serves the whole
module; one test builds an app in-process for a model without a chat template. Every wait is
bounded, and the server is stopped at the end.
"""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from servers import start_server, stop_process  # noqa: E402

MODEL = "tiny-llama"
STALL_TIMEOUT_S = 2  # the server's --header-timeout and --body-timeout in this module
ZEN = ["Beautiful is", "Explicit is", "Simple is", "Complex is", "Flat is", "Sparse is", "Readability",
       "Special cases", "Although practicality", "Errors should", "Unless explicitly", "In the face of",
       "There should be one", "Although that way", "Now is better", "If the implementation"]


# ---- the server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a `python -m zoo.serve --port 0` process (default host), stopped afterwards."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_server(["--max-batch-size", "8", "--header-timeout", str(STALL_TIMEOUT_S),
                              "--body-timeout", str(STALL_TIMEOUT_S)], log_path)
    try:
        yield url
    finally:
        stop_process(proc)
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text[-4000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)


def metrics(server) -> dict[str, float]:
    """The server's /metrics as {'name{label="v",...}': value}."""
    r = httpx.get(f"{server}/metrics", timeout=10)
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate, timeout_s: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server}{path}", content=content, headers={"Content-Type": "application/json"},
                      timeout=60, **kw)


# ---- basics --------------------------------------------------------------------------------------
def test_health_models_and_loopback_default(server, client):
    assert server.startswith("http://127.0.0.1:")  # binds loopback unless told otherwise
    health = httpx.get(f"{server}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion(client):
    r = client.completions.create(model=MODEL, prompt="Beautiful is", max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.text.startswith(" better than ugly.\nExplicit is better than implicit.")
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 20, 24)


def test_completion_stop_and_seed(client):
    r = client.completions.create(model=MODEL, prompt="Beautiful is", max_tokens=40, temperature=0, stop=["\n"])
    assert r.choices[0].text == " better than ugly." and r.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model=MODEL, prompt="Simple is", max_tokens=30, temperature=1.0, top_p=0.9,
                                      seed=1234).choices[0].text for _ in range(2))
    assert a == b


def test_prompt_list_gives_one_choice_per_prompt(client):
    r = client.completions.create(model=MODEL, prompt=["Beautiful is", "Flat is"], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith(" better than ugly") and r.choices[1].text.startswith(" better than nested")
    assert r.usage.completion_tokens == 12


def test_chat_completion_uses_the_chat_template(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Beautiful is"}],
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and msg.content
    # <s> <|start_header_id|>user<|end_header_id|>\n\nBeautiful is<|eot_id|><|start_header_id|>assistant...
    assert r.usage.prompt_tokens == 22 and r.usage.completion_tokens == 12


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streaming_concatenates_to_the_full_answer(client, kind):
    args = dict(model=MODEL, max_tokens=40, temperature=0)
    if kind == "completion":
        create, args["prompt"] = client.completions.create, "Simple is"
        text_of = lambda c: c.text  # noqa: E731
        full = create(**args)
        full_text = full.choices[0].text
    else:
        create, args["messages"] = client.chat.completions.create, [{"role": "user", "content": "Flat is"}]
        text_of = lambda c: c.delta.content or ""  # noqa: E731
        full = create(**args)
        full_text = full.choices[0].message.content
    chunks = list(create(**args, stream=True, stream_options={"include_usage": True}))
    pieces = [c for c in chunks if c.choices]
    assert len(pieces) > 5  # it really streamed
    assert "".join(text_of(c.choices[0]) for c in pieces) == full_text
    assert pieces[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in pieces[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == full.usage
    assert all(c.usage is None for c in pieces)


def test_raw_sse_framing(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Flat is", "max_tokens": 5, "temperature": 0,
                                         "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[0][len("data: "):])  # only with stream_options.include_usage


# ---- errors --------------------------------------------------------------------------------------
ERROR_CASES = [
    # (id, path, body, status, param, code)
    ("malformed_json", "/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400, None, None),
    ("not_an_object", "/v1/completions", b"[1, 2]", 400, None, None),
    ("unknown_model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("unknown_model_chat", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
     404, "model", "model_not_found"),
    ("max_tokens_beyond_context", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100000},
     400, "max_tokens", "context_length_exceeded"),
    ("prompt_beyond_context", "/v1/completions", {"model": MODEL, "prompt": list(range(5, 5 + 600))},
     400, "prompt", "context_length_exceeded"),
    ("negative_temperature", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5},
     400, "temperature", "invalid_value"),
    ("max_tokens_as_string", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"},
     400, "max_tokens", "invalid_type"),
    ("temperature_as_string", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     400, "temperature", "invalid_type"),
    ("prompt_wrong_type", "/v1/completions", {"model": MODEL, "prompt": 3}, 400, "prompt", "invalid_type"),
    ("messages_wrong_type", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages",
     "invalid_type"),
    ("bad_role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     400, "messages[0].role", "invalid_value"),
    ("missing_prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ("n_zero", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ("best_of_below_n", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 3, "best_of": 2}, 400, "best_of",
     "invalid_value"),
    ("best_of_streamed", "/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2, "stream": True}, 400,
     "best_of", "invalid_value"),
    ("logprobs_above_20", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs",
     "invalid_value"),
    ("top_logprobs_without_logprobs", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs",
     "invalid_value"),
    ("presence_penalty_above_2", "/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400,
     "presence_penalty", "invalid_value"),
    ("logit_bias_key_not_a_token", "/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"a": 1}}, 400,
     "logit_bias", "invalid_value"),
    ("logit_bias_token_outside_vocab", "/v1/completions",
     {"model": MODEL, "prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias", None),
    ("logit_bias_value_above_100", "/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}},
     400, "logit_bias", "invalid_value"),
    ("min_tokens_above_max_tokens", "/v1/completions",
     {"model": MODEL, "prompt": "x", "max_tokens": 3, "min_tokens": 4}, 400, "min_tokens", None),
    ("max_tokens_zero_without_echo", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400,
     "max_tokens", "invalid_value"),
    ("token_id_outside_vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt", None),
    ("top_p_zero", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("stream_options_without_stream", "/v1/completions",
     {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "invalid_value"),
    ("best_of_zero", "/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 0}, 400, "best_of", "invalid_value"),
    ("too_many_stops", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a"] * 17}, 400, "stop",
     "invalid_value"),
    ("empty_stop", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop", "invalid_value"),
    ("image_content_part", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", "unsupported_value"),
    ("oversized_body", "/v1/completions", {"model": MODEL, "prompt": "a" * (1 << 20)}, 413, None,
     "request_too_large"),
    ("seed_past_int64", "/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**63}, 400, "seed",
     "invalid_value"),
    ("seed_below_int64", "/v1/completions", {"model": MODEL, "prompt": "x", "seed": -(2**63) - 1}, 400, "seed",
     "invalid_value"),
    ("top_k_below_minus_1", "/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -2}, 400, "top_k",
     "invalid_value"),
    ("top_k_past_int64", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 1,
                                              "top_k": 9223372036854775808}, 400, "top_k", "invalid_value"),
    ("lone_surrogate_in_prompt", "/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}, 400, "prompt",
     "invalid_value"),
    ("lone_surrogate_in_prompt_list", "/v1/completions", {"model": MODEL, "prompt": ["ok", "\udfff"]}, 400,
     "prompt[1]", "invalid_value"),
    ("lone_surrogate_in_chat", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content",
     "invalid_value"),
    ("negative_stop_token_id", "/v1/completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [-1]}, 400,
     "stop_token_ids", "invalid_value"),
]


@pytest.mark.parametrize("path,body,status,param,code", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_bad_requests_get_openai_error_bodies(server, path, body, status, param, code):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param and error["code"] == code


def test_errors_through_the_openai_client_and_the_server_goes_on(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=0)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    r = client.completions.create(model=MODEL, prompt="Beautiful is", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_sampling_integers_in_range_work(server):
    """top_k 0 / -1 mean off and a huge top_k is the whole vocabulary: the same seeded tokens."""
    outs = []
    for top_k in (0, -1, 2**62):
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Beautiful is", "max_tokens": 6,
                                             "temperature": 1, "seed": 5, "top_k": top_k, "return_token_ids": True})
        assert r.status_code == 200, r.text
        outs.append(r.json()["choices"][0]["token_ids"])
    assert outs[0] == outs[1] == outs[2]


def test_stop_token_ids_are_honoured(server):
    body = {"model": MODEL, "prompt": "Beautiful is", "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    full = post(server, "/v1/completions", body).json()["choices"][0]["token_ids"]
    stop = full[4]
    choice = post(server, "/v1/completions", {**body, "stop_token_ids": [stop]}).json()["choices"][0]
    assert choice["token_ids"] == full[:full.index(stop) + 1] and choice["finish_reason"] == "stop"


def test_a_request_with_more_prompts_than_the_queue_is_refused_before_tokenizing(server):
    t0 = time.monotonic()
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": ["Beautiful is better than ugly"] * 20000,
                                         "max_tokens": 1})
    assert r.status_code == 503, r.text
    assert "20000 prompts" in r.json()["error"]["message"] and "max_queued_requests=1024" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10  # tokenizing 20000 prompts first would take far longer here


def _raw_connection(server):
    import socket

    host, port = server.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=STALL_TIMEOUT_S + 8)
    return sock


def _closed_within(sock, seconds: float) -> tuple[bool, bytes]:
    """(the server closed the connection within `seconds`, what it sent first)."""
    sock.settimeout(seconds)
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True, received
            received += chunk
    except TimeoutError:
        return False, received
    finally:
        sock.close()


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"],
                         ids=["nothing", "half_the_headers"])
def test_stalled_headers_are_closed(server, sent):
    sock = _raw_connection(server)
    sock.sendall(sent)
    closed, _ = _closed_within(sock, STALL_TIMEOUT_S + 6)
    assert closed


def test_stalled_body_gets_408(server):
    sock = _raw_connection(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")
    closed, received = _closed_within(sock, STALL_TIMEOUT_S + 6)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"request_timeout" in received


def test_idle_keep_alive_is_closed(server):
    sock = _raw_connection(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    closed, received = _closed_within(sock, STALL_TIMEOUT_S + 8)
    assert received.startswith(b"HTTP/1.1 200") and closed


def test_a_client_leaving_while_sending_its_body_is_not_an_error(server):
    """No 500, no traceback in the server log (the module fixture checks the log at the end)."""
    errors_before = metrics(server).get('zoo_http_errors_total{status="500"}', 0)
    sock = _raw_connection(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")
    time.sleep(0.3)
    sock.close()
    time.sleep(0.5)
    assert metrics(server).get('zoo_http_errors_total{status="500"}', 0) == errors_before
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_unknown_route_is_openai_shaped(server):
    r = httpx.get(f"{server}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_chat_without_a_template_is_a_clear_400(tmp_path):
    """In-process app (uvicorn-free), for a copy of the tiny Llama whose tokenizer has no chat template."""
    from fastapi.testclient import TestClient

    import zoo
    from zoo.serve import create_app

    model_dir = tmp_path / "no-template"
    shutil.copytree(zoo.embedded_model_path("llama"), model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    with TestClient(create_app(zoo.load(str(model_dir), max_batch_size=2))) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "chat_template_missing" and "chat template" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": "Beautiful is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(" better than")


def test_a_failing_engine_step_is_a_500_and_the_server_goes_on(monkeypatch):
    """In-process: the decode graph raises once; that request gets an OpenAI-shaped 500, the next works."""
    from fastapi.testclient import TestClient

    import zoo
    from zoo.serve import create_app

    model = zoo.load(max_batch_size=2)
    decode, calls = model.engine.runner.decode, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected decode failure")
        return decode(*args, **kwargs)

    monkeypatch.setattr(model.engine.runner, "decode", failing_once)
    body = {"prompt": "Beautiful is", "max_tokens": 5, "temperature": 0}
    with TestClient(create_app(model)) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error" and "injected decode failure" in error["message"]
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " better than ugly.\n"
        assert http.get("/health").json()["running"] == 0


def test_a_failing_prefill_fails_only_its_request(monkeypatch):
    """In-process: a prefill raises for one request while another streams; that request gets a 500
    naming the error, the stream goes on to its last token, and the server stays healthy."""
    from fastapi.testclient import TestClient

    import zoo
    from zoo.serve import create_app

    model = zoo.load(max_batch_size=2)
    real_prefill = model.engine.runner.prefill

    def prefill(prompts, slots, starts=None):
        if [7, 7, 7] in prompts:
            raise RuntimeError("injected prefill failure")
        return real_prefill(prompts, slots, starts)

    monkeypatch.setattr(model.engine.runner, "prefill", prefill)
    body = {"prompt": "Beautiful is", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(model)) as http:
        expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            pieces = [next(lines)]
            bad = http.post("/v1/completions", json={"prompt": [7, 7, 7], "max_tokens": 3})
            assert bad.status_code == 500 and "injected prefill failure" in bad.json()["error"]["message"]
            pieces += list(lines)
        chunks = [json.loads(line[6:]) for line in pieces if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        health = http.get("/health").json()
        assert health["running"] == 0 and health["waiting"] == 0


def test_one_request_with_many_prompts_does_not_hold_every_slot():
    """In-process, 2 slots: a request with 6 long prompts starts first; a one-prompt request sent
    while it runs is admitted when a slot frees, and answered while the big one still runs (each
    HTTP request is its own submission, and admission takes turns between submissions)."""
    from fastapi.testclient import TestClient

    import zoo
    from zoo.serve import create_app

    model = zoo.load(max_batch_size=2)
    big = {"prompt": ["Beautiful is"] * 6, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    small = {"prompt": "Simple is", "max_tokens": 3, "temperature": 0}
    with TestClient(create_app(model)) as http:
        done = threading.Event()
        answer = {}

        def send_big():
            answer["big"] = http.post("/v1/completions", json=big)
            done.set()

        sender = threading.Thread(target=send_big)
        sender.start()
        wait_for(lambda: http.get("/health").json()["running"] == 2, what="the big request to fill both slots")
        r = http.post("/v1/completions", json=small)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert not done.is_set(), "the one-prompt request waited for all six prompts of the other"
        sender.join(timeout=120)
        assert answer["big"].status_code == 200 and len(answer["big"].json()["choices"]) == 6


# ---- disconnects ---------------------------------------------------------------------------------
LONG = {"model": MODEL, "prompt": "Beautiful is", "max_tokens": 500, "temperature": 0, "ignore_eos": True}


def _idle(server) -> bool:
    m = metrics(server)
    return m["zoo_num_requests_running"] == 0 and m["zoo_num_requests_waiting"] == 0


def test_client_disconnect_mid_stream_frees_the_slot(server):
    wait_for(lambda: _idle(server), what="an idle server")
    aborted = metrics(server).get('zoo_requests_total{finish_reason="aborted"}', 0)
    with httpx.stream("POST", f"{server}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = [next(lines) for _ in range(4)]  # two chunks (each followed by a blank line)
        assert first[0].startswith("data: ")
        m = metrics(server)
        assert m["zoo_num_requests_running"] == 1 and m["zoo_kv_cache_blocks"] > 0
        assert 0 < m["zoo_kv_cache_usage_ratio"] <= 1  # the blocks its prompt and tokens hold
    # closed after ~2 of 500 tokens: the server aborts it and frees its slot and blocks
    wait_for(lambda: _idle(server), what="the aborted request to leave its slot")
    m = metrics(server)
    assert m["zoo_kv_cache_usage_ratio"] == 0
    assert m['zoo_requests_total{finish_reason="aborted"}'] == aborted + 1
    assert httpx.get(f"{server}/health", timeout=10).json()["running"] == 0


def test_client_disconnect_while_waiting_for_a_full_answer(server):
    wait_for(lambda: _idle(server), what="an idle server")
    aborted = metrics(server).get('zoo_requests_total{finish_reason="aborted"}', 0)
    with pytest.raises(httpx.ReadTimeout):  # gives up long before 500 tokens are done
        httpx.post(f"{server}/v1/completions", json=LONG, timeout=httpx.Timeout(10, read=0.1))
    wait_for(lambda: metrics(server).get('zoo_requests_total{finish_reason="aborted"}', 0) == aborted + 1,
             what="the abort of the abandoned request")
    wait_for(lambda: _idle(server), what="the slot to be free")


# ---- continuous batching -------------------------------------------------------------------------
def _batched_steps(m: dict) -> float:
    """Engine steps in which more than one request got a token."""
    return m["zoo_engine_step_batch_size_count"] - m['zoo_engine_step_batch_size_bucket{le="1.0"}']


def test_concurrent_clients_are_batched_and_get_the_sequential_tokens(server, client):
    def complete(prompt: str) -> tuple[list[int], str]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"return_token_ids": True})
        return r.choices[0].token_ids, r.choices[0].text

    wait_for(lambda: _idle(server), what="an idle server")
    before = metrics(server)
    sequential = [complete(p) for p in ZEN]
    after_sequential = metrics(server)
    assert _batched_steps(after_sequential) == _batched_steps(before)  # one at a time: never batched

    barrier = threading.Barrier(len(ZEN), timeout=30)

    def concurrent_complete(prompt: str):
        barrier.wait()
        return complete(prompt)

    with concurrent.futures.ThreadPoolExecutor(len(ZEN)) as pool:
        futures = [pool.submit(concurrent_complete, p) for p in ZEN]
        # the event loop is never blocked by the engine: /health answers while the batch runs
        assert httpx.get(f"{server}/health", timeout=10).status_code == 200
        concurrent_results = [f.result(timeout=120) for f in futures]
    assert concurrent_results == sequential  # same token ids and text, greedy, whatever the batch

    m = metrics(server)
    assert _batched_steps(m) > _batched_steps(after_sequential)  # steps that served several requests
    assert m["zoo_num_requests_running_peak"] > 1
    assert m["zoo_requests_total{finish_reason=\"length\"}"] >= before.get(
        'zoo_requests_total{finish_reason="length"}', 0) + 2 * len(ZEN)


# ---- metrics -------------------------------------------------------------------------------------
def test_metrics_count_tokens_and_latencies(server, client):
    wait_for(lambda: _idle(server), what="an idle server")
    before = metrics(server)
    r = client.completions.create(model=MODEL, prompt="Explicit is", max_tokens=9, temperature=0)
    after = metrics(server)
    assert after["zoo_prompt_tokens_total"] - before["zoo_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["zoo_generation_tokens_total"] - before["zoo_generation_tokens_total"] == 9
    for hist in ("zoo_time_to_first_token_seconds", "zoo_e2e_request_latency_seconds"):
        assert after[f"{hist}_count"] == before[f"{hist}_count"] + 1
        assert after[f"{hist}_sum"] > before[f"{hist}_sum"]
    assert after["zoo_num_requests_running"] == 0 and after["zoo_num_requests_waiting"] == 0
    assert after["zoo_kv_cache_slots"] == 8

    raw = httpx.get(f"{server}/metrics", timeout=10)
    assert raw.headers["content-type"].startswith("text/plain")
    for name in ("zoo_num_requests_running", "zoo_num_requests_waiting", "zoo_prompt_tokens_total",
                 "zoo_generation_tokens_total", "zoo_time_to_first_token_seconds_bucket",
                 "zoo_e2e_request_latency_seconds_bucket", "zoo_http_errors_total"):
        assert f"\n{name}" in raw.text, name


# ---- sampling options, logprobs, echo, n / best_of ---------------------------------------------------
@pytest.fixture(scope="module")
def hf_reference():
    """log_softmax of transformers' logits on the embedded model, for token ids -> [S, V]."""
    import torch
    from transformers import AutoModelForCausalLM

    from zoo.models import embedded_model_path

    hf = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32).eval()

    def logprobs(ids: list[int]):
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].log_softmax(-1)

    return logprobs


def test_models_list_shows_max_model_len(client):
    from zoo.models import embedded_model_path, read_config

    card = client.models.list().data[0]
    assert card.id == MODEL and card.max_model_len == min(read_config(embedded_model_path()).max_position_embeddings,
                                                          2048)


def test_completion_logprobs_match_transformers(client, hf_reference):
    r = client.completions.create(model=MODEL, prompt="Beautiful is", max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0]
    ids = choice.token_ids
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) == 8
    prompt_ids = _prompt_ids("Beautiful is")
    assert r.usage.prompt_tokens == len(prompt_ids)
    ref = hf_reference(prompt_ids + ids)
    for step, (token, value, top) in enumerate(zip(ids, lp.token_logprobs, lp.top_logprobs)):
        assert value == pytest.approx(ref[len(prompt_ids) - 1 + step, token].item(), abs=1e-4)
        assert len(top) <= 4 and lp.tokens[step] in top  # 3 alternatives + the chosen token
        assert max(top.values()) == pytest.approx(value, abs=1e-6)  # greedy: the chosen one is the best
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]


def _prompt_ids(text: str) -> list[int]:
    """The prompt's token ids, as the server encodes them (the embedded model's tokenizer)."""
    from zoo.models import embedded_model_path
    from zoo.tokenizers import load_tokenizer

    return load_tokenizer(embedded_model_path()).encode(text)


def test_echo_scores_the_prompt_like_transformers(client, hf_reference):
    prompt = "Errors should never pass silently"
    ids = _prompt_ids(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    ref = hf_reference(ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
    # echo with new tokens: the prompt, then the completion (and its logprobs after the prompt's)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=1, temperature=0)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    assert r.choices[0].text == prompt + plain.choices[0].text
    assert r.choices[0].logprobs.token_logprobs[len(ids):] == plain.choices[0].logprobs.token_logprobs
    assert r.usage.completion_tokens == 4


def test_streamed_echo_and_logprobs_equal_the_whole_answer(client):
    kw = dict(model=MODEL, prompt="Flat is", max_tokens=6, temperature=0, echo=True, logprobs=2)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert sum((c.logprobs.token_logprobs for c in chunks if c.logprobs), []) == whole.logprobs.token_logprobs
    assert sum((c.logprobs.text_offset for c in chunks if c.logprobs), []) == whole.logprobs.text_offset


def test_chat_logprobs_streamed_and_not(client, hf_reference):
    messages = [{"role": "user", "content": "Beautiful is"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.bytes == list(t.token.encode("utf-8"))
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_choices_and_their_usage(client):
    kw = dict(model=MODEL, prompt=["Beautiful is", "Now is better"], max_tokens=5, temperature=1.5, seed=4)
    one = [client.completions.create(**{**kw, "prompt": p}, n=1) for p in kw["prompt"]]
    r = client.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == list(range(6))
    assert r.usage.prompt_tokens == sum(o.usage.prompt_tokens for o in one)  # each prompt counted once
    assert r.usage.completion_tokens == 6 * 5
    # choice j of a seeded request is the request with seed + j
    assert r.choices[0].text == one[0].choices[0].text and r.choices[3].text == one[1].choices[0].text
    shifted = client.completions.create(**{**kw, "prompt": kw["prompt"][1], "seed": 6})
    assert r.choices[5].text == shifted.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Simple is"}], n=2,
                                          max_tokens=4, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message


def test_best_of_returns_the_most_likely_samples(client):
    kw = dict(model=MODEL, prompt="Special cases", max_tokens=6, temperature=2.0, seed=9)
    drawn = client.completions.create(n=4, logprobs=0, **kw)
    best = client.completions.create(n=2, best_of=4, **kw)
    ranked = sorted(drawn.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)[:2]
    assert [c.text for c in best.choices] == [c.text for c in ranked]
    assert all(c.logprobs is None for c in best.choices) and best.usage.completion_tokens == 4 * 6


def test_penalties_bias_and_min_tokens_reach_the_sampler(server, client):
    import zoo

    # (the trained tiny model is so sure of itself that greedy output rarely changes: sample, seeded)
    sampled = dict(model=MODEL, prompt="Beautiful is", max_tokens=16, temperature=1.0, seed=3)
    plain = client.completions.create(**sampled, extra_body={"return_token_ids": True}).choices[0]
    options = dict(frequency_penalty=1.5, presence_penalty=0.5)
    extra = {"repetition_penalty": 2.0, "min_p": 0.1, "return_token_ids": True}
    served = client.completions.create(**sampled, **options, extra_body=extra).choices[0]
    with zoo.load(max_batch_size=2) as local:  # the same embedded model in this process
        want = local.generate("Beautiful is", max_new_tokens=16, temperature=1.0, seed=3, repetition_penalty=2.0,
                              min_p=0.1, **options)
    assert served.token_ids == want.token_ids != plain.token_ids
    kw = dict(model=MODEL, prompt="Beautiful is", max_tokens=12, temperature=0)
    forced = client.completions.create(**kw, logit_bias={"100": 100}, extra_body={"return_token_ids": True})
    assert forced.choices[0].token_ids == [100] * 12
    eos = 2  # the embedded model's EOS, made the greedy choice by the bias
    short = client.completions.create(**{**kw, "max_tokens": 8}, logit_bias={str(eos): 100},
                                      extra_body={"return_token_ids": True}).choices[0]
    assert short.token_ids == [eos] and short.finish_reason == "stop"
    held = client.completions.create(**{**kw, "max_tokens": 8}, logit_bias={str(eos): 100},
                                     extra_body={"return_token_ids": True, "min_tokens": 3}).choices[0]
    assert len(held.token_ids) == 4 and held.token_ids[-1] == eos and eos not in held.token_ids[:3]
