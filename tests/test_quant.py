"""Weight-only int8 / int4 quantization: the stored format and the kernels, parity with transformers
on the dequantized weights, quantized checkpoints (python -m zoo.quantize) = quantizing while
loading, compiled = eager without recompiles, tensor parallelism, the graph-cache key, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

import zoo
from zoo.distributed.comm import TPContext
from zoo.distributed.launch import run_ranks
from zoo.entrypoints.quantize import quantize_checkpoint
from zoo.config import Quantization
from zoo.errors import CheckpointError, ConfigError, TPWorkerError
from zoo.graphs import Buckets
from zoo.layers import quant

from checkpoints import build_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[3, 17, 42, 99, 7, 250, 11], [5, 9], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 1, 2]]
MODES = ["int8", "int4"]


# ---- format and kernels --------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(64, 128), (48, 256), (352, 128), (16, 64), (112, 64), (2048, 256)])
def test_cpu_int4_layout_is_unpacked_exactly(n, k):
    """unpack_cpu_int4 inverts ATen's CPU packing: for blocks of 64 rows and the tails of 16 / 32 / 48."""
    stored = quant.quantize_int4(torch.randn(n, k), 32)
    packed = quant.pack_int4_for_cpu(stored, torch.float32)
    assert torch.equal(quant.unpack_cpu_int4(packed["qweight"]), quant.unpack_int4(stored["qweight"]))


@pytest.mark.parametrize("mode", MODES)
def test_quantization_error_is_within_half_a_step(mode):
    w = torch.randn(96, 256)
    stored = quant.quantize(w, mode, 64)
    err = (quant.dequantize(stored, torch.float32) - w).abs()
    if mode == "int8":
        assert stored["qweight"].dtype == torch.int8 and stored["scales"].shape == (96,)
        step = stored["scales"][:, None]
    else:
        assert stored["qweight"].shape == (96, 128) and stored["scales"].shape == (96, 4)
        step = stored["scales"].repeat_interleave(64, dim=1)
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 3, quant.WEIGHT_ONLY_KERNEL_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_matmul_equals_matmul_with_the_dequantized_weight(mode, rows, dtype):
    """Both kernel paths (few rows: ATen's weight-only kernels; many rows: dequantize + matmul) compute
    x @ dequantize(W)^T."""
    torch.manual_seed(0)
    w, x = torch.randn(128, 256), torch.randn(rows, 256).to(dtype)
    stored = quant.quantize(w, mode, 64)
    params = {k: v.to(dtype) if v.is_floating_point() else v for k, v in stored.items()}
    layout = quant.ATEN_INT4 if mode == "int4" else quant.STORED
    if layout == quant.ATEN_INT4:
        params = quant.pack_int4_for_cpu(stored, dtype)
    want = x.float() @ quant.dequantize(stored, torch.float32).t()
    got = quant.weight_only_matmul(x, mode, params, layout).float()
    tol = 1e-4 if dtype == torch.float32 else 0.02
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()


# ---- models ---------------------------------------------------------------------------------------

