"""The on-disk graph cache: what its key covers, damage detection, and a warm second process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from zoo.models import read_config
from zoo.graphs.cache import MANIFEST, GraphCache, cache_key_fields, modeling_source_hash
from zoo.graphs import Buckets
from zoo.models.llama import LlamaForCausalLM
from zoo.models.qwen2 import Qwen2ForCausalLM

FIELDS = {"example": 1}


class EditedLlama(LlamaForCausalLM):
    """Stands for an edit to the forward code: same weights, same config, different source."""

    def decode(self, input_ids, positions, k_caches, v_caches):
        return super().decode(input_ids, positions, k_caches, v_caches) * 1.0


def _module(cls, checkpoint, kind="llama2"):
    config = read_config(checkpoint(kind))
    with torch.device("meta"):
        return cls(config)


def _key(module, fingerprint=None, dtype=torch.float32, buckets=Buckets((1,), (32,)), shape=(2, 4, 33, 16)):
    fields = cache_key_fields(module, fingerprint or {"options": {"cpp_wrapper": True}}, dtype, buckets, shape,
                              torch.device("cpu"))
    return json.dumps(fields, sort_keys=True)


def test_key_changes_with_everything_that_changes_compiled_code(checkpoint):
    llama = _module(LlamaForCausalLM, checkpoint)
    base = _key(llama)
    assert _key(_module(LlamaForCausalLM, checkpoint)) == base  # deterministic
    assert _key(_module(EditedLlama, checkpoint)) != base  # modeling source
    assert modeling_source_hash(_module(EditedLlama, checkpoint)) != modeling_source_hash(llama)
    assert _key(llama, fingerprint={"options": {"cpp_wrapper": False}}) != base  # compile config
    assert _key(llama, dtype=torch.bfloat16) != base
    assert _key(llama, buckets=Buckets((1, 2), (32,))) != base
    assert _key(llama, shape=(3, 4, 33, 16)) != base  # KV-cache geometry
    assert _key(_module(LlamaForCausalLM, checkpoint, "llama3_gqa")) != base  # model config
    assert _key(_module(Qwen2ForCausalLM, checkpoint, "qwen2")) != _key(_module(LlamaForCausalLM, checkpoint, "qwen2"))


def _sealed_cache(tmp_path):
    cache = GraphCache(str(tmp_path), FIELDS)
    assert cache.status == "cold"
    with cache.compiling():  # stands for a compile writing into inductor's cache dir
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == cache.dir
        os.makedirs(os.path.join(cache.dir, "fxgraph", "ab"))
        with open(os.path.join(cache.dir, "fxgraph", "ab", "entry"), "wb") as f:
            f.write(b"compiled graph bytes" * 100)
        with open(os.path.join(cache.dir, "kernel.so"), "wb") as f:
            f.write(b"\x7fELF" + b"\0" * 1000)
    assert GraphCache(str(tmp_path), FIELDS).status == "warm"
    return cache


def _damage_truncate(cache):
    with open(os.path.join(cache.dir, "kernel.so"), "r+b") as f:
        f.truncate(10)


def _damage_flip(cache):
    path = os.path.join(cache.dir, "fxgraph", "ab", "entry")
    data = bytearray(open(path, "rb").read())
    data[5] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _damage_extra(cache):
    open(os.path.join(cache.dir, "stray.py"), "w").write("print('not ours')")


def _damage_manifest(cache):
    os.remove(os.path.join(cache.dir, MANIFEST))


def _damage_foreign(cache):
    path = os.path.join(cache.dir, MANIFEST)
    manifest = json.load(open(path))
    manifest["fields"] = {"example": 2}
    json.dump(manifest, open(path, "w"))


def _damage_garbage_manifest(cache):
    open(os.path.join(cache.dir, MANIFEST), "w").write("{truncated")


@pytest.mark.parametrize("damage, reason", [
    (_damage_truncate, "kernel.so does not match its checksum"),
    (_damage_flip, "fxgraph/ab/entry does not match its checksum"),
    (_damage_extra, "unexpected file stray.py"),
    (_damage_manifest, "no manifest"),
    (_damage_foreign, "belongs to another key"),
    (_damage_garbage_manifest, "unreadable manifest"),
])
def test_damaged_entries_are_detected_and_rebuilt(tmp_path, damage, reason):
    damage(_sealed_cache(tmp_path))
    reopened = GraphCache(str(tmp_path), FIELDS)
    assert reopened.status.startswith("rebuilt") and reason in reopened.status
    assert os.listdir(reopened.dir) == []  # wiped: the next compile starts clean


PROCESS = textwrap.dedent("""
    import json, sys, time
    import zoo
    start = time.perf_counter()
    model = zoo.load(compiled=True, max_batch_size=1, max_seq_len=64, cache_dir=sys.argv[1])
    stream = model.stream("Beautiful is", max_new_tokens=8)
    for _ in stream:
        pass
    # when the first token was sampled (right after prefill, which needs only the prefill graph)
    first_token = stream.requests[0].t_first - start
    print(json.dumps({"seconds": first_token, "graph_seconds": model.compile_seconds, "seconds_8_tokens": time.perf_counter() - start,
                      "status": model.engine.runner.graph_cache.status, "tokens": stream.results[0].token_ids,
                      "dir": model.engine.runner.graph_cache.dir}))
