"""`python -m zoo.serve --pd-peer ...`: the OpenAI server decoding for prompt processes, end to end
with the official openai client.

Two prompt processes (`python -m zoo.pd --role prompt`, from test_pd) and one server process on
loopback, eager, the embedded tiny Llama; the reference is the colocated server (the same app on a
zoo.load model, in-process). Every wait is bounded; the processes are stopped at the end.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import zoo  # noqa: E402
from test_pd import MAX_SEQ, PromptProcess  # noqa: E402
from servers import ROOT, start_server, stop_process  # noqa: E402
from test_serve import MODEL  # noqa: E402

SLOTS = 4
PROMPTS = ["Beautiful is", "Flat is", "Simple is better than"]


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Two prompt processes, cluster ids 0 and 1 (the kill test replaces number 1)."""
    work = tmp_path_factory.mktemp("serve-pd")
    path = zoo.embedded_model_path("llama")
    procs = []
    try:
        for i in range(2):
            procs.append(PromptProcess(path, work, f"prompt{i}", cluster_id=i))
        yield work, procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def pd_server(peers, tmp_path_factory):
    """Base URL of `python -m zoo.serve --pd-peer A --pd-peer B`, and its log path."""
    _, procs = peers
    log_path = tmp_path_factory.mktemp("serve-pd-log") / "server.log"
    args = ["--max-batch-size", str(SLOTS), "--max-seq-len", str(MAX_SEQ), "--threads", "1"]
    for p in procs:
        args += ["--pd-peer", p.address]
    proc, url = start_server(args, log_path)
    try:
        yield url, log_path
    finally:
        stop_process(proc)
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text[-4000:]


@pytest.fixture(scope="module")
def pd_client(pd_server):
    return openai.OpenAI(base_url=f"{pd_server[0]}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def colocated_client():
    """The same app on a colocated model of the same sizes, in-process (TestClient is an httpx.Client)."""
    from fastapi.testclient import TestClient

    from zoo.serve import create_app

    with TestClient(create_app(zoo.load(max_batch_size=SLOTS, max_seq_len=MAX_SEQ))) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)


def _answers(client) -> dict:
    """Greedy completions (two prompts: both prompt processes) and chat, streamed and not, plus a
    seeded, penalized request with logprobs."""
    out = {}
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=16, temperature=0,
                                  extra_body={"return_token_ids": True})
    out["completions"] = [(c.text, c.finish_reason, c.model_extra["token_ids"]) for c in r.choices]
    out["usage"] = r.usage.model_dump()
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                            stream=True))
    out["completion_stream"] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)
    messages = [{"role": "user", "content": "Beautiful is"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    out["chat"] = (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_dump())
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    out["chat_stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0.8, seed=3,
                                  presence_penalty=0.5, logit_bias={"262": 3}, logprobs=2,
                                  extra_body={"return_token_ids": True, "min_tokens": 4, "repetition_penalty": 1.2})
    c = r.choices[0]
    out["sampled"] = (c.text, c.model_extra["token_ids"], c.logprobs.tokens)
    out["sampled_logprobs"] = c.logprobs.token_logprobs
    return out


def test_pd_server_answers_like_the_colocated_server(pd_client, colocated_client):
    """Prefill on the prompt processes, decode in the server: the same tokens, text, usage and
    logprobs as the colocated server, for completions and chat, streamed and not."""
    pd, colocated = _answers(pd_client), _answers(colocated_client)
    assert pd.pop("sampled_logprobs") == pytest.approx(colocated.pop("sampled_logprobs"), abs=1e-4)
    assert pd == colocated
    assert all(len(ids) == 16 for _, _, ids in pd["completions"])


def _send(results: dict, key: str, client, stream: bool) -> threading.Thread:
    def run():
        try:
            if stream:
                chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                                        stream=True))
                results[key] = "".join(c.choices[0].text for c in chunks)
            else:
                results[key] = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                                         temperature=0).choices[0].text
        except openai.APIError as e:
            results[key] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.7)  # handed to the engine before the next one: round robin alternates between the peers
    return t


def test_a_prompt_process_killed_mid_request_fails_only_its_requests(pd_server, pd_client, peers):
    """Prompt process 1 hangs (SIGSTOP) with requests on their way through it, then dies (SIGKILL):
    those requests get a 500 (streamed: an error event), the ones on process 0 and the next ones are
    answered. Restarted on its address, it is linked again in the background and serves again."""
    work, procs = peers
    expected = pd_client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    expected = expected.choices[0].text
    procs[1].pause()
    results: dict = {}
    # requests k and k+1 go to different peers: one of each pair waits on the paused process
    threads = [_send(results, key, pd_client, stream=key.startswith("stream"))
               for key in ("plain_a", "plain_b", "stream_a", "stream_b")]
    deadline = time.monotonic() + 30
    while len(results) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(results.values()) == [expected, expected]  # the two on process 0
    port = procs[1].address.rsplit(":", 1)[1]
    procs[1].kill()
    for t in threads:
        t.join(timeout=30)
    failed = {k: v for k, v in results.items() if isinstance(v, openai.APIError)}
    assert len(failed) == 2 and {k[:-2] for k in failed} == {"plain", "stream"}, results
    plain = next(v for k, v in failed.items() if k.startswith("plain"))
    assert isinstance(plain, openai.InternalServerError) and "prompt cluster 1" in plain.message
    stream = next(v for k, v in failed.items() if k.startswith("stream"))
    assert "prompt cluster 1" in stream.message
    for _ in range(2):  # the server goes on: to process 0 while process 1 is down
        r = pd_client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == expected
    assert httpx.get(f"{pd_server[0]}/health", timeout=10).json()["status"] == "ok"

    procs[1].stop()
    procs[1] = PromptProcess(zoo.embedded_model_path("llama"), work, "prompt1b", listen=f"127.0.0.1:{port}",
                             cluster_id=1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "re-linked to prompt cluster 1" not in pd_server[1].read_text():
        time.sleep(0.1)
    assert "re-linked to prompt cluster 1" in pd_server[1].read_text()  # in the background, no request lost
    procs[0].kill()  # now only process 1 can answer (a request sent to 0 first finds it dead)
    answers = []
    for _ in range(2):
        try:
            answers.append(pd_client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                                        temperature=0).choices[0].text)
        except openai.InternalServerError as e:
            assert "prompt cluster 0" in e.message
    assert answers and answers[-1] == expected


@pytest.mark.parametrize("peers, message", [(["localhost"], "expects [ID=]HOST:PORT, got 'localhost'"),
                                            (["1=a:1", "1=b:2"], "prompt cluster id 1 is given twice")])
def test_bad_pd_peers_are_refused_before_loading(peers, message):
    args = [a for p in peers for a in ("--pd-peer", p)]
    out = subprocess.run([sys.executable, "-m", "zoo.serve", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and message in out.stderr and "loaded" not in out.stderr
