"""Engine behaviour on a tiny random-weight Llama: stop rules, waves of requests beyond the slot
count, sampling, streaming, and bad input that leaves the model usable."""
import pytest
import torch

import zoo
from zoo import RequestError

PROMPTS = [[3, 17, 42, 99, 7], [5, 9], [100, 101, 102, 103, 104, 105, 106, 107, 108]]


@pytest.fixture(scope="module")
def model(checkpoint):
    return zoo.load(checkpoint("llama3_gqa"), max_batch_size=2, max_seq_len=64)


def solo(model, prompt, **kw):
    return model.generate(prompt, **kw).token_ids


def test_more_prompts_than_slots_run_in_waves_with_solo_results(model):
    prompts = PROMPTS * 2  # 6 requests, 2 slots
    outs = model.generate(prompts, max_new_tokens=12)
    assert [o.index for o in outs] == list(range(6))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == solo(model, prompt, max_new_tokens=12)
    assert model.engine.cache.num_free() == 2 and not model.engine.running


def test_stop_token_ids_and_max_new_tokens(model):
    full = solo(model, PROMPTS[0], max_new_tokens=20)
    stop_at = full[5]
    first = full.index(stop_at)
    out = model.generate(PROMPTS[0], max_new_tokens=20, stop_token_ids=[stop_at])
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop"
    out = model.generate(PROMPTS[0], max_new_tokens=3)
    assert out.token_ids == full[:3] and out.finish_reason == "length"


def test_context_end_finishes_with_length(model):
    prompt = list(range(1, 60))  # 59 tokens, max_seq_len 64
    out = model.generate(prompt, max_new_tokens=50)
    assert len(out.token_ids) == 64 - 59 and out.finish_reason == "length"


def test_rows_of_different_lengths_finish_independently(model):
    outs = model.generate(PROMPTS[:2], max_new_tokens=7)
    assert all(len(o.token_ids) == 7 for o in outs)
    out_short = model.generate(PROMPTS[:2], max_new_tokens=2)
    assert [o.token_ids for o in out_short] == [o.token_ids[:2] for o in outs]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    a = model.generate(PROMPTS, **kw)
    b = model.generate(PROMPTS[::-1], **kw)[::-1]
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    c = model.generate(PROMPTS[0], **{**kw, "seed": 99})
    greedy = solo(model, PROMPTS[0], max_new_tokens=16)
    assert c.token_ids != a[0].token_ids or a[0].token_ids != greedy  # sampling actually samples


def test_top_k_1_is_greedy(model):
    out = model.generate(PROMPTS[1], max_new_tokens=16, temperature=1.5, top_k=1, seed=0)
    assert out.token_ids == solo(model, PROMPTS[1], max_new_tokens=16)


def test_sampling_respects_top_k():
    from zoo.engine.sampling import sample

    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    top3 = logits.topk(3).indices
    for _ in range(20):
        noise = torch.empty(4, 100).exponential_()
        tok = sample(logits, torch.full((4,), 2.0), torch.full((4,), 3), torch.ones(4), noise)
        assert all(tok[i] in top3[i] for i in range(4))
    # top_p tiny keeps only the most likely token
    tok = sample(logits, torch.ones(4), torch.full((4,), 100), torch.full((4,), 1e-6), torch.empty(4, 100).exponential_())
    assert torch.equal(tok, logits.argmax(-1))


def test_stream_pieces_add_up_to_the_result(model):
    stream = model.stream(PROMPTS, max_new_tokens=10)
    got = {i: [] for i in range(3)}
    finish = {}
    for ev in stream:
        got[ev.index] += ev.token_ids
        if ev.finish_reason:
            finish[ev.index] = ev.finish_reason
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert [got[i] for i in range(3)] == [r.token_ids for r in stream.results]
    assert stream.results[0].token_ids == solo(model, PROMPTS[0], max_new_tokens=10)