def _dequantized_hf(path: str, mode: str, model) -> torch.nn.Module:
    """transformers' model with every linear weight zoo quantizes replaced by its dequantized value."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    group = model.config.quantization.group_size
    lm_head_mode = model.config.quantization.lm_head
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".weight") and p.dim() == 2 and "embed_tokens" not in name:
                if name == "lm_head.weight":
                    if lm_head_mode is None:
                        continue
                    p.copy_(quant.dequantize(quant.quantize(p, lm_head_mode, group), torch.float32))
                else:
                    p.copy_(quant.dequantize(quant.quantize(p, mode, group), torch.float32))
    return hf


@pytest.mark.parametrize("kind", ["llama3_gqa", "qwen2", "qwen3_bias"])
@pytest.mark.parametrize("mode", MODES)
def test_quantized_model_matches_transformers_on_the_dequantized_weights(checkpoint, kind, mode):
    """fp32 logits within 1e-4 of transformers running the dequantized weights, and the same greedy
    tokens: the quantized matmuls compute exactly what they stand for (biases, tied heads included)."""
    path = checkpoint(kind)
    model = zoo.load(path, quantize=mode, max_batch_size=4, max_seq_len=128)
    assert model.config.quantization.mode == mode
    hf = _dequantized_hf(path, mode, model)
    for prompt in PROMPTS:
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
        out = model.generate(prompt, max_new_tokens=20)
        assert out.token_ids == ref.sequences[0, len(prompt):].tolist()
    engine = model.engine
    logits = engine.runner.prefill(PROMPTS[:2], [engine.cache.scratch_slot] * 2)
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS[:2]):
            want = hf(torch.tensor([prompt])).logits[0, -1]
            assert (logits[row] - want).abs().max().item() <= 1e-4


def test_quantized_layers_hold_no_float_weight_and_fewer_bytes(checkpoint):
    path = checkpoint("llama3_gqa")
    float_model = zoo.load(path, max_batch_size=1, max_seq_len=32)
    for mode, most in (("int8", 0.3), ("int4", 0.2)):
        model = zoo.load(path, quantize=mode, max_batch_size=1, max_seq_len=32)
        for name, layer in (("qkv", model.module.model.layers[0].self_attn.qkv_proj),
                            ("down", model.module.model.layers[0].mlp.down_proj)):
            assert not hasattr(layer, "weight") or not isinstance(layer.weight, torch.Tensor), name
            ref = {"qkv": float_model.module.model.layers[0].self_attn.qkv_proj,
                   "down": float_model.module.model.layers[0].mlp.down_proj}[name]
            assert layer.weight_bytes <= most * ref.weight_bytes, (mode, name)
        assert model.module.lm_head.quant_mode == "int8"  # untied head: int8 in both modes


def test_tied_lm_head_stays_the_embedding_table(checkpoint):
    model = zoo.load(checkpoint("qwen2"), quantize="int4", max_batch_size=1, max_seq_len=32)
    assert model.module.lm_head.quant_mode is None
    assert model.module.lm_head.weight is model.module.model.embed_tokens.weight


@pytest.mark.parametrize("kind", ["llama3_gqa", "qwen1"])
@pytest.mark.parametrize("mode", MODES)
def test_quantized_checkpoint_loads_to_the_same_model(checkpoint, tmp_path, kind, mode):
    """python -m zoo.quantize writes a folder zoo.load reads as is, to the very same tensors as
    quantizing while loading; its config says how it was quantized."""
    path = checkpoint(kind)
    out = str(tmp_path / "q")
    proc = subprocess.run([sys.executable, "-m", "zoo.quantize", "--model-path", path, "--out", out, "--mode", mode],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == out
    with open(os.path.join(out, "config.json")) as f:
        qconf = json.load(f)["quantization_config"]
    assert qconf == Quantization(mode).to_hf()
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert not any(n.endswith("proj.weight") or n.endswith("c_attn.weight") for n in tensors)
    assert any(n.endswith(".qweight") for n in tensors)
    on_load = zoo.load(path, quantize=mode, max_batch_size=2, max_seq_len=64)
    stored = zoo.load(out, max_batch_size=2, max_seq_len=64)
    assert stored.config.quantization == on_load.config.quantization
    a, b = dict(on_load.module.named_parameters()), dict(stored.module.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r.token_ids for r in stored.generate(PROMPTS, max_new_tokens=12)] == [
        r.token_ids for r in on_load.generate(PROMPTS, max_new_tokens=12)]


def test_quantize_errors_name_the_problem(checkpoint, tmp_path):
    path = checkpoint("llama3_gqa")
    out = str(tmp_path / "q8")
    quantize_checkpoint(path, out, Quantization("int8"))
    with pytest.raises(ConfigError, match="already quantized"):
        zoo.load(out, quantize="int4")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_checkpoint(out, str(tmp_path / "again"), Quantization("int4"))
    with pytest.raises(CheckpointError, match="not empty"):
        quantize_checkpoint(path, out, Quantization("int8"))
    with pytest.raises(ValueError, match="quantize_group_size goes with"):
        zoo.load(path, quantize="int8", quantize_group_size=32)
    with pytest.raises(ValueError, match="unknown quantize"):
        zoo.load(path, quantize="int3")
    # a stored tensor missing from the checkpoint is named
    tensors = load_file(os.path.join(out, "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.scales"):
        zoo.load(out)
    # another tool's quantization is refused, not misread
    foreign = tmp_path / "gptq"
    foreign.mkdir()
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (foreign / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="quant_method 'gptq' is not supported"):
        zoo.load(str(foreign))


def test_embedded_models_int8_keeps_bf16_greedy_text():
    """The trained tiny models: int8 greedy tokens equal bf16's for 32 tokens on the Zen prompts."""
    prompts = ["Beautiful is", "Explicit is", "Simple is", "Flat is", "Readability", "Errors should"]
    for family in ("llama", "qwen2"):
        path = os.path.join(REPO, "zoo", "embedded", f"tiny-{family}")
        want = zoo.load(path, dtype="bfloat16").generate(prompts, max_new_tokens=32, ignore_eos=True)
        got = zoo.load(path, dtype="bfloat16", quantize="int8").generate(prompts, max_new_tokens=32, ignore_eos=True)
        assert [g.token_ids for g in got] == [w.token_ids for w in want], family


# ---- graphs ---------------------------------------------------------------------------------------

