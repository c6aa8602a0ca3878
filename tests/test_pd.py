"""zoo.pd: separated prefill / decode across two processes on loopback.

The prompt role runs in a subprocess (`python -m zoo.pd --role prompt`); the decoder runs in the
test process. CPU, float32, a tiny random-weight Llama (GQA). Every wait is bounded; ports are
picked by the kernel (listen on port 0, the subprocess reports the one it got in a ready file).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import zoo
from zoo.pd import LLMEngine, LLMException, LLMReq, LLMRole, LLMStatusCode
from zoo.pd.cli import wait_ready

MAX_SEQ = 64
LAYERS, KV_HEADS, HEAD_DIM, FP32 = 2, 2, 16, 4  # the llama3_gqa test checkpoint
KV_TTL = 2.0  # the shared prompt process's TTL: long enough for pulls, short enough to test expiry
PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(n)] for i, n in enumerate([3, 11, 5, 29, 17, 40, 8])]


def real_kv_bytes(prompt_len: int) -> int:
    """k and v, every layer, [KV, prompt_len, hd] in fp32: the prompt's real tokens only."""
    return 2 * LAYERS * KV_HEADS * prompt_len * HEAD_DIM * FP32


class PromptProcess:
    """`python -m zoo.pd --role prompt` in a subprocess, stopped / paused / killed on demand."""

    def __init__(self, model_path: str, workdir, name: str, listen: str = "127.0.0.1:0", cluster_id: int = 0,
                 kv_ttl: float = KV_TTL):
        self.ready = os.path.join(str(workdir), f"{name}.ready.json")
        if os.path.exists(self.ready):
            os.remove(self.ready)
        self.log = open(os.path.join(str(workdir), f"{name}.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zoo.pd", "--role", "prompt", "--listen", listen, "--ready-file", self.ready,
             "--model-path", model_path, "--cluster-id", str(cluster_id), "--max-batch-size", "4",
             "--max-seq-len", str(MAX_SEQ), "--kv-ttl", str(kv_ttl), "--sync-kv-timeout", "5",
             "--link-timeout", "5", "--threads", "1"], stdout=self.log, stderr=subprocess.STDOUT)
        self.info = wait_ready(self.ready, self.proc, timeout=60)
        self.address = self.info["address"]

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL works on a stopped process too
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("llama3_gqa")


@pytest.fixture(scope="module")
def prompt_proc(ckpt, tmp_path_factory):
    p = PromptProcess(ckpt, tmp_path_factory.mktemp("pd"), "prompt0")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def colocated_model(ckpt):
    return zoo.load(ckpt, max_batch_size=2, max_seq_len=MAX_SEQ)


@pytest.fixture(scope="module")
def colocated(colocated_model):
    """The reference: every request run alone, prefill and decode in one engine."""
    model = colocated_model
    memo = {}

    def run(prompt, max_new_tokens, **sampling):
        key = (tuple(prompt), max_new_tokens, tuple(sorted(sampling.items())))
        if key not in memo:
            memo[key] = model.generate(prompt, max_new_tokens=max_new_tokens, **sampling).token_ids
        return memo[key]

    return run


def make_decoder(ckpt, slots: int = 2, **options) -> LLMEngine:
    model = zoo.load(ckpt, max_batch_size=slots, max_seq_len=MAX_SEQ)
    engine = LLMEngine(LLMRole.DECODER, 1, model)
    engine.init({"sync_kv_timeout": 10, "prefill_timeout": 30, **options})
    return engine


@pytest.fixture
def decoder(ckpt, prompt_proc):
    d = make_decoder(ckpt)  # 2 slots: fewer than the requests of most tests
    d.link(0, prompt_proc.address)
    yield d
    d.finalize()


def drain(d: LLMEngine, requests) -> list:
    for _ in d.drive(requests):
        pass
    return [r.result() for r in requests]


