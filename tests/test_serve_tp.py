"""The server's tensor-parallel mode (python -m zoo.serve --tp 2), end to end with the openai client.

A --tp 2 server (the embedded tiny Llama, eager, one torch thread per rank) is compared with the
colocated server of tests/test_serve.py on the same checkpoint: same tokens, greedy and seeded,
streamed or not. One more --tp 2 server has a rank stopped mid-request (a hang) to show the
server fails the request, says so on /health, and does not hang. The in-process test checks that
the shadow requests (zoo.serve.tp_engine) mirror an engine's requests field for field.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

# `server`: test_serve's fixture, the colocated (tp=1) server of the same checkpoint
from servers import process_running, start_server, stop_process  # noqa: E402
from test_serve import LONG, MODEL, ZEN, metrics, post, server, wait_for  # noqa: E402,F401

import zoo  # noqa: E402
from zoo.engine import SamplingParams, stream_events  # noqa: E402
from zoo.engine.driver import EngineDriver  # noqa: E402
from zoo.serve.tp_engine import TPEngine  # noqa: E402

HANG_TIMEOUT_S = 2  # --tp-timeout of the server whose rank hangs


def _start(tmp_path_factory, name: str, *extra: str):
    log_path = tmp_path_factory.mktemp(name) / "server.log"
    proc, url = start_server(["--tp", "2", "--threads", "1", "--max-batch-size", "8", *extra], log_path)
    return proc, log_path, url


def _rank_pids(server_pid: int) -> list[int]:
    """The server's rank processes (its multiprocessing-spawned children), oldest first."""
    children = []
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with open(f"/proc/{server_pid}/task/{task}/children") as f:
            children += [int(p) for p in f.read().split()]
    ranks = []
    for pid in sorted(set(children)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    ranks.append(pid)
        except FileNotFoundError:
            pass
    return ranks


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    """Base URL of `python -m zoo.serve --tp 2`; its log must hold no traceback at the end."""
    proc, log_path, url = _start(tmp_path_factory, "serve_tp")
    try:
        yield url
    finally:
        stop_process(proc, timeout_s=20)
    text = log_path.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert "tensor-parallel over 2 ranks" in text


@pytest.fixture(scope="module")
def tp_client(tp_server):
    return openai.OpenAI(base_url=f"{tp_server}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def colocated_client(request):
    url = request.getfixturevalue("server")  # (a parameter named `server` would shadow the import)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def _idle(url) -> bool:
    m = metrics(url)
    return m["zoo_num_requests_running"] == 0 and m["zoo_num_requests_waiting"] == 0


def _answers(c) -> list:
    """What the tp and the colocated server must agree on: token ids and text, streamed and not."""
    ids = {"return_token_ids": True}
    out = []
    for prompt in ("Beautiful is", "Flat is"):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, extra_body=ids)
        out.append((r.choices[0].token_ids, r.choices[0].text, r.choices[0].finish_reason, r.usage.total_tokens))
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           extra_body=ids))
        out.append(([t for ch in chunks for t in ch.choices[0].token_ids], "".join(ch.choices[0].text for ch in chunks)))
    messages = [{"role": "user", "content": "Simple is"}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, extra_body=ids)
    out.append((r.choices[0].token_ids, r.choices[0].message.content, r.usage.prompt_tokens))
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, extra_body=ids))
    out.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
    # seeded sampling: the rank generators draw what the colocated one draws
    out.append(c.completions.create(model=MODEL, prompt="Simple is", max_tokens=30, temperature=1.0, top_p=0.9,
                                    seed=1234).choices[0].text)
    # a stop string, held back and cut on the ranks
    r = c.completions.create(model=MODEL, prompt="Beautiful is", max_tokens=40, temperature=0, stop=["\n"])
    out.append((r.choices[0].text, r.choices[0].finish_reason))
    return out