def test_closing_a_stream_early_frees_its_slots(model):
    stream = model.stream(PROMPTS, max_new_tokens=30)
    next(stream)
    stream.close()
    assert model.engine.cache.num_free() == 2 and not model.engine.running and not model.engine.waiting
    assert [r.finish_reason for r in stream.results] == ["error"] * 3
    assert solo(model, PROMPTS[0], max_new_tokens=4) == solo(model, PROMPTS[0], max_new_tokens=8)[:4]


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[]], {}, r"prompt 0 is empty"),
    ([[1, 2], list(range(1, 65))], {}, r"prompt 1 has 64 tokens, but max_seq_len is 64"),
    ([[1, 2, 999]], {}, r"token ids outside \[0, 256\): \[999\]"),
    ([[1, 2]], {"temperature": -1.0}, r"temperature must be a finite number >= 0"),
    ([[1, 2]], {"temperature": float("nan")}, r"temperature must be a finite number >= 0"),
    ([[1, 2]], {"temperature": 1.0, "top_k": -2}, r"top_k must be an int >= 1 \(0 or -1: off\)"),
    ([[1, 2]], {"temperature": 1.0, "seed": 2**64}, r"seed must be an int in \[-2\*\*63, 2\*\*63 - 1\]"),
    ([[1, 2]], {"stop_token_ids": [-1]}, r"stop_token_ids must be token ids"),
    ([[1, 2]], {"max_new_tokens": 0}, r"max_new_tokens must be an int >= 1"),
    ([[1, 2]], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ([[1, 2]], {"stop": ["x"]}, r"stop strings need a tokenizer"),
    (["some text"], {}, r"has no tokenizer files"),
    ([], {}, r"no prompts given"),
    ([[1.5]], {}, r"must be a string or a list of token ids"),
])
def test_bad_requests_raise_clear_errors_and_leave_the_model_usable(model, prompts, kwargs, message):
    before = solo(model, PROMPTS[2], max_new_tokens=6)
    with pytest.raises(RequestError, match=message):
        model.generate(prompts, max_new_tokens=kwargs.pop("max_new_tokens", 5), **kwargs)
    assert not model.engine.waiting and not model.engine.running
    assert solo(model, PROMPTS[2], max_new_tokens=6) == before


def test_failure_inside_a_step_fails_the_requests_and_the_engine_recovers(model, monkeypatch):
    expected = solo(model, PROMPTS[0], max_new_tokens=6)
    runner = model.engine.runner
    real_decode = runner.decode
    calls = {"n": 0}

    def flaky_decode(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real_decode(*args)

    monkeypatch.setattr(runner, "decode", flaky_decode)
    with pytest.raises(RuntimeError, match="simulated device failure"):
        model.generate(PROMPTS, max_new_tokens=6)
    assert model.engine.cache.num_free() == 2 and not model.engine.running
    assert solo(model, PROMPTS[0], max_new_tokens=6) == expected


def test_kv_export_import_round_trip(model):
    """A request's KV moved to another slot continues identically (the basis of PD hand-over)."""
    eng = model.engine
    prompt = PROMPTS[2]
    expected = solo(model, prompt, max_new_tokens=5)
    a, b = eng.cache.alloc(), eng.cache.alloc()
    try:
        first = eng.runner.prefill([prompt], [a]).argmax(-1)
        ks, vs = eng.cache.export_slot(a, len(prompt))
        assert ks[0].shape == (2, len(prompt), 16)
        eng.cache.import_slot(b, ks, vs)
        B = eng.runner.buckets.batch_for(b + 1)
        ids = torch.zeros(B, 1, dtype=torch.long)
        pos = torch.full((B,), eng.cache.scratch_position)
        tokens = [first.item()]
        for step in range(4):
            ids[b, 0], pos[b] = tokens[-1], len(prompt) + step
            tokens.append(eng.runner.decode(ids, pos)[b].argmax().item())
    finally:
        eng.cache.free(a)
        eng.cache.free(b)
    assert tokens == expected


def _drain(engine, requests):
    while not all(r.finished for r in requests):
        engine.step()
    return [r.output_ids for r in requests]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_p=0.9, seed=11)])