def test_disaggregated_tokens_match_colocated_for_requests_arriving_over_time(decoder, prompt_proc, colocated):
    """7 prompts of 3..40 tokens arrive one by one while others decode, through 2 decoder slots
    (the prompt side has 4): greedy tokens equal colocated solo runs, and exactly the real tokens'
    KV bytes crossed the transport."""
    requests = []
    for i, p in enumerate(PROMPTS):
        requests += decoder.submit([LLMReq(100 + i, p, max_new_tokens=6 + i)])
        for _ in range(3):
            decoder.poll(0.01)  # requests keep arriving while the earlier ones decode
    results = drain(decoder, requests)
    assert [r.finish_reason for r in results] == ["length"] * len(PROMPTS), [r.error for r in results]
    assert [r.token_ids for r in results] == [colocated(p, 6 + i) for i, p in enumerate(PROMPTS)]
    # bytes counted inside the transport: the prompts' real tokens, not max_seq_len slots
    assert decoder.kv_transfers == len(PROMPTS)
    assert decoder.kv_bytes_received == sum(real_kv_bytes(len(p)) for p in PROMPTS)
    status = decoder.check_link_status(0)
    assert status["ok"] and status["held"] == 0  # every pulled KV was released on the prompt side
    assert decoder.model.engine.cache.num_free() == 2


def test_seeded_sampling_matches_colocated(decoder, colocated):
    """The prompt side samples the first token with the request's seed; the decoder continues the
    same random stream, so seeded sampling is reproducible across the split."""
    sampling = dict(temperature=0.8, top_k=40, top_p=0.95, seed=11)
    reqs = [LLMReq(200 + i, p, max_new_tokens=10, **sampling) for i, p in enumerate(PROMPTS[:3])]
    results = decoder.generate(reqs)
    assert [r.token_ids for r in results] == [colocated(p, 10, **sampling) for p in PROMPTS[:3]]


def _same_logprobs(got, want) -> bool:
    """Lists of TokenLogprob (or None): the same tokens and alternatives, the same logprobs to 1e-4."""
    if got is None or want is None:
        return got is want
    return len(got) == len(want) and all(
        (a is None and b is None) or (a is not None and b is not None and a.token_id == b.token_id
                                      and a.logprob == pytest.approx(b.logprob, abs=1e-4)
                                      and [t for t, _ in a.top] == [t for t, _ in b.top]
                                      and [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4))
        for a, b in zip(got, want))


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.05, seed=7)],
                         ids=["greedy", "seeded"])
def test_penalties_bias_min_tokens_and_logprobs_cross_the_split(decoder, colocated_model, sampling):
    """The new sampling fields travel to the prompt side (which samples the first token with them)
    and back with a router-style pull; the first token's logprob and the prompt logprobs come back
    with the KV. Tokens and logprobs equal a colocated run's."""
    params = dict(max_new_tokens=8, presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.3,
                  logit_bias={5: 4.0, 17: -100.0}, **sampling)
    # min_tokens keeps this stop token, which would otherwise be the first one, from ending it at once
    stop = colocated_model.generate(PROMPTS[1], **{**params, "max_new_tokens": 1}).token_ids[0]
    params.update(min_tokens=3, stop_token_ids=[stop], logprobs=3, prompt_logprobs=2)
    prompts = [PROMPTS[1], PROMPTS[3]]
    results = decoder.generate([LLMReq(1000 + i, p, **params) for i, p in enumerate(prompts)])
    pulled_later = decoder.remote_prefill([LLMReq(1010, PROMPTS[1], **params)])[0]  # no prompt or sampling
    assert pulled_later.ok                                                         # given to the pull
    results.append(drain(decoder, [decoder.pull_and_merge(LLMReq(1010))])[0])
    for got, prompt in zip(results, prompts + [PROMPTS[1]]):
        want = colocated_model.generate(prompt, **params)
        assert got.finish_reason == want.finish_reason and got.error is None
        assert got.token_ids == want.token_ids and len(got.token_ids) >= 3
        assert len(got.logprobs) == len(got.token_ids) and all(len(t.top) == 3 for t in got.logprobs)
        assert _same_logprobs(got.logprobs, want.logprobs)
        assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(prompt)
        assert _same_logprobs(got.prompt_logprobs, want.prompt_logprobs)


