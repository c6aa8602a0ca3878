"""Tensor parallelism on CPU: 2 ranks over gloo, fp32, tiny random-weight checkpoints.

Spawning ranks costs ~8 s each time (every rank imports torch + inductor), so each test runs a
whole battery of checks inside one spawn."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import zoo
from zoo.graphs import Buckets
from zoo.distributed.comm import TPContext
from zoo.distributed.launch import UNGUARDED_MESSAGE, run_ranks
from zoo.engine import SamplingParams
from zoo.engine.driver import Submission
from zoo.errors import CheckpointError, TPWorkerError

from checkpoints import build_checkpoint, to_qwen1_layout
from servers import process_running

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 17, 33, 2, 250, 9, 11], [100, 7, 3]]
STEPS = 6  # decode steps whose logits are compared
NEW_TOKENS = 10


def _logits_and_tokens(model) -> tuple[torch.Tensor, list[list[int]]]:
    """Logits of a prefill of PROMPTS and STEPS greedy decode steps (driven through the runner),
    then greedy tokens from generate()."""
    runner, n = model.engine.runner, len(PROMPTS)
    slots = [runner.cache.alloc() for _ in PROMPTS]
    for slot, prompt in zip(slots, PROMPTS):
        assert runner.cache.reserve(slot, len(prompt) + STEPS)  # blocks for the positions decode writes
    logits = [runner.prefill(PROMPTS, slots).clone()]
    B = runner.buckets.batch_for(n)
    pos = torch.tensor([len(p) for p in PROMPTS])
    for _ in range(STEPS):
        ids = torch.zeros(B, 1, dtype=torch.long)
        ids[:n, 0] = logits[-1].argmax(-1)
        positions = torch.full((B,), runner.cache.scratch_position, dtype=torch.long)
        positions[:n] = pos
        logits.append(runner.decode(ids, positions)[:n].clone())
        pos += 1
    for slot in slots:
        runner.cache.free(slot)
    tokens = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
    return torch.stack(logits), tokens


def _eager_battery(ctx: TPContext, paths: dict) -> dict:
    out = {}
    for kind, path in paths.items():
        model = zoo.load(path, tp=ctx, max_batch_size=2, max_seq_len=64)
        out[kind] = _logits_and_tokens(model)
        if kind == "llama_kv1":  # mc2: chunked matmul + async all-reduces, same numbers
            mc2 = zoo.load(path, tp=dataclasses.replace(ctx, use_mc2=True), max_batch_size=2, max_seq_len=64)
            out["llama_kv1_mc2"] = _logits_and_tokens(mc2)
            layer = mc2.module.model.layers[0]
            x = torch.randn(3, 5, layer.mlp.down_proj.in_features)
            plain = dataclasses.replace(ctx, use_mc2=False)
            layer.mlp.down_proj.tp = plain
            ref = layer.mlp.down_proj(x)
            layer.mlp.down_proj.tp = dataclasses.replace(ctx, use_mc2=True)
            out["mc2_layer_diff"] = (layer.mlp.down_proj(x) - ref).abs().max().item()
    out["kv_heads"] = zoo.load(paths["llama_kv1"], tp=ctx, max_batch_size=1, max_seq_len=16).engine.cache.k[0].shape[1]
    return out


def _compiled_battery(ctx: TPContext, paths: dict, cache_dir: str) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    out = {}
    for kind, path in paths.items():
        model = zoo.load(path, tp=ctx, compiled=True, max_batch_size=2, max_seq_len=64,
                         buckets=Buckets((2,), (64,)), cache_dir=cache_dir)
        model.warmup()
        counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            out[kind] = _logits_and_tokens(model)
            model.generate(PROMPTS[1], max_new_tokens=3)  # another mix inside the same buckets
        out[kind + "_graph_breaks"] = dict(counters["graph_break"])
        out[kind + "_cache_key"] = model.engine.runner.graph_cache.fields["compile_config"]
    return out


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        # GQA with fewer kv heads (1) than ranks (2): each rank keeps the kv head, replicated
        "llama_kv1": build_checkpoint("llama3_gqa", str(root / "llama_kv1"), num_key_value_heads=1),
        # GQA with kv heads split across ranks (4 q heads, 2 kv heads)
        "llama_gqa": build_checkpoint("llama3_gqa", str(root / "llama_gqa")),
        # q/k/v biases, tied embeddings; a vocab (255) that does not divide by 2: padded
        "qwen2": build_checkpoint("qwen2", str(root / "qwen2"), vocab_size=255),
        # all of it at once (biases, tied, padded vocab, one kv head for two ranks): the compiled test's
        # model (Qwen2's forward is Llama's, so this covers the Llama graph code too)
        "qwen2_kv1": build_checkpoint("qwen2", str(root / "qwen2_kv1"), vocab_size=255, num_key_value_heads=1),
        # Qwen3: per-head q/k norms (replicated weights) with head-sharded q/k, explicit head_dim
        "qwen3": build_checkpoint("qwen3", str(root / "qwen3")),
        # first-generation Qwen: each rank reads its heads' rows out of the fused c_attn
        "qwen1": to_qwen1_layout(build_checkpoint("qwen2_mha", str(root / "qwen2_mha")), str(root / "qwen1")),
    }


def _reference(path):
    return _logits_and_tokens(zoo.load(path, max_batch_size=2, max_seq_len=64))


def test_tp2_eager_matches_tp1_and_mc2_matches_plain(tp_checkpoints, tmp_path):
    # the merge tool's per-rank shards must load to the very same weights
    merged = str(tmp_path / "merged")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "merge_qkv_weight.py"), "--model-path",
                    tp_checkpoints["qwen2"], "--tp-size", "2", "--output-path", merged], check=True,
                   capture_output=True)
    assert sorted(os.listdir(merged)) == ["config.json", "generation_config.json", "rank_0", "rank_1",
                                          "zoo-tp-manifest.json"]
    paths = dict(tp_checkpoints, qwen2_merged=merged)
    ranks = run_ranks(_eager_battery, 2, paths)
    for kind, path in tp_checkpoints.items():
        ref_logits, ref_tokens = _reference(path)
        for rank in ranks:
            logits, tokens = rank[kind]
            assert (logits - ref_logits).abs().max().item() <= 1e-4, kind
            assert tokens == ref_tokens, kind
    r0 = ranks[0]
    assert torch.equal(r0["qwen2_merged"][0], r0["qwen2"][0])  # merged shards == HF folder, bit for bit
    assert r0["llama_kv1_mc2"][1] == r0["llama_kv1"][1]
    assert (r0["llama_kv1_mc2"][0] - r0["llama_kv1"][0]).abs().max().item() <= 1e-5
    assert r0["mc2_layer_diff"] <= 1e-5
    assert r0["kv_heads"] == 1  # the replicated kv head: the cache holds one head per rank


def test_tp2_compiled_matches_tp1_without_recompiles_or_graph_breaks(tp_checkpoints):
    # one model, one prefill and one decode bucket: every spawned rank compiles its own graphs
    # (~10-20 s each, cold, with two ranks sharing two cores)
    paths = {"qwen2_kv1": tp_checkpoints["qwen2_kv1"]}
    cache_dir = os.environ.get("ZOO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo"))
    ranks = run_ranks(_compiled_battery, 2, paths, cache_dir)
    for kind, path in paths.items():
        ref_logits, ref_tokens = _reference(path)
        for rank, out in enumerate(ranks):
            logits, tokens = out[kind]
            assert (logits - ref_logits).abs().max().item() <= 1e-4, kind
            assert tokens == ref_tokens, kind
            assert out[kind + "_graph_breaks"] == {}
            assert out[kind + "_cache_key"]["tp"] == {"size": 2, "rank": rank, "mc2": False}


def test_zoo_load_tp2_proxy_generate_stream_errors_and_a_killed_rank(tp_checkpoints):
    path = tp_checkpoints["llama_gqa"]
    ref = zoo.load(path, max_batch_size=2, max_seq_len=64)
    want = [r.token_ids for r in ref.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
    model = zoo.load(path, tp=2, max_batch_size=2, max_seq_len=64)
    try:
        results = model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        assert [r.token_ids for r in results] == want
        assert all(r.finish_reason == "length" for r in results)
        streamed = {0: [], 1: []}
        stream = model.stream(PROMPTS, max_new_tokens=NEW_TOKENS)
        for event in stream:
            streamed[event.index] += event.token_ids
        assert [streamed[0], streamed[1]] == want
        assert [r.token_ids for r in stream.results] == want
        # a bad request fails on every rank alike; the model stays usable
        with pytest.raises(zoo.RequestError, match="outside"):
            model.generate([1, 2, 100000])
        # sampling: every rank draws the same noise, so rank 0's answer is the one all ranks took
        assert len(model.generate(PROMPTS[0], max_new_tokens=5, temperature=0.8).token_ids) == 5
        # a rank dies: the caller gets an error, not a hang, and every rank is stopped
        os.kill(model.rank_pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TPWorkerError, match="rank"):
            model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        assert time.monotonic() - start < 30
        assert not any(process_running(pid) for pid in model.rank_pids)
        with pytest.raises(TPWorkerError, match="closed"):
            model.generate(PROMPTS[0])
    finally:
        model.close()


def test_tp2_proxy_forwards_every_public_model_method(tp_checkpoints):
    """Every public Model method and property, called through zoo.load(tp=2)'s proxy, in one spawn."""
    path = tp_checkpoints["llama_gqa"]
    ref = zoo.load(path, max_batch_size=2, max_seq_len=64)
    want = [r.token_ids for r in ref.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
    sample = dict(max_new_tokens=8, temperature=0.9, top_k=50, top_p=0.95)
    want_seeded = [r.token_ids for r in ref.generate(PROMPTS, seed=1234, **sample)]
    ref.seed_sampling(7)
    want_default_seeded = ref.generate(PROMPTS[1], **sample).token_ids
    with zoo.load(path, tp=2, max_batch_size=2, max_seq_len=64) as model:
        assert isinstance(model, zoo.TPModel) and not model.closed
        # read here, not on the ranks
        assert model.path == path and model.config == ref.config and model.tokenizer is None
        # properties (rank 0's values)
        assert model.buckets == ref.buckets == Buckets.dynamic((1, 2), 64, prefill_tokens=2048)
        assert model.max_seq_len == 64
        assert model.compile_seconds == 0.0 and model.graph_cache_status is None  # eager
        assert 0 < model.num_parameters <= ref.num_parameters  # rank 0's shard
        assert model.kv_cache.k[0].shape[1] == 1  # rank 0's kv head (2 kv heads over 2 ranks)

        # generate: one prompt -> one result, a list -> a list; greedy == TP1
        single = model.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
        assert isinstance(single, zoo.GenerationResult) and single.token_ids == want[0]
        assert [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)] == want
        # sampled with a per-request seed: the same tokens again, and those of TP1 (same noise, logits
        # within 1e-4)
        seeded = [r.token_ids for r in model.generate(PROMPTS, seed=1234, **sample)]
        assert seeded == [r.token_ids for r in model.generate(PROMPTS, seed=1234, **sample)] == want_seeded
        assert all(len(t) == 8 for t in seeded)
        # seed_sampling: the default generator of every rank, for requests without a seed
        model.seed_sampling(7)
        assert model.generate(PROMPTS[1], **sample).token_ids == want_default_seeded
        model.seed_sampling(7)
        assert model.generate(PROMPTS[1], **sample).token_ids == want_default_seeded

        # stream to the end: events, then .results
        stream = model.stream(PROMPTS, max_new_tokens=NEW_TOKENS)
        streamed, finished = {0: [], 1: []}, {}
        for event in stream:
            assert isinstance(event, zoo.StreamEvent)
            streamed[event.index] += event.token_ids
            if event.finish_reason is not None:
                finished[event.index] = event.finish_reason
        assert [streamed[0], streamed[1]] == want and finished == {0: "length", 1: "length"}
        assert [r.token_ids for r in stream.results] == want
        # a stream closed early: its requests are aborted, their slots freed
        early = model.stream(PROMPTS, max_new_tokens=NEW_TOKENS)
        first = next(early)
        assert first.token_ids == want[first.index][:len(first.token_ids)]
        early.close()
        assert list(early) == []
        assert [r.finish_reason for r in early.results] == ["error", "error"]
        assert all("closed" in r.error and len(r.token_ids) < NEW_TOKENS for r in early.results)
        assert [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)] == want

        # driver: it cannot be pickled, so it stays on the ranks (a handle); each step() steps every rank
        driver = model.driver()
        assert driver.info().num_slots == 2
        tokens = []
        while len(tokens) < NEW_TOKENS:
            submit = [[Submission(0, 0, PROMPTS[0], SamplingParams(max_new_tokens=NEW_TOKENS))]] if not tokens else []
            tokens += [t for e in driver.step(submit, []).updates[0].events for t in e.token_ids]
        assert tokens == want[0]

        # warmup, with every argument (values inside the buckets above), then with none
        buckets = model.buckets
        model.warmup(batch_sizes=list(buckets.batch_sizes), prompt_lens=[7, buckets.prefill_lens[-1]],
                     context_lens=list(buckets.context_lens))
        model.warmup(batch_sizes=[1], prompt_lens=[3])
        model.warmup()
        assert [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)] == want

        # close: the ranks stop; every later call says the model is closed
        model.close()
        assert model.closed
        assert not any(process_running(pid) for pid in model.rank_pids)
        with pytest.raises(TPWorkerError, match="closed"):
            model.generate(PROMPTS[0])
        with pytest.raises(TPWorkerError, match="closed"):
            model.buckets
        model.close()  # again (and once more by the with block): nothing to do
    assert model.closed


