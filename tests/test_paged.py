"""The paged KV cache: blocks handed out as sequences grow, prefix blocks found again, requests
preempted when the pool runs out and resumed, long prompts prefilled in chunks between decode
steps. Every path is checked against transformers' greedy tokens on the same weights (fp32), and
the compiled graphs against recompiles."""
import tomllib

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

import zoo
from zoo.engine import SamplingParams
from zoo.graphs.block_pool import BlockPool, prefix_keys
from zoo.graphs.compile_config import default_config_path, parse_compile_config
from zoo.graphs.kv_cache import KVCache

MAX_SEQ = 64


def _config(block_size: int, **buckets):
    """The CPU compile config with another block size (and bucket settings)."""
    with open(default_config_path("llama", "cpu"), "rb") as f:
        raw = tomllib.load(f)
    raw["kv_block_size"] = block_size
    raw["buckets"].update(buckets)
    return parse_compile_config(raw, f"llama.cpu.toml, kv_block_size = {block_size}")


def _load(path, block_size=8, compiled=False, **options):
    options.setdefault("max_batch_size", 4)
    return zoo.load(path, max_seq_len=MAX_SEQ, dtype="float32", compiled=compiled,
                    compile_config=_config(block_size, **options.pop("buckets", {})), **options)


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("llama3_gqa")


@pytest.fixture(scope="module")
def reference(path):
    """prompt -> transformers' greedy tokens (fp32), memoized."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    memo = {}

    def greedy(prompt: list[int], new_tokens: int) -> list[int]:
        key = (tuple(prompt), new_tokens)
        if key not in memo:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            memo[key] = out[0, len(prompt):].tolist()
        return memo[key]
    return greedy


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n,), generator=g).tolist()


def _drain(engine, requests):
    while not all(r.finished for r in requests):
        engine.step()
    return [r.output_ids for r in requests]


# ---- the block pool -------------------------------------------------------------------------
def test_block_pool_refcounts_and_evicts_the_least_recently_released_cached_block():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.register(a, ("a",))
    pool.register(b, ("b",))
    pool.acquire(a)  # a second holder
    pool.release(a)
    assert pool.num_available == 0 and pool.lookup(("a",)) == a
    pool.release(b)  # cached, unreferenced: findable and available
    pool.release(a)
    pool.release(c)  # never cached: plainly free
    assert pool.num_available == 3 and pool.lookup(("b",)) == b
    assert pool.allocate() == c  # free blocks go before cached ones
    assert pool.allocate() == b and pool.lookup(("b",)) is None  # b was released first: evicted first
    pool.acquire(a)  # a prefix hit takes a off the evictable list
    with pytest.raises(RuntimeError, match="no free KV block"):
        pool.allocate()
    with pytest.raises(ValueError, match="not referenced"):
        BlockPool(1).release(0)


def test_prefix_keys_chain_the_whole_prefix():
    a = list(prefix_keys([1, 2, 3, 4, 5, 6], 2, 3))
    b = list(prefix_keys([9, 9, 3, 4, 5, 6], 2, 3))
    assert a[0] != b[0] and a[1] != b[1]  # same tokens in block 1, different prefix: a different key
    assert list(prefix_keys([1, 2, 3, 4, 7], 2, 2)) == a[:2]


def test_cache_blocks_follow_the_sequence_and_export_import_round_trips():
    cache = KVCache(1, 2, 2, 20, 4, torch.float32, torch.device("cpu"), block_size=8, num_tokens=24)
    assert (cache.num_blocks, cache.blocks_per_seq, cache.scratch_block, cache.scratch_position) == (3, 3, 3, 24)
    slot, other = cache.alloc(), cache.alloc()
    assert cache.reserve(slot, 9) and cache.capacity(slot) == 16 and cache.free_blocks == 1
    assert cache.reserve(other, 3) and cache.free_blocks == 0
    assert not cache.reserve(slot, 20) and cache.capacity(slot) == 16  # nothing taken when it cannot fit
    cache.k[0].normal_()
    ks, vs = cache.export_slot(slot, 11)
    cache.free(other)
    other = cache.alloc()
    with pytest.raises(RuntimeError, match="not enough free KV blocks for 11 positions"):
        cache.import_slot(other, ks, vs)
    cache.free(slot)
    assert cache.free_blocks == 3 and (cache.block_tables[slot] == cache.scratch_block).all()
    cache.import_slot(other, ks, vs)
    torch.testing.assert_close(cache.export_slot(other, 11)[0][0], ks[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot hold one sequence of max_seq_len=20"):
        KVCache(1, 2, 2, 20, 4, torch.float32, torch.device("cpu"), block_size=8, num_tokens=16)


# ---- the engine on the paged cache ------------------------------------------------------------
def test_requests_crossing_block_boundaries_match_transformers(path, reference):
    """Prompts ending just before, on and just after a block boundary (blocks of 8), decoding
    across several more, in one batch: transformers' greedy tokens."""
    model = _load(path)
    prompts = [_prompt(n, seed=n) for n in (7, 8, 9, 17)]
    outs = model.generate(prompts, max_new_tokens=20)
    assert [o.token_ids for o in outs] == [reference(p, 20) for p in prompts]
    assert model.engine.cache.free_blocks == model.engine.cache.num_blocks  # (cached ones count as free)