def test_pull_kv_and_merge_into_a_chosen_batch_slot(decoder, colocated):
    """Step by step, as in the seed: prefill (here on behalf of a router), pull by req id with no
    prompt given (the prompt side sends ids and sampling along), merge into batch_index."""
    a, b = PROMPTS[1], PROMPTS[3]
    prefilled = decoder.remote_prefill([LLMReq(300, a, max_new_tokens=7), LLMReq(301, b, max_new_tokens=7)])
    assert [(r.ok, r.prompt_len, r.nbytes) for r in prefilled] == [
        (True, len(a), real_kv_bytes(len(a))), (True, len(b), real_kv_bytes(len(b)))]
    pulled = decoder.pull_kv(LLMReq(300))
    assert pulled.prompt_ids == a and pulled.nbytes == real_kv_bytes(len(a))
    assert [tuple(k.shape) for k in pulled.prefilled.k] == [(KV_HEADS, len(a), HEAD_DIM)] * LAYERS
    r300 = decoder.merge_kv(LLMReq(300), batch_index=1)
    assert r300.slot == 1
    decoder.pull_kv(LLMReq(301))
    with pytest.raises(LLMException) as busy:
        decoder.merge_kv(LLMReq(301), batch_index=1)
    assert busy.value.status_code is LLMStatusCode.LLM_PARAM_INVALID and "in use" in str(busy.value)
    r301 = decoder.merge_kv(LLMReq(301, b), batch_index=0)
    assert r301.slot == 0
    results = drain(decoder, [r300, r301])
    assert [r.token_ids for r in results] == [colocated(a, 7), colocated(b, 7)]


def test_unknown_repeated_and_misdirected_calls_fail_clearly(decoder, ckpt, prompt_proc):
    with pytest.raises(LLMException) as unknown:
        decoder.pull_kv(LLMReq(987654321))
    assert unknown.value.status_code is LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    assert "987654321" in str(unknown.value) and "never prefilled" in str(unknown.value)

    decoder.remote_prefill([LLMReq(400, PROMPTS[0])])
    decoder.pull_kv(LLMReq(400))
    r400 = decoder.merge_kv(LLMReq(400))
    with pytest.raises(LLMException) as again:
        decoder.pull_kv(LLMReq(400))
    assert again.value.status_code is LLMStatusCode.LLM_KV_CACHE_NOT_EXIST and "pulled by decoder" in str(again.value)
    with pytest.raises(LLMException) as not_pulled:
        decoder.merge_kv(LLMReq(401))
    assert not_pulled.value.status_code is LLMStatusCode.LLM_KV_CACHE_NOT_EXIST

    bad = decoder.remote_prefill([LLMReq(402, [])])[0]  # refused by the prompt side, the link stays up
    assert not bad.ok and bad.status is LLMStatusCode.LLM_PARAM_INVALID and "empty" in bad.message
    with pytest.raises(LLMException) as twice:
        decoder.link(0, prompt_proc.address)
    assert twice.value.status_code is LLMStatusCode.LLM_ALREADY_LINK
    with pytest.raises(LLMException) as nolink:
        decoder.submit([LLMReq(403, PROMPTS[0], prompt_cluster_id=9)])
    assert nolink.value.status_code is LLMStatusCode.LLM_NOT_YET_LINK
    with pytest.raises(LLMException, match="unknown option 'sync_kv_timeot'"):
        LLMEngine(LLMRole.DECODER, 5, decoder.model).init({"sync_kv_timeot": 1})
    with pytest.raises(LLMException, match="DECODER call"):
        LLMEngine(LLMRole.PROMPT, 5, decoder.model).pull_kv(LLMReq(1))
    other = zoo.load(ckpt, max_batch_size=1, max_seq_len=MAX_SEQ, dtype="bfloat16")
    with pytest.raises(LLMException, match="different model or dtype"):
        d2 = LLMEngine(LLMRole.DECODER, 6, other)
        d2.init({})
        d2.link(0, prompt_proc.address)
    assert drain(decoder, [r400])[0].finish_reason == "length"  # none of this disturbed request 400


@pytest.mark.parametrize("frame", [b'{"op": "hello", "proto": ' + b"9" * 5000 + b"}", b"[" * 100000 + b"]" * 100000,
                                   b"\xff\xfe not utf-8", b"[1, 2]"], ids=["5000_digit_int", "too_deep", "not_utf8",
                                                                          "not_an_object"])
def test_a_malformed_control_frame_gets_a_protocol_error(prompt_proc, frame, decoder):
    """The prompt role answers a frame it cannot read with an error reply and closes that
    connection; no traceback, and linked decoders go on."""
    import socket

    from zoo.pd.protocol import recv_msg

    host, port = prompt_proc.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(len(frame).to_bytes(4, "big") + frame)
        reply = recv_msg(sock)
    assert reply["ok"] is False and reply["status"] == "LLM_LINK_FAILED" and "protocol error: frame" in reply["message"]
    prompt_proc.log.flush()
    with open(prompt_proc.log.name, encoding="utf-8") as f:
        assert "Traceback" not in f.read()
    assert drain(decoder, decoder.submit([LLMReq(500 + len(frame) % 97, PROMPTS[1], max_new_tokens=3)]))[0].finish_reason