@pytest.mark.timeout(180)  # a hang fails here, not after the suite's 600 s
def test_a_hung_rank_fails_the_call_within_the_process_group_timeout(tp_checkpoints):
    model = zoo.load(tp_checkpoints["llama_gqa"], tp=2, max_batch_size=2, max_seq_len=64, tp_timeout_s=5)
    try:
        assert len(model.generate(PROMPTS[0], max_new_tokens=3).token_ids) == 3
        os.kill(model.rank_pids[1], signal.SIGSTOP)  # alive, but never answers nor reaches a collective
        start = time.monotonic()
        # rank 0 times out in a collective, or the caller waiting for rank 1's answer gives up: either way
        # a TPWorkerError naming a rank, within the timeout (plus some slack)
        with pytest.raises(TPWorkerError, match="rank 1"):  # the hung rank is the one named
            model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        assert time.monotonic() - start < 5 + 15
        assert not any(process_running(pid) for pid in model.rank_pids)
    finally:
        # if the call above hung (and pytest-timeout stopped it), close() must not wait on the stopped rank too
        for pid in model.rank_pids:
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TPWorkerError):
            model.close()


def test_cli_spawns_its_ranks(tmp_path):
    ref = zoo.load(zoo.embedded_model_path("qwen2")).generate("Simple is", max_new_tokens=12)
    out = subprocess.run([sys.executable, "-m", "zoo.qwen.infer", "--tp", "2", "--prompt", "Simple is",
                          "--max-new-tokens", "12", "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [line["token_ids"] for line in lines] == [ref.token_ids]
    assert "tensor-parallel rank 0 of 2" in out.stderr


@pytest.mark.compiled
@pytest.mark.parametrize("command, family", [
    ("zoo.llama.infer", "llama"),
    # each run compiles a prefill and a decode graph in both ranks: ~100 s cold on a 2-core machine,
    # ~30 s warm; the Qwen2 one stays out of the default suite (its graphs are Llama's code)
    pytest.param("zoo.qwen.infer", "qwen2", marks=pytest.mark.slow),
])
def test_cli_tp2_compiled_streams_the_tp1_tokens(command, family):
    path = zoo.embedded_model_path(family)  # the tiny models that ship with zoo have tokenizers (a text prompt)
    ref = zoo.load(path, max_batch_size=1, max_seq_len=64).generate("Beautiful is", max_new_tokens=4)
    # the graph cache the compiled tests share: a second run of the suite starts warm
    cache_dir = os.environ.get("ZOO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo"))
    out = subprocess.run([sys.executable, "-m", command, "--tp", "2", "--compiled", "--max-new-tokens", "4",
                          "--max-batch-size", "1", "--max-seq-len", "64", "--model-path", path, "--cache-dir",
                          cache_dir], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Beautiful is" + ref.text + "\n"  # streamed: the prompt, then its continuation
    assert "tensor-parallel rank 0 of 2" in out.stderr and "compiled: inductor" in out.stderr
    assert "4 new tokens" in out.stderr  # the summary line (stream results and compile_seconds via the proxy)


UNGUARDED_SCRIPT = textwrap.dedent("""
    import sys
    import zoo

    model = zoo.load(sys.argv[1], tp=2, max_batch_size=1, max_seq_len=16)  # no __main__ guard
    print(model.generate([1, 2, 3], max_new_tokens=2).token_ids)
""")


def test_a_script_without_a_main_guard_fails_with_one_clear_error(tp_checkpoints, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    out = subprocess.run([sys.executable, str(script), tp_checkpoints["llama_gqa"]], capture_output=True, text=True,
                         cwd=tmp_path, timeout=180)
    assert out.returncode != 0
    assert UNGUARDED_MESSAGE in out.stderr, out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith("zoo.errors.TPWorkerError: ")
    # one traceback (zoo.load's frames: ~20 lines with Python 3.11's caret lines), not multiprocessing's
    # RuntimeError about the bootstrapping phase from every rank (~150 lines)
    assert out.stderr.count("Traceback") == 1, out.stderr
    assert "bootstrapping phase" not in out.stderr and "spawn_main" not in out.stderr
    assert len(out.stderr.splitlines()) < 25, out.stderr
    assert out.stdout == ""


def test_merged_shards_refuse_another_tp_size(tp_checkpoints, tmp_path):
    merged = str(tmp_path / "merged")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "merge_qkv_weight.py"), "--model-path",
                    tp_checkpoints["llama_gqa"], "--tp-size", "2", "--output-path", merged], check=True,
                   capture_output=True)
    with pytest.raises(CheckpointError, match=r"split for tensor-parallel size 2 .* size 1 was asked for"):
        zoo.load(merged)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by the tensor-parallel size 3"):
        with torch.device("meta"):
            zoo.models.spec_for_family("llama").model_class(zoo.models.read_config(merged), TPContext(0, 3))
    from zoo.layers.linear import qkv_head_ranges

    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) and the tensor-parallel size 2 must divide"):
        qkv_head_ranges(6, 3, TPContext(0, 2))
    assert qkv_head_ranges(8, 2, TPContext(3, 4)) == ((6, 8), (1, 2))  # q heads 6,7 use kv head 1


