"""zoo's CPU decode kernels (zoo.layers.cpu_kernels): the ops equal a float matmul on the same
weights for every row count and width (tails included), refuse bad shapes by name, and compiled
one-row matmuls call them."""
import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import zoo
from zoo.device import default_cache_dir
from zoo.layers import cpu_kernels, quant
from zoo.layers.linear import linear


@pytest.fixture(scope="module", autouse=True)
def kernels():
    # this project's machines have AVX2 or AVX-512 and gcc (inductor needs it too): the build must work
    assert cpu_kernels.load(default_cache_dir()), cpu_kernels.load_error()


SHAPES = [(1, 64, 5), (1, 100, 130), (2, 2048, 64), (3, 96, 7), (4, 160, 33), (8, 64, 12), (9, 2080, 40),
          (20, 2048, 19), (cpu_kernels.MAX_ROWS, 96, 33)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemv_bf16_equals_a_float_matmul(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    want = x.float() @ w.float().T  # bf16 products are exact in fp32: only the order of the sums differs
    for xin in (x, x.float()):  # bf16 activations (bf16 dot products where the CPU has them) and fp32
        got = torch.ops.zoo.gemv_bf16(xin, w)
        assert got.dtype == xin.dtype and got.shape == (m, n)
        tol = 1e-5 * k ** 0.5 * want.abs().max().item() + (4e-3 * want.abs().max().item() if xin.dtype == torch.bfloat16 else 0)
        assert (got.float() - want).abs().max().item() <= tol


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemv_int8_equals_the_dequantized_matmul(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    stored = quant.quantize_int8(torch.randn(n, k, generator=g))
    want = x @ quant.dequantize(stored, torch.float32).T
    got = torch.ops.zoo.gemv_int8(x, stored["qweight"], stored["scales"])
    assert (got - want).abs().max().item() <= 1e-5 * k ** 0.5 * want.abs().max().item()
    got16 = torch.ops.zoo.gemv_int8(x.to(torch.bfloat16), stored["qweight"], stored["scales"].to(torch.bfloat16))
    assert got16.dtype == torch.bfloat16
    assert (got16.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()


def _int4_reference(x: torch.Tensor, stored: dict[str, torch.Tensor], scale_dtype: torch.dtype) -> torch.Tensor:
    """What gemv_int4 stands for, in float64: x quantized to int8 per 64 columns (absmax / 127) meets
    the centred weights (q - 8) * scale, and the exact x meets the zeros (see cpu_gemv.cpp)."""
    m, k = x.shape
    chunks = x.double().reshape(m, k // 64, 64)
    step = chunks.abs().amax(-1, keepdim=True) / 127
    x_hat = (torch.round(chunks / step) * step).reshape(m, k)
    q = quant.unpack_int4(stored["qweight"]).double()  # [N, K]
    n = q.shape[0]
    groups = stored["scales"].shape[1]
    scales, zeros = (stored[leaf].to(scale_dtype).double().repeat_interleave(k // groups, dim=1) for leaf in ("scales", "zeros"))
    return x_hat @ ((q - 8) * scales).T + x.double() @ zeros.T


INT4_SHAPES = [(1, 64, 5, 64), (2, 192, 16, 64), (3, 256, 7, 128), (5, 512, 33, 256), (9, 2048, 40, 64), (16, 128, 3, 64)]


@pytest.mark.parametrize("m,k,n,group", INT4_SHAPES)
def test_gemv_int4_computes_the_matmul_on_int8_activations(m, k, n, group):
    """Exactly (up to fp32 sums) the product it stands for, for 1-16 rows, odd chunk counts and groups
    of 64-256; against the float matmul on the dequantized weight its error is that of int8
    activations: under 1.5% of the output's norm (bf16 activations alone: ~0.4%)."""
    if not cpu_kernels.has_int4():
        pytest.skip("zoo::gemv_int4 needs AVX512_VNNI")
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    stored = quant.quantize_int4(torch.randn(n, k, generator=g) * 0.02, group)
    exact = x.double() @ quant.dequantize(stored, torch.float32).double().T
    for xin, scale_dtype in ((x, torch.float32), (x.to(torch.bfloat16), torch.bfloat16)):
        got = torch.ops.zoo.gemv_int4(xin, stored["qweight"], stored["scales"].to(scale_dtype),
                                      stored["zeros"].to(scale_dtype))
        assert got.dtype == xin.dtype and got.shape == (m, n)
        want = _int4_reference(xin.float(), stored, scale_dtype)
        rounding = 4e-3 if xin.dtype == torch.bfloat16 else 1e-5  # the output's own dtype (bf16: one ulp)
        assert (got.double() - want).abs().max().item() <= rounding * want.abs().max().item() + 1e-6
        assert ((got.double() - exact).norm() / exact.norm()).item() < 0.015


def test_bad_shapes_are_refused_by_name():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x has 32 columns, the weight 64"):
        torch.ops.zoo.gemv_bf16(torch.zeros(1, 32, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="bf16 weights"):
        torch.ops.zoo.gemv_bf16(torch.zeros(1, 64), w.float())
    with pytest.raises(RuntimeError, match="one scale per output row"):
        torch.ops.zoo.gemv_int8(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(4))
    if cpu_kernels.has_int4():
        q = torch.zeros(8, 32, dtype=torch.uint8)
        with pytest.raises(RuntimeError, match="needs groups of 64"):
            torch.ops.zoo.gemv_int4(torch.zeros(1, 64), q, torch.ones(8, 2), torch.zeros(8, 2))  # groups of 32
        with pytest.raises(RuntimeError, match="float32 or bfloat16"):
            torch.ops.zoo.gemv_int4(torch.zeros(1, 64), q, torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.float16))
        with pytest.raises(RuntimeError, match="x has 128 columns, the weight 64"):
            torch.ops.zoo.gemv_int4(torch.zeros(1, 128), q, torch.ones(8, 1), torch.zeros(8, 1))


def test_int4_layout_follows_the_run_dtype_and_the_kernels_shapes():
    """One rule decides an int4 layer's layout (and so its kernel): zoo's form only in bf16 runs on
    CPU, ATen's packing where its 16-row blocks fit, the stored form otherwise; an fp32 run's layer
    ATen does not take stays stored, and its matmul is exact."""
    zoo_form = quant.ZOO_INT4 if cpu_kernels.has_int4() else quant.ATEN_INT4
    assert quant.int4_layout("cpu", torch.bfloat16, (48, 128), 64) == zoo_form
    assert quant.int4_layout("cpu", torch.float32, (48, 128), 64) == quant.ATEN_INT4
    assert quant.int4_layout("cpu", torch.float32, (40, 128), 64) == quant.STORED  # 40 rows: not 16-row blocks
    assert quant.int4_layout("cpu", torch.bfloat16, (48, 96), 32) == quant.ATEN_INT4  # 32-column groups
    assert quant.int4_layout("cuda", torch.bfloat16, (48, 128), 64) == quant.STORED
    stored = quant.quantize_int4(torch.randn(40, 128), 64)
    x = torch.randn(2, 1, 128)
    want = x @ quant.dequantize(stored, torch.float32).T
    assert torch.allclose(quant.weight_only_matmul(x, "int4", stored, quant.STORED), want, atol=1e-5)


@pytest.mark.compiled
def test_a_compiled_one_row_bf16_matmul_calls_the_kernel():
    w = torch.randn(48, 64).to(torch.bfloat16)
    fn = torch.compile(lambda x: linear(x, w), fullgraph=True)
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    y, code = run_and_get_code(fn, x)
    assert "gemv_bf16" in "\n".join(code)
    assert torch.equal(y, torch.ops.zoo.gemv_bf16(x.reshape(1, 64), w).reshape(1, 1, 48))


@pytest.mark.compiled
def test_compiled_bf16_matmuls_of_rows_known_few_call_the_kernel():
    """A flattened chunk-and-decode step ([1, N, K]) goes to gemv_bf16 when N is at most MAX_ROWS
    while tracing: a static N, or a dynamic one whose upper bound is (the graph then serves every N
    without recompiling). An unbounded dynamic N, or more rows, keep the matmul."""
    w = torch.randn(48, 64).to(torch.bfloat16)

    def code_for(rows: int, bound: int | None = None) -> str:
        torch._dynamo.reset()
        fn = torch.compile(lambda x: linear(x, w), fullgraph=True, dynamic=False)
        x = torch.randn(1, rows, 64).to(torch.bfloat16)
        if bound is not None:
            torch._dynamo.mark_dynamic(x, 1, min=2, max=bound)
        y, code = run_and_get_code(fn, x)
        torch.testing.assert_close(y.float(), (x.float() @ w.float().T), atol=0.05, rtol=0.02)
        if bound is not None:  # another row count in the range runs the same graph
            with torch._dynamo.config.patch(error_on_recompile=True):
                fn(torch.randn(1, rows - 1, 64).to(torch.bfloat16))
        return "\n".join(code)

    assert "gemv_bf16" in code_for(20)
    assert "gemv_bf16" in code_for(12, bound=cpu_kernels.MAX_ROWS)
    assert "gemv_bf16" not in code_for(12, bound=2 * cpu_kernels.MAX_ROWS)
    assert "gemv_bf16" not in code_for(cpu_kernels.MAX_ROWS + 1)


@pytest.mark.compiled
def test_compiled_int4_decode_rows_call_the_kernel():
    """bf16 int4 in zoo's form: decode rows (one token per sequence) go to gemv_int4 in a compiled
    graph; a prefill's [B, S, K] does not."""
    if not cpu_kernels.has_int4():
        pytest.skip("zoo::gemv_int4 needs AVX512_VNNI")
    params = quant.int4_for_zoo_kernel(quant.quantize_int4(torch.randn(48, 128), 64))
    fn = torch.compile(lambda x: quant.weight_only_matmul(x, "int4", params, quant.ZOO_INT4), fullgraph=True)
    x = torch.randn(3, 1, 128).to(torch.bfloat16)
    y, code = run_and_get_code(fn, x)
    assert "gemv_int4" in "\n".join(code)
    want = torch.ops.zoo.gemv_int4(x.reshape(3, 128), params["qweight"], params["scales"], params["zeros"])
    assert torch.equal(y, want.reshape(3, 1, 48))
    _, code = run_and_get_code(fn, torch.randn(1, 5, 128).to(torch.bfloat16))
    assert "gemv_int4" not in "\n".join(code)


@pytest.mark.compiled
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_compiled_bf16_model_matches_eager(checkpoint, tmp_path, quantize):
    """The tiny Llama in bf16: the compiled decode (one-row matmuls in zoo's kernels: gemv_bf16, or
    gemv_int4 for int4 weights, which the layers then hold in its form) gives eager's logits up to
    bf16 rounding, and a graph cache built with the kernels records them in its key."""
    path = checkpoint("llama3_gqa")
    eager = zoo.load(path, dtype="bfloat16", max_batch_size=1, max_seq_len=64, quantize=quantize)
    model = zoo.load(path, dtype="bfloat16", max_batch_size=1, max_seq_len=64, compiled=True, cache_dir=str(tmp_path),
                     quantize=quantize)
    if quantize and cpu_kernels.has_int4():
        # qkv reads 64 features (groups of 64: zoo's form); down_proj 160 (groups of 32: ATen's packing)
        layer = model.module.model.layers[0].self_attn.qkv_proj
        assert layer.layout == quant.ZOO_INT4 and layer.scales.dtype == torch.bfloat16
        assert model.module.model.layers[0].mlp.down_proj.layout == quant.ATEN_INT4
    assert model.engine.runner.graph_cache.fields["compile_config"]["cpu_kernels"] == cpu_kernels.fingerprint()
    runs = [m.engine for m in (model, eager)]
    logits = []
    for engine in runs:
        slot = engine.cache.alloc()
        engine.runner.prefill([[3, 17, 42, 99, 7]], [slot])
        tokens, positions = torch.tensor([[11]]), torch.tensor([5])
        logits.append(engine.runner.decode(tokens, positions, 6).float())
        engine.cache.free(slot)
    scale = logits[1].abs().max().item()
    assert (logits[0] - logits[1]).abs().max().item() <= 0.03 * scale