def test_tp_server_gives_the_colocated_servers_tokens(colocated_client, tp_client):
    tp = _answers(tp_client)
    assert tp == _answers(colocated_client)
    assert tp[0][1].startswith(" better than ugly.") and tp[-1] == (" better than ugly.", "stop")

    # n samples and logprobs with prompt logprobs (echo): new Request fields travel to the shadows as they are
    def with_logprobs(c):
        r = c.completions.create(model=MODEL, prompt="Flat is", max_tokens=6, temperature=1.0, seed=3, n=2,
                                 logprobs=2, echo=True)
        return [(ch.text, ch.logprobs.tokens, ch.logprobs.token_logprobs) for ch in r.choices]

    mine, ref = with_logprobs(tp_client), with_logprobs(colocated_client)
    assert [m[:2] for m in mine] == [r[:2] for r in ref] and len(mine) == 2
    for m, r in zip(mine, ref):
        assert m[2][0] is None and m[2][1:] == pytest.approx(r[2][1:], abs=1e-4)  # float rounding of the shards


def test_tp_concurrent_requests_are_batched(tp_server, tp_client, colocated_client):
    def complete(c, prompt: str):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                 extra_body={"return_token_ids": True})
        return r.choices[0].token_ids, r.choices[0].text

    prompts = ZEN[:8]
    expected = [complete(colocated_client, p) for p in prompts]
    wait_for(lambda: _idle(tp_server), what="an idle server")
    barrier = threading.Barrier(len(prompts), timeout=30)

    def at_once(prompt: str):
        barrier.wait()
        return complete(tp_client, prompt)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(at_once, p) for p in prompts]]
    assert results == expected
    assert metrics(tp_server)["zoo_num_requests_running_peak"] > 1