RSS_PROBE = textwrap.dedent("""
    import sys, torch
    from zoo.config import ModelConfig
    from zoo.models import read_config, spec_for
    from zoo.loader import load_weights
    from zoo.distributed.comm import TPContext

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    config = read_config(sys.argv[1])
    rank, size = int(sys.argv[2]), int(sys.argv[3])
    with torch.device("meta"):
        module = spec_for(config).model_class(config, TPContext(rank, size))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = status("VmRSS")
    load_weights(module, sys.argv[1], torch.float32, torch.device("cpu"))
    print(status("VmHWM") - before)
""")


def test_sharded_load_peak_rss_per_rank_is_about_weights_over_tp(tmp_path):
    # ~100 MB fp32 checkpoint (as tests/test_loader.py); loading needs no process group
    path = build_checkpoint("llama3_gqa", str(tmp_path / "big"), hidden_size=384, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, vocab_size=30000)
    growth = {}
    for rank, size in ((0, 1), (0, 2), (1, 2)):  # one process each: a fresh heap every time
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, path, str(rank), str(size)], capture_output=True,
                             text=True, check=True)
        growth[rank, size] = int(out.stdout.split()[-1])
    tp1 = growth[0, 1]
    assert tp1 > 90e6
    for rank in (0, 1):
        assert growth[rank, 2] <= 0.65 * tp1, f"rank {rank}: {growth[rank, 2] / 1e6:.0f} MB vs TP1 {tp1 / 1e6:.0f} MB"
    print({k: round(v / 1e6, 1) for k, v in growth.items()})