""")


def _process(root):
    run = subprocess.run([sys.executable, "-c", PROCESS, root], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _machine_busy() -> bool:
    """More runnable work than twice the cores (this test's own compiles reach about 1x)."""
    return os.getloadavg()[0] > 2 * (os.cpu_count() or 1)


def _cold_and_warm(root):
    """One measurement: a cold process on an empty cache, then the best of two warm processes."""
    cold = _process(root)
    warm = [_process(root), _process(root)]
    assert cold["status"] == "cold" and {w["status"] for w in warm} == {"warm"}
    graph_ratio = cold["graph_seconds"] / min(w["graph_seconds"] for w in warm)
    return cold, warm, graph_ratio


@pytest.mark.compiled
def test_second_process_reaches_first_token_5x_faster_and_survives_corruption(tmp_path):
    """A new process on a warm cache must reach its first token (from zoo.load, so model and
    tokenizer loading count) >= 5x sooner than on a cold one, and build its graphs >= 5x faster."""
    import zoo

    expected = zoo.load(max_batch_size=1, max_seq_len=64).generate("Beautiful is", max_new_tokens=8).token_ids
    # Timing on a shared 2-core machine is noisy: a second full measurement (fresh cache) is taken
    # only if the first one falls short; the bar itself stays at 5x.
    graph_ratios, ttft_ratios, busy = [], [], []
    for attempt in range(2):
        root = str(tmp_path / f"cache{attempt}")
        cold, warm, ratio = _cold_and_warm(root)
        ttft_ratio = cold["seconds"] / min(w["seconds"] for w in warm)
        graph_ratios.append(ratio)
        ttft_ratios.append(ttft_ratio)
        busy.append(_machine_busy())
        print(f"graph build: cold {cold['graph_seconds']:.2f} s, warm {min(w['graph_seconds'] for w in warm):.2f} s, "
              f"ratio {ratio:.1f}x | load-to-first-token: cold {cold['seconds']:.2f} s, warm "
              f"{min(w['seconds'] for w in warm):.2f} s, ratio {ttft_ratio:.1f}x (to 8 tokens: cold {cold['seconds_8_tokens']:.2f} s, warm "
              f"{min(w['seconds_8_tokens'] for w in warm):.2f} s), 1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        assert cold["tokens"] == expected and all(w["tokens"] == expected for w in warm)
        if ratio >= 5 and ttft_ratio >= 5:
            break
    # the CPU-ISA probe outcome was recorded by the cold process (what lets warm ones skip the probes)
    record = json.load(open(os.path.join(cold["dir"], "cpu_isa.json")))
    assert record["advertised"] and set(record["buildable"]) <= set(record["advertised"])
    if max(graph_ratios) < 5 and max(ttft_ratios) < 5 and all(busy):
        # Other processes held the cores during every measurement: a speed ratio says nothing then.
        print(f"ratios not asserted: the machine was saturated by other processes ({graph_ratios}, {ttft_ratios})")
    else:
        assert max(graph_ratios) >= 5, f"warm graph build only {', '.join(f'{r:.1f}x' for r in graph_ratios)} faster"
        assert max(ttft_ratios) >= 5, f"warm first token only {', '.join(f'{r:.1f}x' for r in ttft_ratios)} sooner"

    # truncate one compiled artifact: the next process detects it, rebuilds, and still answers right
    sos = [os.path.join(d, f) for d, _, fs in os.walk(cold["dir"]) for f in fs if f.endswith(".so")]
    with open(sos[0], "r+b") as f:
        f.truncate(64)
    rebuilt = _process(root)
    assert rebuilt["status"].startswith("rebuilt") and "does not match its checksum" in rebuilt["status"]
    assert rebuilt["tokens"] == expected