def test_more_requests_run_at_once_than_whole_sequences_fit(path, reference):
    """A pool of 2 x max_seq_len tokens runs 8 short requests at the same time (a cache of whole-
    sequence slots would run 2), with transformers' tokens and no preemption."""
    model = _load(path, max_batch_size=8, kv_cache_tokens=2 * MAX_SEQ)
    eng = model.engine
    prompts = [_prompt(6, seed=100 + i) for i in range(8)]
    requests = [eng.make_request(i, p, SamplingParams(max_new_tokens=8)) for i, p in enumerate(prompts)]
    eng.submit(requests)
    peak = 0
    while not all(r.finished for r in requests):
        eng.step()
        peak = max(peak, len(eng.running))
    assert peak == 8 and eng.preemptions == 0
    assert [r.output_ids for r in requests] == [reference(p, 8) for p in prompts]


def test_preempted_requests_resume_with_the_same_tokens(path, reference):
    """A pool of 64 tokens (8 blocks) for four requests of 40 tokens each: the newest are
    preempted when blocks run out, wait with what they generated, re-prefill it and go on. Greedy
    requests get transformers' tokens; a seeded sampled one with a repetition penalty gets the
    tokens it gets alone on a roomy cache (its counts and noise carry over the preemption)."""
    model = _load(path, kv_cache_tokens=MAX_SEQ)
    roomy = _load(path)
    eng = model.engine
    prompts = [_prompt(10, seed=200 + i) for i in range(4)]
    greedy = SamplingParams(max_new_tokens=30)
    sampled = SamplingParams(max_new_tokens=30, temperature=0.9, seed=5, repetition_penalty=1.3)
    requests = [eng.make_request(i, p, sampled if i == 3 else greedy) for i, p in enumerate(prompts)]
    eng.submit(requests)
    _drain(eng, requests)
    assert eng.preemptions > 0 and any(r.preemptions for r in requests)
    assert all(r.finish_reason == "length" and r.error is None for r in requests)
    assert [r.output_ids for r in requests[:3]] == [reference(p, 30) for p in prompts[:3]]
    alone = roomy.generate(prompts[3], max_new_tokens=30, temperature=0.9, seed=5, repetition_penalty=1.3)
    assert requests[3].output_ids == alone.token_ids
    assert not eng.running and not eng.prefilling and eng.cache.num_free() == 4


def test_prefix_cache_reuses_full_prompt_blocks(path, reference):
    """A second prompt sharing 40 tokens (5 blocks) with an earlier one computes only its own
    tokens; the same prompt again recomputes only its last block; the tokens are transformers'."""
    model = _load(path)
    eng, shapes = model.engine, []
    real = eng.runner._prefill
    eng.runner._prefill = lambda ids, start, *a, **k: shapes.append((ids.shape[1], start[0].item())) or \
        real(ids, start, *a, **k)
    shared = _prompt(40, seed=300)
    first, second = shared + [5], shared + [7, 8, 9]
    assert model.generate(first, max_new_tokens=10).token_ids == reference(first, 10)
    assert model.generate(second, max_new_tokens=10).token_ids == reference(second, 10)
    assert model.generate(second, max_new_tokens=10).token_ids == reference(second, 10)
    # (prefill length bucket, start position) of each call: whole, then the 3 new tokens, then the last block
    assert shapes == [(64, 0), (32, 40), (32, 40)]
    pool = eng.cache.pool
    assert pool.hit_tokens == 80 and pool.lookup_tokens == 41 + 43 + 43