def test_the_decoder_waits_for_a_prompt_process_that_is_still_starting(ckpt, colocated, tmp_path):
    """The README's two-process recipe: the decoder may try to link before the prompt process
    listens; it retries until link_timeout instead of failing with 'Connection refused'."""
    import threading

    from zoo.distributed.comm import free_port

    port = free_port()
    started = []
    late = threading.Timer(0.5, lambda: started.append(
        PromptProcess(ckpt, tmp_path, "late", listen=f"127.0.0.1:{port}", cluster_id=3)))
    late.start()
    d = make_decoder(ckpt, link_timeout=90)
    try:
        d.link(3, f"127.0.0.1:{port}")  # refused at first: the prompt process is still loading
        out = drain(d, d.submit([LLMReq(600, PROMPTS[2], max_new_tokens=4, prompt_cluster_id=3)]))[0]
        assert out.token_ids == colocated(PROMPTS[2], 4)
    finally:
        d.finalize()
        late.join()
        for proc in started:
            proc.stop()


def test_unpulled_kv_is_released_after_its_ttl(decoder):
    decoder.remote_prefill([LLMReq(500, PROMPTS[2])])
    t0 = time.monotonic()
    assert decoder.check_link_status(0)["held"] >= 1
    while decoder.check_link_status(0)["held"] and time.monotonic() - t0 < KV_TTL + 10:
        time.sleep(0.1)
    assert decoder.check_link_status(0)["held"] == 0
    assert time.monotonic() - t0 >= KV_TTL * 0.5  # not released early (t0 is a little after the prefill)
    with pytest.raises(LLMException) as gone:
        decoder.pull_kv(LLMReq(500))
    assert gone.value.status_code is LLMStatusCode.LLM_KV_CACHE_NOT_EXIST and "TTL" in str(gone.value)


def test_continuous_batching_mixes_local_and_disaggregated_requests(decoder, colocated):
    """Requests prefilled remotely and requests prefilled locally share the decoder's 2 slots;
    each one's tokens equal its solo run."""
    pd = decoder.submit([LLMReq(600 + i, p, max_new_tokens=9) for i, p in enumerate(PROMPTS[:3])])
    local = decoder.model.generate(PROMPTS[3:6], max_new_tokens=9)  # steps the shared engine meanwhile
    assert [r.token_ids for r in local] == [colocated(p, 9) for p in PROMPTS[3:6]]
    assert [r.token_ids for r in drain(decoder, pd)] == [colocated(p, 9) for p in PROMPTS[:3]]