@pytest.mark.compiled
@pytest.mark.parametrize("mode", MODES)
def test_compiled_quantized_matches_eager_without_recompiles(checkpoint, tmp_path, mode):
    path = checkpoint("llama3_gqa")
    buckets = Buckets.dynamic((1, 4), 64, length_multiple=16, prefill_tokens=64)
    eager = zoo.load(path, quantize=mode, max_batch_size=4, max_seq_len=64)
    model = zoo.load(path, quantize=mode, max_batch_size=4, max_seq_len=64, buckets=buckets, compiled=True,
                     cache_dir=str(tmp_path))
    model.warmup()
    key = model.engine.runner.graph_cache.fields["compile_config"]
    assert key["quantization"] == Quantization(mode).to_hf()  # a float and a quantized model never share graphs
    graphs_before = counters["stats"]["unique_graphs"]
    counters["graph_break"].clear()
    mixes = [PROMPTS, [PROMPTS[1]], [[7] * 20, [1, 2, 3], [9, 8], [4] * 40]]  # prefill batches of 1 to 4 rows
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompts in mixes:
            got = model.generate(prompts, max_new_tokens=16)
            assert [g.token_ids for g in got] == [w.token_ids for w in eager.generate(prompts, max_new_tokens=16)]
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.compiled
@pytest.mark.parametrize("mode", MODES)
def test_aot_export_of_a_quantized_model(checkpoint, tmp_path, mode):
    """int8's one-row matmuls call zoo's CPU kernel (a custom op inside the package); int4's ATen
    kernel takes a tensor argument besides the weights. The exported graphs run on the quantized
    module's tensors (and only those: the loader refuses a package that reads constants the module
    lacks); zoo.load(compiled=DIR) takes the quantization from the manifest, and refuses a model
    quantized otherwise."""
    from zoo.graphs.aoti import export_graphs

    path = checkpoint("llama3_gqa")
    model = zoo.load(path, quantize=mode, max_batch_size=1, max_seq_len=32, buckets=Buckets((1,), (32,)))
    out = export_graphs(model.module, model.kv_cache, str(tmp_path / "export"), [1], [32], [])
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["quantization"] == Quantization(mode).to_hf()
    exported = zoo.load(path, compiled=out)
    assert exported.config.quantization == Quantization(mode)
    want = model.generate(PROMPTS[0], max_new_tokens=12).token_ids
    assert exported.generate(PROMPTS[0], max_new_tokens=12).token_ids == want
    with pytest.raises(ValueError, match="was exported with quantization="):
        zoo.load(path, compiled=out, quantize="int4" if mode == "int8" else "int8")


# ---- tensor parallelism ---------------------------------------------------------------------------

def _tp_battery(ctx: TPContext | None, cases: dict) -> dict:
    out = {}
    for name, (path, options) in cases.items():
        model = zoo.load(path, max_batch_size=2, max_seq_len=64, **options, **({} if ctx is None else {"tp": ctx}))
        logits = model.engine.runner.prefill(PROMPTS[:2], [model.engine.cache.scratch_slot] * 2).clone()
        out[name] = (logits, [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=10)])
    return out


def test_tp2_quantized_matches_tp1(tmp_path):
    """Each rank reads its rows / columns of the stored tensors (a quantized checkpoint) or quantizes
    its shard while loading; both give tp=1's logits and tokens."""
    path = build_checkpoint("llama3_gqa", str(tmp_path / "f"), intermediate_size=128)
    # groups of 32 columns: the 32-column shards of o_proj (hidden 64) hold whole int4 groups
    stored = {mode: str(tmp_path / mode) for mode in MODES}
    for mode, out in stored.items():
        quantize_checkpoint(path, out, Quantization(mode, group_size=32))
    cases = {"int8_stored": (stored["int8"], {}), "int4_stored": (stored["int4"], {}),
             "int8_on_load": (path, {"quantize": "int8"}),
             "int4_on_load": (path, {"quantize": "int4", "quantize_group_size": 32})}
    ranks = run_ranks(_tp_battery, 2, cases)
    for name, case in cases.items():
        ref_logits, ref_tokens = _tp_battery(None, {name: case})[name]
        for rank in ranks:
            logits, tokens = rank[name]
            assert (logits - ref_logits).abs().max().item() <= 1e-4, name
            assert tokens == ref_tokens, name
    # groups of 64 would straddle the 32-column shards: refused, naming the sizes
    with pytest.raises(TPWorkerError, match="cannot split 64 input features into shards of 32"):
        run_ranks(_tp_battery, 2, {"int4_64": (path, {"quantize": "int4"})})


# ---- command line ---------------------------------------------------------------------------------

def test_cli_quantize_flag(checkpoint):
    proc = subprocess.run([sys.executable, "-m", "zoo.llama.infer", "--quantize", "int4", "--json",
                           "--prompt", "Beautiful is", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "int4 weights" in proc.stderr
    assert len(json.loads(proc.stdout.splitlines()[0])["token_ids"]) == 8


# ---- server ---------------------------------------------------------------------------------------

def test_server_serves_a_quantized_checkpoint(tmp_path):
    """`python -m zoo.serve --model-path <an int4 folder>`: the completion is the quantized model's
    own greedy text, and the model list names the folder's model."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from servers import start_server, stop_process

    out = str(tmp_path / "tiny-llama-int4")
    quantize_checkpoint(zoo.embedded_model_path("llama"), out, Quantization("int4", 32))
    want = zoo.load(out).generate("Beautiful is", max_new_tokens=16, ignore_eos=True).text
    proc, url = start_server(["--model-path", out, "--max-batch-size", "2", "--threads", "1"], tmp_path / "server.log")
    try:
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["tiny-llama-int4"]
        body = {"model": models[0]["id"], "prompt": "Beautiful is", "max_tokens": 16, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    finally:
        stop_process(proc)
    assert "int4 weights" in (tmp_path / "server.log").read_text()