def test_kv_hand_over_between_engines_matches_colocated(checkpoint, sampling):
    """PROMPT engine prefills and exports real-token KV; DECODER engine (fewer slots than requests)
    merges each into a slot and decodes: tokens equal running everything in one engine."""
    from zoo.engine.sampling import SamplingParams

    path = checkpoint("llama3_gqa")
    prompt_side = zoo.load(path, max_batch_size=2, max_seq_len=64)
    decoder_side = zoo.load(path, max_batch_size=2, max_seq_len=64)
    colocated = zoo.load(path, max_batch_size=2, max_seq_len=64)
    prompts = PROMPTS * 2
    params = SamplingParams(max_new_tokens=10, **sampling)
    expected = [colocated.generate(p, max_new_tokens=10, **sampling).token_ids for p in prompts]

    eng = decoder_side.engine
    requests = []
    for i, p in enumerate(prompts):
        prefilled = prompt_side.engine.prefill_only([prompt_side.engine.make_request(i, p, params)])[0]
        assert prefilled.nbytes == 2 * 2 * len(p) * 2 * 16 * 4  # k+v x layers x real tokens x KV x hd x fp32
        req = eng.make_request(i, p, params)
        eng.submit_prefilled(req, prefilled)
        requests.append(req)
        eng.step()  # requests arrive while others decode
    assert _drain(eng, requests) == expected
    assert prompt_side.engine.cache.num_free() == 2 and eng.cache.num_free() == 2


def test_requests_arriving_over_time_match_solo_runs(model):
    from zoo.engine.sampling import SamplingParams

    eng = model.engine
    prompts = [PROMPTS[i % 3] + [i] for i in range(7)]
    solo_tokens = [solo(model, p, max_new_tokens=6 + i) for i, p in enumerate(prompts)]
    requests = []
    for i, p in enumerate(prompts):
        requests.append(eng.make_request(i, p, SamplingParams(max_new_tokens=6 + i)))
        eng.submit([requests[-1]])
        eng.step()
        eng.step()
    assert _drain(eng, requests) == solo_tokens


def test_integer_parameters_are_bounded_before_torch(model):
    """top_k past the vocabulary (even past int64) is the whole vocabulary; 0 and -1 switch it off,
    as in vLLM; a seed at the int64 edges works."""
    kw = dict(max_new_tokens=6, temperature=0.8, seed=7)
    whole = model.generate(PROMPTS[0], **kw).token_ids
    for top_k in (2**63, 10**20, 0, -1, 256):
        assert model.generate(PROMPTS[0], top_k=top_k, **kw).token_ids == whole, top_k
    for seed in (-(2**63), 2**63 - 1):
        assert len(model.generate(PROMPTS[0], max_new_tokens=3, temperature=1.0, seed=seed).token_ids) == 3