def test_prompt_process_hang_death_and_restart(ckpt, prompt_proc, colocated, tmp_path):
    """Prompt cluster 2 stops answering, then dies, then restarts on the same port. Its requests
    fail with a clear error within the timeout; cluster 0's requests and the ones already decoding
    are unaffected; after the restart the decoder re-links and serves cluster 2 again."""
    timeout = 2.0
    d = make_decoder(ckpt, sync_kv_timeout=timeout, prefill_timeout=timeout, link_timeout=timeout)
    p2 = PromptProcess(ckpt, tmp_path, "prompt2", cluster_id=2)
    try:
        d.link(0, prompt_proc.address)
        d.link(2, p2.address)
        first = d.generate([LLMReq(700, PROMPTS[0], max_new_tokens=5, prompt_cluster_id=2)])[0]
        assert first.token_ids == colocated(PROMPTS[0], 5)

        # 1. cluster 2 hangs (SIGSTOP) while requests are on their way to it
        decoding = d.submit([LLMReq(710 + i, p, max_new_tokens=30, prompt_cluster_id=0)
                             for i, p in enumerate(PROMPTS[:2])])
        deadline = time.monotonic() + 30
        while not all(r.slot is not None for r in decoding) and time.monotonic() < deadline:
            d.poll(0.01)  # until both are merged and decoding
        for r in decoding:
            r.events.clear()  # so that every event timed below was produced after the stall began
        p2.pause()
        t_hang = time.perf_counter()
        hung = d.submit([LLMReq(720 + i, p, max_new_tokens=5, prompt_cluster_id=2) for i, p in enumerate(PROMPTS[2:4])])
        others = d.submit([LLMReq(730 + i, p, max_new_tokens=5, prompt_cluster_id=0)
                           for i, p in enumerate(PROMPTS[4:6])])
        event_times = [(time.perf_counter(), ev.index) for ev in d.drive(decoding + hung + others)]
        for r in hung:
            assert r.finish_reason == "error" and "did not answer" in r.error and "prompt cluster 2" in r.error
            assert r.t_done - t_hang < timeout + 5
        assert [r.result().token_ids for r in decoding] == [colocated(p, 30) for p in PROMPTS[:2]]
        assert [r.result().token_ids for r in others] == [colocated(p, 5) for p in PROMPTS[4:6]]
        # the engine kept stepping while cluster 2 was silent: cluster 0's requests produced tokens
        # between the stall and the moment the hung requests gave up
        stall_end = min(r.t_done for r in hung)
        served = [i for t, i in event_times if t_hang < t < stall_end and i not in (720, 721)]
        assert len(served) >= 3, event_times

        # 2. it dies (SIGKILL) while a re-link attempt waits on its handshake
        dying = d.submit([LLMReq(740, PROMPTS[2], max_new_tokens=5, prompt_cluster_id=2)])
        time.sleep(0.3)
        t_kill = time.perf_counter()
        p2.kill()
        drain(d, dying)
        assert dying[0].finish_reason == "error" and "prompt cluster 2" in dying[0].error
        assert dying[0].t_done - t_kill < timeout + 5
        dead = d.generate([LLMReq(741, PROMPTS[2], prompt_cluster_id=2)])[0]
        assert dead.finish_reason == "error" and "cannot connect" in dead.error
        assert not d.check_link_status(2)["ok"]

        # 3. restarted on the same address: the next request re-links by itself ...
        port = p2.address.rsplit(":", 1)[1]
        p2.stop()
        p2 = PromptProcess(ckpt, tmp_path, "prompt2b", listen=f"127.0.0.1:{port}", cluster_id=2)
        back = d.generate([LLMReq(750 + i, p, max_new_tokens=6, prompt_cluster_id=2)
                           for i, p in enumerate(PROMPTS[2:5])])
        assert [r.token_ids for r in back] == [colocated(p, 6) for p in PROMPTS[2:5]]
        # ... and an explicit unlink + link works as well
        d.unlink(2)
        d.link(2, p2.address)
        assert d.check_link_status(2)["ok"]
        again = d.generate([LLMReq(760, PROMPTS[6], max_new_tokens=6, prompt_cluster_id=2)])[0]
        assert again.token_ids == colocated(PROMPTS[6], 6)
    finally:
        d.finalize()
        p2.stop()