def test_n_samples_share_prompt_blocks(path):
    model = _load(path)
    prompt = _prompt(20, seed=400)
    outs = model.generate(prompt, n=3, max_new_tokens=12, temperature=1.0, seed=3)
    for j, out in enumerate(outs):
        assert out.token_ids == model.generate(prompt, max_new_tokens=12, temperature=1.0, seed=3 + j).token_ids


@pytest.mark.parametrize("mix", [True, False], ids=["chunks-ride-with-decode", "chunks-take-turns"])
def test_long_prompt_is_prefilled_in_chunks_while_another_streams(path, reference, mix):
    """With a 16-token prefill cap, a 50-token prompt runs as 4 chunks while another request
    streams. Its first chunk is a prefill call; each later one runs in one forward with the running
    request's decode step (prefill_and_decode) or, where the runner cannot mix, as a call of its
    own followed by a decode step. Both get transformers' tokens."""
    model = _load(path, buckets=dict(prefill_tokens=16, length_multiple=8))
    eng, calls = model.engine, []
    runner = eng.runner
    real_prefill, real_decode, real_mixed = runner._prefill, runner._decode, runner._mixed
    runner._prefill = lambda ids, *a, **k: calls.append(("prefill", ids.shape[1])) or real_prefill(ids, *a, **k)
    runner._decode = lambda ids, *a, **k: calls.append("decode") or real_decode(ids, *a, **k)
    runner._mixed = (lambda ids, *a, **k: calls.append(("mixed", ids.shape[1])) or real_mixed(ids, *a, **k)) if mix \
        else None
    short, long = _prompt(5, seed=500), _prompt(50, seed=501)
    running = eng.make_request(0, short, SamplingParams(max_new_tokens=20))
    eng.submit([running])
    eng.step()
    eng.step()
    arriving = eng.make_request(1, long, SamplingParams(max_new_tokens=5))
    eng.submit([arriving])
    _drain(eng, [running, arriving])
    chunks = [i for i, c in enumerate(calls) if c != "decode"][1:]  # the long prompt's calls
    if mix:
        assert [calls[i] for i in chunks] == [("prefill", 16)] + [("mixed", 16)] * 2 + [("mixed", 8)]
        assert calls[chunks[0] + 1:chunks[-1] + 1] == [("mixed", 16)] * 2 + [("mixed", 8)]  # no decode apart
    else:
        assert [calls[i] for i in chunks] == [("prefill", 16)] * 3 + [("prefill", 8)]
        assert all(calls[i + 1] == "decode" for i in chunks)
    assert running.output_ids == reference(short, 20) and arriving.output_ids == reference(long, 5)


def test_a_failed_chunk_and_decode_step_fails_both_and_frees_their_blocks(path, reference):
    model = _load(path, buckets=dict(prefill_tokens=16, length_multiple=8))
    eng = model.engine
    running = eng.make_request(0, _prompt(5, seed=510), SamplingParams(max_new_tokens=30))
    eng.submit([running])
    eng.step()
    eng.submit([eng.make_request(1, _prompt(50, seed=511), SamplingParams(max_new_tokens=5))])
    eng.step()  # the running request's decode turn
    eng.step()  # the long prompt's first chunk
    assert eng.prefilling

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")
    eng.runner._mixed = broken
    eng.step()
    assert running.finished and running.error == "RuntimeError: injected failure"
    assert not eng.running and not eng.prefilling
    assert eng.cache.num_free() == 4 and eng.cache.free_blocks == eng.cache.num_blocks
    prompt = _prompt(5, seed=510)
    assert model.generate(prompt, max_new_tokens=8).token_ids == reference(prompt, 8)  # the engine still serves