def _failing_for(runner, method: str, bad_prompt: list[int], monkeypatch):
    """runner.<method> raises when a batch holds bad_prompt (prefill) / on its first call (decode)."""
    real = getattr(runner, method)
    state = {"failed": False}

    def flaky(*args, **kwargs):
        if method == "prefill" and bad_prompt in args[0]:
            raise RuntimeError("injected prefill failure")
        if method == "decode" and not state["failed"]:
            state["failed"] = True
            raise RuntimeError("injected decode failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, method, flaky)


def test_a_failed_prefill_fails_only_its_requests(model, monkeypatch):
    """A request being decoded keeps running and gets its solo tokens; the prefill that raised fails
    exactly its own requests, with the error, and nothing is left queued or holding a slot."""
    eng = model.engine
    expected = solo(model, PROMPTS[0], max_new_tokens=10)
    bad = [7, 7, 7]
    _failing_for(eng.runner, "prefill", bad, monkeypatch)
    running = eng.make_request(0, PROMPTS[0], zoo.engine.SamplingParams(max_new_tokens=10))
    eng.submit([running])
    eng.step()  # prefill of the good request
    assert running.slot is not None
    doomed = eng.make_request(0, bad, zoo.engine.SamplingParams(max_new_tokens=10))
    eng.submit([doomed])
    while eng.has_work():
        eng.step()
    assert doomed.finish_reason == "error" and "injected prefill failure" in doomed.error
    assert running.finish_reason == "length" and running.output_ids == expected
    assert eng.cache.num_free() == 2 and not eng.running and not eng.waiting
    assert eng.failed_steps >= 1


def test_a_failed_decode_fails_the_running_requests_and_not_the_waiting_ones(model, monkeypatch):
    eng = model.engine
    expected = solo(model, PROMPTS[2], max_new_tokens=5)
    _failing_for(eng.runner, "decode", [], monkeypatch)
    first = [eng.make_request(i, p, zoo.engine.SamplingParams(max_new_tokens=5)) for i, p in enumerate(PROMPTS[:2])]
    eng.submit(first)
    eng.step()  # prefill both (2 slots)
    later = eng.make_request(0, PROMPTS[2], zoo.engine.SamplingParams(max_new_tokens=5))
    eng.submit([later])
    while eng.has_work():
        eng.step()
    assert all(r.finish_reason == "error" and "injected decode failure" in r.error for r in first)
    assert later.finish_reason == "length" and later.output_ids == expected
    assert eng.cache.num_free() == 2


def test_admission_takes_turns_between_submissions(model):
    """One call with many prompts does not hold every slot: a request submitted after it is admitted
    as soon as a slot frees, before the big call's remaining prompts, and all get solo tokens."""
    eng = model.engine
    params = zoo.engine.SamplingParams(max_new_tokens=4)
    big = [eng.make_request(i, PROMPTS[i % 3], params) for i in range(6)]
    small = eng.make_request(0, PROMPTS[1], params)
    eng.submit(big)
    eng.step()  # the big call takes both slots
    eng.submit([small])
    admitted_at = {}  # request -> the step that gave it its first token
    step = 0
    while eng.has_work():
        eng.step()
        step += 1
        for r in big + [small]:
            if r.t_first is not None and id(r) not in admitted_at:
                admitted_at[id(r)] = step
    # in the first admission after the big call's first two: with the third of it, not after all six
    assert admitted_at[id(small)] <= admitted_at[id(big[2])] < admitted_at[id(big[3])]
    for r in big + [small]:
        assert r.output_ids == solo(model, r.prompt_ids, max_new_tokens=4)


def test_prefill_token_cap_splits_groups_and_the_streams_decode_between_them(checkpoint, model):
    """buckets.prefill_tokens = 32: four 10-14 token prompts (padded to 16) are admitted two at a
    time ([2, 16] = 32 tokens), a decode step runs between the two groups, and every request gets its
    solo tokens; a single prompt longer than the cap is prefilled in chunks of 32 with the same
    tokens; runner.prefill splits a group given to it directly (the PD prompt side's path)."""
    from zoo.graphs import Buckets

    capped = zoo.load(checkpoint("llama3_gqa"), max_batch_size=4, max_seq_len=64,
                      buckets=Buckets((1, 2, 4), (16, 32, 64), prefill_tokens=32))
    eng, calls = capped.engine, []
    real_prefill, real_decode = eng.runner._prefill, eng.runner._decode
    eng.runner._prefill = lambda ids, *a: calls.append(tuple(ids.shape)) or real_prefill(ids, *a)
    eng.runner._decode = lambda ids, *a, **k: calls.append("decode") or real_decode(ids, *a, **k)
    prompts = [list(range(1 + i, 11 + i + i)) for i in range(4)]  # 10, 11, 12, 13 tokens
    params = zoo.engine.SamplingParams(max_new_tokens=5)
    requests = [eng.make_request(i, p, params) for i, p in enumerate(prompts)]
    eng.submit(requests)
    assert _drain(eng, requests) == [solo(model, p, max_new_tokens=5) for p in prompts]
    assert calls[:3] == [(2, 16), "decode", (2, 16)]
    calls.clear()
    long_prompt = list(range(40))
    assert solo(capped, long_prompt, max_new_tokens=3) == solo(model, long_prompt, max_new_tokens=3)
    assert calls[:2] == [(1, 32), (1, 16)]  # positions [0, 32), then [32, 40)
    calls.clear()
    slots = [eng.cache.alloc() for _ in prompts]
    try:
        together = eng.runner.prefill(prompts, slots)
        assert calls == [(2, 16), (2, 16)]
        alone = torch.cat([eng.runner.prefill([p], [s]) for p, s in zip(prompts, slots)])
    finally:
        for s in slots:
            eng.cache.free(s)
    assert (together - alone).abs().max().item() <= 1e-5