def test_decoder_cli_stdin_mode(ckpt, prompt_proc, colocated):
    """`python -m zoo.pd --role decoder --stdin`: JSON lines in, one JSON line per stream event out."""
    lines = [json.dumps({"req_id": 800, "prompt": PROMPTS[1], "max_new_tokens": 6}),
             json.dumps({"req_id": 801, "prompt": PROMPTS[4], "max_new_tokens": 4}),
             json.dumps({"req_id": 802, "prompt": [], "max_new_tokens": 4})]
    out = subprocess.run([sys.executable, "-m", "zoo.pd", "--role", "decoder", "--peer", prompt_proc.address,
                          "--model-path", ckpt, "--max-batch-size", "1", "--max-seq-len", str(MAX_SEQ), "--stdin",
                          "--threads", "1"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    tokens = {}
    for e in events:
        if "req_id" in e:
            tokens.setdefault(e["req_id"], []).extend(e["token_ids"])
    assert tokens == {800: colocated(PROMPTS[1], 6), 801: colocated(PROMPTS[4], 4)}, out.stderr
    assert [e for e in events if "line" in e and "empty" in e["error"]]  # the bad line is reported ...
    assert out.returncode == 1  # ... and makes the exit status non-zero


def test_prompt_side_api_router_mode(ckpt, colocated):
    """In one process: a PROMPT engine prefills on a router's behalf (keyed by req id), refuses a
    repeated id and what exceeds max_held_bytes, releases on request; a decoder pulls the rest."""
    prompt = LLMEngine(LLMRole.PROMPT, 3, zoo.load(ckpt, max_batch_size=2, max_seq_len=MAX_SEQ))
    prompt.init({"listen": "127.0.0.1:0", "kv_ttl": 30, "max_held_bytes": real_kv_bytes(30)})
    d = make_decoder(ckpt, slots=1)
    try:
        a, b = PROMPTS[0], PROMPTS[2]  # 3 + 5 tokens fit under the cap; 29 more do not
        results = prompt.prefill([LLMReq(900, a, max_new_tokens=5), LLMReq(901, b, max_new_tokens=5),
                                  LLMReq(900, b), LLMReq(902, PROMPTS[3])])
        assert [r.ok for r in results] == [True, True, False, False]
        assert results[2].status is LLMStatusCode.LLM_REPEAT_REQUEST
        assert results[3].status is LLMStatusCode.LLM_OUT_OF_MEMORY and "max_held_bytes" in results[3].message
        assert prompt.held_req_ids() == [900, 901]
        assert prompt.release(901) and not prompt.release(901)

        d.link(3, prompt.address)
        request = d.pull_and_merge(LLMReq(900, prompt_cluster_id=3))
        assert drain(d, [request])[0].token_ids == colocated(a, 5)
        # the prompt side frees a KV right after sending it, before it reads the link's next call
        assert d.check_link_status(3)["held"] == 0
        assert prompt.held_req_ids() == [] and prompt.status()["kv_bytes_sent"] == real_kv_bytes(len(a))
        with pytest.raises(LLMException, match="released on request"):
            d.pull_kv(LLMReq(901, prompt_cluster_id=3))
    finally:
        d.finalize()
        prompt.finalize()


def test_demo_command(tmp_path):
    """`python -m zoo.pd demo` (the README's command): both roles on loopback, tokens checked."""
    out = subprocess.run([sys.executable, "-m", "zoo.pd", "demo", "--max-new-tokens", "12"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "tokens identical to a colocated run: 4/4" in out.stdout
    assert "--- [0] Beautiful is better than" in out.stdout


def test_sampling_and_logprobs_wire_forms_round_trip_and_are_type_checked():
    """Every SamplingParams field crosses the wire (logit_bias as [id, bias] pairs: JSON keys are
    strings); a field of the wrong type, an unknown or missing one, is a protocol error."""
    from zoo.engine.sampling import SamplingParams, TokenLogprob
    from zoo.pd import protocol as proto
    from zoo.pd.request import logprob_from_wire, logprob_to_wire, sampling_from_wire, sampling_to_wire

    params = SamplingParams(max_new_tokens=9, temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, seed=3, stop=("x",),
                            stop_token_ids=(4,), ignore_eos=True, min_tokens=2, presence_penalty=0.5,
                            frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={7: -100.0, 9: 2.5},
                            logprobs=3, prompt_logprobs=0)
    wire = json.loads(json.dumps(sampling_to_wire(params)))
    assert set(wire) == set(proto.SAMPLING_FIELDS) == set(SamplingParams.__dataclass_fields__)
    assert sampling_from_wire(proto.check_sampling(wire)) == params
    for field, bad in [("logit_bias", {"7": 1.0}), ("logit_bias", [[7, "1"]]), ("logit_bias", [[7, 1], [7, 2]]),
                       ("min_tokens", 1.5), ("presence_penalty", True), ("logprobs", "3"), ("prompt_logprobs", 1.0),
                       ("repetition_penalty", None), ("min_p", float("nan")), ("extra", 1)]:
        with pytest.raises(proto.ProtocolError):
            proto.check_sampling({**wire, field: bad})
    with pytest.raises(proto.ProtocolError):
        proto.check_sampling({k: v for k, v in wire.items() if k != "min_p"})
    token = TokenLogprob(5, -0.25, [(5, -0.25), (8, float("-inf"))])
    sent = json.loads(json.dumps(logprob_to_wire(token), allow_nan=False))  # -inf goes as null
    assert logprob_from_wire(proto.check_logprob(sent, "x")) == token
    for bad in [[5, -0.2], [5, "x", []], [5, -0.2, [[8]]], [True, -0.2, []]]:
        with pytest.raises(proto.ProtocolError):
            proto.check_logprob(bad, "x")