def test_prefill_tokens_sets_the_chunk_size(path, reference):
    model = zoo.load(path, max_seq_len=MAX_SEQ, dtype="float32", prefill_tokens=40)
    assert model.buckets.prefill_tokens == 40 and model.buckets.chunk_tokens == 32  # (a multiple of 32)
    prompt = _prompt(40, seed=520)
    assert model.generate(prompt, max_new_tokens=6).token_ids == reference(prompt, 6)
    with pytest.raises(ValueError, match="prefill_tokens must be an int >= 1"):
        zoo.load(path, prefill_tokens=0)
    with pytest.raises(ValueError, match="prefill_tokens cannot change the graphs exported"):
        zoo.load(path, compiled="/nonexistent-export", prefill_tokens=64)


def test_kv_cache_tokens_must_hold_one_sequence(path):
    with pytest.raises(ValueError, match="kv_cache_tokens must be an int >= 1"):
        zoo.load(path, kv_cache_tokens=0)
    with pytest.raises(ValueError, match="cannot hold one sequence of max_seq_len=64"):
        _load(path, kv_cache_tokens=MAX_SEQ - 8)  # 7 blocks of 8


# ---- compiled ----------------------------------------------------------------------------------
def test_compiled_paged_serving_mix_has_no_recompiles_and_matches_transformers(path, reference):
    """Dynamic-length graphs over a small pool: prefix hits, chunked prompts and preemptions, all
    after warm-up under error_on_recompile, with no graph break; greedy tokens are transformers'."""
    model = _load(path, compiled=True, max_batch_size=2, kv_cache_tokens=MAX_SEQ,
                  buckets=dict(batch_sizes=[1, 2], prefill_tokens=32, length_multiple=8))
    model.warmup()
    eng = model.engine
    counters.clear()
    shared = _prompt(24, seed=600)
    # the first two need 10 blocks of the 8 (preempted), the next two share 3, the last runs in 2 chunks
    prompts = [_prompt(20, seed=602), _prompt(20, seed=603), shared + [1], shared + [2, 3], _prompt(45, seed=601)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = model.generate(prompts, max_new_tokens=16)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert eng.preemptions > 0 and eng.cache.pool.hit_tokens > 0
    assert [o.token_ids for o in outs] == [reference(p, 16) for p in prompts]


def test_compiled_chunks_ride_with_decode_steps_without_recompiles(path, reference):
    """The prefill-and-decode graph: a long prompt's later chunks run with the decode step of a
    request admitted with it, across chunk lengths and contexts, after warm-up and with no
    recompile; greedy tokens are transformers'."""
    model = _load(path, compiled=True, max_batch_size=2,
                  buckets=dict(batch_sizes=[1, 2], prefill_tokens=16, length_multiple=8))
    model.warmup()
    eng, mixed_calls = model.engine, []
    real_mixed = eng.runner._mixed
    eng.runner._mixed = lambda ids, *a, **k: mixed_calls.append(ids.shape[1]) or real_mixed(ids, *a, **k)
    prompts = [_prompt(4, seed=610), _prompt(45, seed=611)]
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = model.generate(prompts, max_new_tokens=12)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert mixed_calls == [16, 16]  # positions [16, 32) and [32, 45) (13 tokens, padded to 16)
    assert [o.token_ids for o in outs] == [reference(p, 12) for p in prompts]


def test_a_failed_prefill_frees_the_slots_of_its_n_samples(path):
    """The n samples of a prompt share one prefill row; when that prefill raises, every sample
    fails with the error and no slot or block stays taken."""
    model = _load(path)
    eng = model.engine

    def broken(*args, **kwargs):
        raise RuntimeError("injected prefill failure")
    eng.runner._prefill = broken
    with pytest.raises(RuntimeError, match="injected prefill failure"):
        model.generate(_prompt(12, seed=700), n=3, max_new_tokens=4, temperature=1.0, seed=1)
    assert eng.cache.num_free() == 4 and eng.cache.free_blocks == eng.cache.num_blocks
    assert not eng.running and not eng.prefilling and not eng.waiting
