"""AOTInductor export (zoo.graphs.aoti, python -m zoo.export): a tiny Llama exported by the CLI in a
subprocess (one prefill and one decode package), then loaded here onto a fresh eager model.

Checks: same logits (<= 1e-4) and greedy tokens as eager, KV caches written in place like eager,
weights fed from the module (not copied, not in the packages), no dynamo/compile at load,
refused mismatches and non-exported shapes with clear errors."""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import zoo
from checkpoints import build_checkpoint
from zoo.graphs.aoti import ExportedGraphs
from zoo.graphs.kv_cache import KVCache

pytestmark = pytest.mark.compiled

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SEQ_LEN = 32  # one prompt-length bucket, 32 = max_seq_len
# A large vocabulary makes the weights (embedding + LM head, 16 MiB) much bigger than the
# packages' code (~2 MiB each), so "weights are not in the package" shows in the sizes.
VOCAB = 32000
PROMPT = [3, 17, 42, 99, 7, 250, 11, 31000]
NEW_TOKENS = 16


def _load(path, dtype="float32", max_seq_len=MAX_SEQ_LEN):
    return zoo.load(path, dtype=dtype, max_batch_size=1, max_seq_len=max_seq_len,
                    buckets=zoo.Buckets((1,), tuple(sorted({32, max_seq_len}))))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint path, export dir), exported once by the CLI in a subprocess."""
    root = tmp_path_factory.mktemp("aoti")
    path = build_checkpoint("llama3_gqa", str(root / "model"), vocab_size=VOCAB)
    out = str(root / "graphs")
    cmd = [sys.executable, "-m", "zoo.export", "--model-path", path, "--out", out, "--max-batch-size", "1",
           "--max-seq-len", str(MAX_SEQ_LEN), "--batch-sizes", "1", "--prefill-lens", "32", "--dtype", "float32",
           "--context-lens", "none"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == out  # the finished folder on stdout ...
    assert "exporting decode graph for batch 1" in proc.stderr  # ... progress on stderr
    return path, out


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _greedy(prefill, decode, cache):
    """Prompt into slot 0 (its blocks taken first: block 0 on), then greedy decode: (tokens,
    logits of every step [NEW_TOKENS, V])."""
    slot = cache.alloc(0)
    assert cache.reserve(slot, len(PROMPT) + NEW_TOKENS)
    tables, k, v = cache.block_tables[slot:slot + 1], cache.k, cache.v
    ids = torch.zeros(1, 32, dtype=torch.long)
    ids[0, : len(PROMPT)] = torch.tensor(PROMPT)
    logits = [prefill(ids, torch.tensor([0]), torch.tensor([len(PROMPT)]), tables, k, v)]
    tokens = [int(logits[-1].argmax(-1))]
    for step in range(NEW_TOKENS - 1):
        position = torch.tensor([len(PROMPT) + step])
        logits.append(decode(torch.tensor([[tokens[-1]]]), position, tables, k, v))
        tokens.append(int(logits[-1].argmax(-1)))
    return tokens, torch.cat(logits)


def test_exported_graphs_match_eager_and_write_the_cache_in_place(exported):
    path, out = exported
    model = _load(path)
    module, cache = model.module, model.engine.cache
    counters = torch._dynamo.utils.counters
    graphs_before = dict(counters["stats"])

    graphs = ExportedGraphs.load(out, module, cache)
    assert graphs.batch_sizes == (1,) and graphs.prefill_lens == (32,)
    k_ptrs = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        tokens, logits = _greedy(graphs.prefill, graphs.decode, cache)
        # eager reference: the same module, its own zeroed cache of the same geometry
        ref_cache = KVCache(len(cache.k), cache.num_slots, cache.k[0].shape[1], cache.max_seq_len,
                            cache.k[0].shape[3], torch.float32, torch.device("cpu"), block_size=cache.block_size,
                            num_tokens=cache.num_tokens)
        ref_tokens, ref_logits = _greedy(module.prefill, module.decode, ref_cache)

    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    # The graphs wrote the caller's cache tensors in place: same storage, same contents as eager
    # (positions [0, prompt + 15) of slot 0, in block 0; everything else still zero).
    assert [t.data_ptr() for t in cache.k + cache.v] == k_ptrs
    for got, want in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        assert torch.equal(got != 0, want != 0)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        assert got[0, :, : len(PROMPT) + NEW_TOKENS - 1].abs().sum() > 0

    # Loading and running compiled nothing: no dynamo graph was captured.
    assert dict(counters["stats"]) == graphs_before


def test_weights_come_from_the_module_not_from_the_packages(exported):
    path, out = exported
    model = _load(path)
    module, cache = model.module, model.engine.cache
    head = module.lm_head.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    # The packages hold code only: far smaller than the weights, and no weight bytes inside.
    manifest = _read_json(os.path.join(out, "manifest.json"))
    files = [g["file"] for kind in ("prefill", "decode") for g in manifest["graphs"][kind]]
    assert sorted(files) == ["decode_b1.pt2", "prefill_b1_s32.pt2"]  # (no context buckets: the whole table)
    probe = head[12345, :16].detach().numpy().tobytes()  # 64 bytes of random fp32 weights
    for file in files:
        package = os.path.join(out, file)
        assert os.path.getsize(package) < weight_bytes / 4, (file, os.path.getsize(package), weight_bytes)
        with zipfile.ZipFile(package) as z:
            assert not any(probe in z.read(name) for name in z.namelist()), f"weights found in {file}"

    # The runners read the module's own tensors (user-managed, no copy): an in-place change to the
    # LM head shows up in the exported decode graph's output.
    graphs = ExportedGraphs.load(out, module, cache)
    ids, scratch = torch.tensor([[5]]), torch.tensor([cache.scratch_position])  # writes only scratch space
    tables = cache.scratch_tables(1)
    with torch.no_grad():
        before = graphs.decode(ids, scratch, tables, cache.k, cache.v).clone()
        head.mul_(2)
        try:
            after = graphs.decode(ids, scratch, tables, cache.k, cache.v)
        finally:
            head.div_(2)
    assert torch.allclose(after, 2 * before, rtol=1e-6, atol=0)


def test_mismatched_model_or_cache_is_refused(exported, tmp_path):
    path, out = exported
    bf16 = _load(path, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"dtype='float32'.*dtype='bfloat16'"):
        ExportedGraphs.load(out, bf16.module, bf16.engine.cache)

    longer = _load(path, max_seq_len=64)
    with pytest.raises(ValueError, match=r"max_seq_len=32.*max_seq_len=64"):
        ExportedGraphs.load(out, longer.module, longer.engine.cache)

    model = _load(path)
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    manifest_path = os.path.join(copy, "manifest.json")
    good = _read_json(manifest_path)
    for field, value in [("torch_version", "1.0.0"), ("config_sha256", "0" * 64)]:
        _write(manifest_path, json.dumps({**good, field: value}))
        expected = re.escape(f"{field}='{value}'") + ".*" + re.escape(f"{field}='{good[field]}'")
        with pytest.raises(ValueError, match=expected):
            ExportedGraphs.load(copy, model.module, model.engine.cache)

    # missing / corrupt export folders name the path
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ExportedGraphs.load(str(tmp_path / "nowhere"), model.module, model.engine.cache)
    _write(manifest_path, "{ not json")
    with pytest.raises(ValueError, match="manifest.json.*corrupt"):
        ExportedGraphs.load(copy, model.module, model.engine.cache)
    _write(manifest_path, json.dumps(good))
    os.remove(os.path.join(copy, "decode_b1.pt2"))
    with pytest.raises(FileNotFoundError, match="decode_b1.pt2"):
        ExportedGraphs.load(copy, model.module, model.engine.cache)


def test_shape_outside_the_exported_buckets_is_refused(exported):
    path, out = exported
    model = _load(path)
    cache = model.engine.cache
    graphs = ExportedGraphs.load(out, model.module, cache)
    one, zero, tables = torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), cache.scratch_tables(1)
    with pytest.raises(ValueError, match=r"prefill .* shape \[1, 16\].*batch sizes \[1\] x prompt lengths \[32\]"):
        graphs.prefill(torch.zeros(1, 16, dtype=torch.long), zero, one, tables, cache.k, cache.v)
    with pytest.raises(ValueError, match=r"decode graph for input_ids of shape \[2, 1\].*batch sizes \[1\]"):
        graphs.decode(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long), cache.scratch_tables(2),
                      cache.k, cache.v)
    with pytest.raises(ValueError, match="positions must be a contiguous int64"):
        graphs.decode(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.int32), tables, cache.k, cache.v)
    with pytest.raises(ValueError, match="block_tables must be a contiguous int64 tensor of shape"):
        graphs.decode(torch.zeros(1, 1, dtype=torch.long), zero, tables[:, :1], cache.k, cache.v)


def test_cli_reports_a_bad_model_path(tmp_path, capsys):
    from zoo.export import main

    assert main(["--model-path", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--max-seq-len", "256", "--prefill-lens", "32,64"], "--prefill-lens [32, 64] cannot be loaded back"),
    (["--max-batch-size", "4", "--batch-sizes", "1,2"], "--batch-sizes [1, 2] cannot be loaded back"),
    (["--max-seq-len", "64", "--prefill-lens", "32,64", "--context-lens", "16,32"],
     "--context-lens [16, 32] cannot be loaded back"),
])
def test_cli_refuses_buckets_that_could_not_be_loaded_back_before_exporting(tmp_path, capsys, args, message):
    """zoo.load(compiled=DIR) needs the buckets to end at the cache size: the export says so before
    compiling anything, and writes nothing."""
    from zoo.export import main

    out = tmp_path / "out"
    assert main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was exported" in err
    assert not out.exists() or not any(out.iterdir())


def test_zoo_load_from_an_export_dir_generates_eager_tokens_without_compiling(exported):
    from torch._dynamo.utils import counters

    path, out = exported
    graphs_before = counters["stats"]["unique_graphs"]
    model = zoo.load(path, compiled=out)  # buckets, dtype and cache size come from the export
    assert model.engine.runner.buckets == zoo.Buckets((1,), (32,)) and model.engine.cache.max_seq_len == 32
    eager = _load(path)
    for prompt in (PROMPT, [5, 9], list(range(1, 20))):
        got = model.generate(prompt, max_new_tokens=12).token_ids
        assert got == eager.generate(prompt, max_new_tokens=12).token_ids
    assert len(model.generate([PROMPT, [5, 9]], max_new_tokens=4)) == 2  # 2 requests through 1 slot
    assert counters["stats"]["unique_graphs"] == graphs_before  # nothing traced or compiled
    with pytest.raises(ValueError, match=r"max_batch_size=4 was asked for, but the graphs .* max_batch_size=1"):
        zoo.load(path, compiled=out, max_batch_size=4)


def test_exported_context_buckets_give_the_eager_tokens(exported, tmp_path):
    """Decode graphs exported per context bucket (16, 32): zoo.load(compiled=DIR) picks the bucket
    each step, across the boundary, with the tokens of eager zoo."""
    from zoo.graphs.aoti import export_graphs

    path, _ = exported
    model = zoo.load(path, max_batch_size=1, max_seq_len=MAX_SEQ_LEN, buckets=zoo.Buckets((1,), (32,), (16, 32)))
    out = export_graphs(model.module, model.kv_cache, str(tmp_path / "ctx"), [1], [32], [16, 32])
    files = sorted(g["file"] for g in _read_json(os.path.join(out, "manifest.json"))["graphs"]["decode"])
    assert files == ["decode_b1_c16.pt2", "decode_b1_c32.pt2"]
    exported_model = zoo.load(path, compiled=out)
    assert exported_model.buckets.context_lens == (16, 32)
    got = exported_model.generate(PROMPT, max_new_tokens=20).token_ids  # 8 + 20 tokens: crosses 16
    assert got == zoo.load(path, max_batch_size=1, max_seq_len=MAX_SEQ_LEN).generate(PROMPT, max_new_tokens=20).token_ids
