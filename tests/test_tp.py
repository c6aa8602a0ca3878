"""Tensor parallelism on CPU: 2 ranks over gloo, fp32, tiny random-weight checkpoints.

Spawning ranks costs ~8 s each time (every rank imports torch + inductor), so each test runs a
whole battery of checks inside one spawn."""
from __future__ import annotations

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
from zoo.loader import CheckpointError
from zoo.distributed.comm import TPContext
from zoo.distributed.launch import run_ranks
from zoo.errors import TPWorkerError

from checkpoints import build_checkpoint, to_qwen1_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 17, 33, 2, 250, 9, 11], [100, 7, 3]]
STEPS = 6  # decode steps whose logits are compared
NEW_TOKENS = 10


def _logits_and_tokens(model) -> tuple[torch.Tensor, list[list[int]]]:
    """Logits of a prefill of PROMPTS and STEPS greedy decode steps (driven through the runner),
    then greedy tokens from generate()."""
    runner, n = model.engine.runner, len(PROMPTS)
    logits = [runner.prefill(PROMPTS, list(range(n))).clone()]
    B = runner.buckets.batch_for(n)
    pos = torch.tensor([len(p) for p in PROMPTS])
    for _ in range(STEPS):
        ids = torch.zeros(B, 1, dtype=torch.long)
        ids[:n, 0] = logits[-1].argmax(-1)
        positions = torch.full((B,), runner.cache.scratch_position, dtype=torch.long)
        positions[:n] = pos
        logits.append(runner.decode(ids, positions)[:n].clone())
        pos += 1
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
        os.kill(model._procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TPWorkerError, match="rank"):
            model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        assert time.monotonic() - start < 30
        assert not any(p.is_alive() for p in model._procs)
        with pytest.raises(TPWorkerError, match="closed"):
            model.generate(PROMPTS[0])
    finally:
        model.close()


def test_a_hung_rank_fails_the_call_within_the_process_group_timeout(tp_checkpoints):
    model = zoo.load(tp_checkpoints["llama_gqa"], tp=2, max_batch_size=2, max_seq_len=64, tp_timeout_s=5)
    try:
        assert len(model.generate(PROMPTS[0], max_new_tokens=3).token_ids) == 3
        os.kill(model._procs[1].pid, signal.SIGSTOP)  # alive, but never reaches its next collective
        start = time.monotonic()
        with pytest.raises(TPWorkerError, match="rank 0"):
            model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        assert time.monotonic() - start < 5 + 15
        assert not any(p.is_alive() for p in model._procs)
    finally:
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
