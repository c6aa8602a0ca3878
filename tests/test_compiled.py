"""Graph mode: compiled tokens == eager tokens, and after warm-up any mix of batch sizes and
prompt lengths inside the buckets causes zero recompiles and zero graph breaks."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import zoo
from zoo.graphs import Buckets

pytestmark = pytest.mark.compiled

# decode context buckets 32 and 64: the mixes below (prompts up to 31 tokens + 24 new) cross from one to the other
BUCKETS = Buckets(batch_sizes=(1, 2, 4), prefill_lens=(32, 64), context_lens=(32, 64))
MIXES = [
    [[3, 17, 42, 99, 7]],
    [[5, 9], list(range(10, 40))],
    [[1] * 3, [2, 3, 4, 5, 6, 7, 8], list(range(30, 61))],
    [[7, 8, 9], [100, 101], [1, 2, 3, 4, 5, 6], [200, 13, 77, 5], [9] * 20, [42]],  # 6 requests, 4 slots
]


@pytest.fixture(scope="module")
def models(checkpoint):
    path = checkpoint("llama3_gqa")
    compiled = zoo.load(path, max_batch_size=4, max_seq_len=64, buckets=BUCKETS, compiled=True)
    compiled.warmup(batch_sizes=[1, 2, 4], prompt_lens=[32])
    # eager attends over the whole cache: context buckets must not change a single token
    eager = zoo.load(path, max_batch_size=4, max_seq_len=64, buckets=Buckets((1, 2, 4), (32, 64)))
    return compiled, eager


def test_warmup_built_one_graph_per_bucket(models):
    compiled, _ = models
    assert sorted(compiled.engine.runner.first_call_seconds) == sorted(
        [("prefill", b, 32, T) for b in (1, 2, 4) for T in (32, 64)]
        + [("decode", b, L) for b in (1, 2, 4) for L in (32, 64)])
    assert compiled.compile_seconds > 0


def test_compiled_logits_match_eager(models):
    compiled, eager = models
    prompts = [[3, 17, 42, 99, 7], [5, 9]]
    with torch.no_grad():
        a = compiled.engine.runner.prefill(prompts, [compiled.engine.cache.scratch_slot] * 2)
        b = eager.engine.runner.prefill(prompts, [eager.engine.cache.scratch_slot] * 2)
    assert (a - b).abs().max().item() <= 1e-4


def test_no_recompiles_or_graph_breaks_after_warmup_and_tokens_match_eager(models):
    compiled, eager = models
    graphs_before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises
        for prompts in MIXES:
            got = compiled.generate(prompts, max_new_tokens=24)
            want = eager.generate(prompts, max_new_tokens=24)
            assert [g.token_ids for g in got] == [w.token_ids for w in want]
        sampled = compiled.generate(MIXES[2], max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)
        assert [s.token_ids for s in sampled] == [
            s.token_ids for s in eager.generate(MIXES[2], max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)]
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen1"])
def test_compiled_qwen_generations_match_eager(checkpoint, kind):
    path = checkpoint(kind)
    buckets = Buckets(batch_sizes=(1,), prefill_lens=(32,))
    compiled = zoo.load(path, max_batch_size=1, max_seq_len=32, buckets=buckets, compiled=True)
    eager = zoo.load(path, max_batch_size=1, max_seq_len=32, buckets=buckets)
    for prompt in ([1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]):
        assert compiled.generate(prompt, max_new_tokens=16).token_ids == eager.generate(prompt, max_new_tokens=16).token_ids
    assert not counters["graph_break"]


def test_regional_compile_matches_eager_without_recompiles(checkpoint, tmp_path, models):
    """compile config `regional = true`: one decoder layer compiled per bucket and reused for every
    layer (torch.compiler.nested_compile_region); same tokens as eager, zero recompiles."""
    config = tmp_path / "regional.toml"
    config.write_text('backend = "inductor"\nregional = true\n')
    buckets = Buckets(batch_sizes=(1, 2), prefill_lens=(32, 64), context_lens=(64,))
    regional = zoo.load(checkpoint("llama3_gqa"), max_batch_size=2, max_seq_len=64, buckets=buckets, compiled=True,
                        compile_config=str(config))
    assert "regional" in regional.engine.runner.description
    regional.warmup(prompt_lens=[32])
    _, eager = models
    graphs_before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompts in MIXES[:2]:
            got = regional.generate(prompts, max_new_tokens=24)
            assert [g.token_ids for g in got] == [w.token_ids for w in eager.generate(prompts, max_new_tokens=24)]
    assert counters["stats"]["unique_graphs"] == graphs_before


def test_compile_in_background_answers_at_once_with_eager_tokens(checkpoint, tmp_path, models):
    """compile_in_background: the first request runs eagerly while the graphs build in a background
    thread, with eager's tokens; once every graph is ready, calls replay them without recompiling."""
    _, eager = models
    buckets = Buckets(batch_sizes=(1, 2), prefill_lens=(32, 64), context_lens=(64,))
    model = zoo.load(checkpoint("llama3_gqa"), max_batch_size=2, max_seq_len=64, buckets=buckets, compiled=True,
                     compile_in_background=True, cache_dir=str(tmp_path / "graphs"))
    runner = model.engine.runner
    first = [g.token_ids for g in model.generate(MIXES[1], max_new_tokens=24)]  # right away
    assert runner.eager_calls > 0  # answered before its graphs were ready
    want = [w.token_ids for w in eager.generate(MIXES[1], max_new_tokens=24)]
    assert first == want
    assert runner.wait_for_background_compile(timeout_s=600)
    assert runner.graphs_ready == runner.graphs_total == 6
    eager_calls, graphs_before = runner.eager_calls, counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert [g.token_ids for g in model.generate(MIXES[1], max_new_tokens=24)] == want
    assert runner.eager_calls == eager_calls and counters["stats"]["unique_graphs"] == graphs_before


def test_compile_in_background_needs_torch_compile():
    with pytest.raises(ValueError, match="compile_in_background needs compiled=True"):
        zoo.load(compile_in_background=True)
    with pytest.raises(ValueError, match="does not run with tensor parallelism"):
        zoo.load(compiled=True, compile_in_background=True, tp=2)


def test_dynamic_lengths_one_graph_per_batch_size_matches_eager(checkpoint, models):
    """Dynamic lengths: one prefill and one decode graph per batch size serve every prompt length
    and decode context (padded to a multiple of 8 here), with eager's tokens and no recompiles."""
    _, eager = models
    buckets = Buckets.dynamic((1, 2, 4), 64, length_multiple=8, prefill_tokens=64)
    model = zoo.load(checkpoint("llama3_gqa"), max_batch_size=4, max_seq_len=64, buckets=buckets, compiled=True)
    runner = model.engine.runner
    assert "dynamic lengths" in runner.description
    model.warmup()
    assert sorted(runner.first_call_seconds) == sorted([("prefill", b) for b in (1, 2, 4)] +
                                                       [("decode", b) for b in (1, 2, 4)])
    assert runner.graphs_total == runner.graphs_ready == 6
    graphs_before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompts in MIXES:  # prompts of 1-31 tokens: lengths 8, 16, 24, 32; contexts up to 56
            got = model.generate(prompts, max_new_tokens=24)
            assert [g.token_ids for g in got] == [w.token_ids for w in eager.generate(prompts, max_new_tokens=24)]
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert not counters["graph_break"], dict(counters["graph_break"])