def test_tp_client_disconnect_mid_stream_frees_the_slot(tp_server):
    wait_for(lambda: _idle(tp_server), what="an idle server")
    aborted = metrics(tp_server).get('zoo_requests_total{finish_reason="aborted"}', 0)
    with httpx.stream("POST", f"{tp_server}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metrics(tp_server)["zoo_num_requests_running"] == 1
    wait_for(lambda: _idle(tp_server), what="the aborted request to leave its slot")
    assert metrics(tp_server)['zoo_requests_total{finish_reason="aborted"}'] == aborted + 1
    # the ranks dropped it too: a full batch still fits
    r = post(tp_server, "/v1/completions", {"prompt": ZEN[:8], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_tp_health_and_metrics(tp_server, tp_client):
    health = httpx.get(f"{tp_server}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    wait_for(lambda: _idle(tp_server), what="an idle server")
    before = metrics(tp_server)
    r = tp_client.completions.create(model=MODEL, prompt="Explicit is", max_tokens=9, temperature=0)
    after = metrics(tp_server)
    assert after["zoo_prompt_tokens_total"] - before["zoo_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["zoo_generation_tokens_total"] - before["zoo_generation_tokens_total"] == 9
    ttft = after["zoo_time_to_first_token_seconds_sum"] - before["zoo_time_to_first_token_seconds_sum"]
    e2e = after["zoo_e2e_request_latency_seconds_sum"] - before["zoo_e2e_request_latency_seconds_sum"]
    assert after["zoo_time_to_first_token_seconds_count"] == before["zoo_time_to_first_token_seconds_count"] + 1
    assert 0 < ttft < e2e < 30  # times of the ranks, on the server's clock
    assert after["zoo_time_per_output_token_seconds_count"] == before["zoo_time_per_output_token_seconds_count"] + 1
    assert after["zoo_kv_cache_slots"] == 8 and after["zoo_engine_step_errors_total"] == 0


def test_a_hung_rank_fails_the_request_and_health_says_so(tmp_path_factory):
    proc, log_path, url = _start(tmp_path_factory, "serve_tp_hang", "--tp-timeout", str(HANG_TIMEOUT_S))
    ranks = _rank_pids(proc.pid)
    try:
        assert len(ranks) == 2, ranks
        with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(ranks[-1], signal.SIGSTOP)  # hangs; the server must notice within the timeouts
            t0 = time.monotonic()
            events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
            waited = time.monotonic() - t0
        errors = [e["error"] for e in events if "error" in e]
        assert errors and errors[-1]["type"] == "server_error" and "tensor-parallel rank" in errors[-1]["message"]
        assert waited < 6 * HANG_TIMEOUT_S + 10
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "engine failed"
        assert "tensor-parallel rank" in health.json()["error"]
        later = post(url, "/v1/completions", {"prompt": "Flat is", "max_tokens": 2})
        assert later.status_code == 503 and later.json()["error"]["type"] == "server_error"
        wait_for(lambda: not any(process_running(p) for p in ranks), timeout_s=20, what="the ranks to be stopped")
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stop_process(proc, timeout_s=20)
    assert "tensor-parallel ranks failed" in log_path.read_text()


def test_a_rank_that_dies_while_idle_shows_on_health(tmp_path_factory):
    proc, _, url = _start(tmp_path_factory, "serve_tp_die")
    try:
        ranks = _rank_pids(proc.pid)
        assert post(url, "/v1/completions", {"prompt": "Flat is", "max_tokens": 2}).status_code == 200
        os.kill(ranks[0], signal.SIGKILL)
        health = wait_for(lambda: (h := httpx.get(f"{url}/health", timeout=10)).status_code == 503 and h,
                          timeout_s=10, what="/health to say the rank is gone")
        assert health.json()["error"] == "tensor-parallel rank 0 is gone (its process exited)"
        later = post(url, "/v1/completions", {"prompt": "Flat is", "max_tokens": 2})
        assert later.status_code == 503 and "rank 0 is gone" in later.json()["error"]["message"]
    finally:
        stop_process(proc, timeout_s=20)


# ---- in-process: the shadows mirror an engine's requests ---------------------------------------------
class _LocalRanks:
    """What TPEngine reads of a TPModel, over one in-process model (a single 'rank')."""

    closed = False

    def __init__(self, model):
        self.model, self.tokenizer = model, model.tokenizer

    def driver(self):
        return EngineDriver(self.model.engine)


def test_shadow_requests_mirror_the_engine_field_for_field():
    model = zoo.load(max_batch_size=4)
    tok = model.tokenizer
    cases = [("Beautiful is", SamplingParams(max_new_tokens=12, logprobs=3, prompt_logprobs=2)),
             ("Flat is", SamplingParams(max_new_tokens=30, stop=("\n",))),
             ("Simple is", SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, logprobs=0)),
             ("Sparse is", SamplingParams(max_new_tokens=8, min_tokens=4, presence_penalty=0.5))]

    def run(engine, advance) -> list:
        reqs = [engine.make_request(i, tok.encode(p), params, p) for i, (p, params) in enumerate(cases)]
        engine.submit(reqs)
        events = list(stream_events(reqs, advance, engine.abort))
        return [r.result() for r in reqs], events

    local_results, local_events = run(model.engine, model.engine.step)
    tp = TPEngine(_LocalRanks(model))
    assert (tp.cache.num_slots, tp.max_seq_len) == (4, model.max_seq_len)
    results, events = run(tp, tp.step)
    for mine, ref in zip(results, local_results):
        assert mine.token_ids and mine.logprobs == ref.logprobs and mine.prompt_logprobs == ref.prompt_logprobs
        assert (mine.token_ids, mine.text, mine.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
        assert 0 < mine.ttft_ms < 10_000
    assert events == local_events
    assert not tp.has_work() and not tp.running and not tp.waiting

    # an abort before the request reached the engine, and one of a running request
    a, b = (tp.make_request(i, tok.encode("Complex is"), SamplingParams(max_new_tokens=50)) for i in range(2))
    tp.submit([a])
    tp.abort([a], "gone")
    tp.submit([b])
    tp.step()
    assert b.slot is not None and tp.running == {b.slot: b} and a.error == "gone"
    tp.abort([b], "gone too")
    tp.step()
    assert b.finish_reason == "error" and model.engine.running == {} and not tp.has_work()