# ---- the caller dies: its ranks stop ------------------------------------------------------------
ORPHAN_SCRIPT = textwrap.dedent("""
    import sys
    import zoo

    if __name__ == "__main__":
        model = zoo.load(sys.argv[1], tp=2, max_batch_size=1, max_seq_len=2048)
        print("PIDS", *model.rank_pids, flush=True)
        model.generate([1, 2, 3], max_new_tokens=2000, ignore_eos=True)  # long: the caller dies meanwhile
        print("FINISHED", flush=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_stop_within_seconds_when_the_caller_is_killed(checkpoint, tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(ORPHAN_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's zoo
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    caller = subprocess.Popen([sys.executable, str(script), checkpoint("llama3_gqa")], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = caller.stdout.readline()  # after the ranks loaded
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        time.sleep(1.0)  # inside generate() now
        assert all(process_running(p) for p in pids)
        caller.kill()  # SIGKILL: no atexit, no close(): only the ranks' own watch can stop them
        caller.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(process_running(p) for p in pids):
            time.sleep(0.1)
        left = [p for p in pids if process_running(p)]
        assert not left, f"ranks {left} still run 10 s after their caller died"
    finally:
        if caller.poll() is None:
            caller.kill()
        for pid in pids if "pids" in locals() else []:
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_tp2_regional_compile_matches_eager(tp_checkpoints, tmp_path):
    """compile config `regional = true` under tensor parallelism: the row-parallel all-reduces run
    inside the nested compile region; greedy tokens equal eager's."""
    config = tmp_path / "regional.toml"
    config.write_text('backend = "inductor"\nregional = true\n')
    path = tp_checkpoints["llama_gqa"]
    want = zoo.load(path, max_batch_size=2, max_seq_len=64).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    with zoo.load(path, tp=2, compiled=True, compile_config=str(config), max_batch_size=2, max_seq_len=64,
                  cache_dir=str(tmp_path / "graphs"), threads=1) as model:
        got = model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
