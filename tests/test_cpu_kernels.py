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


SHAPES = [(1, 64, 5), (1, 100, 130), (2, 2048, 64), (3, 96, 7), (4, 160, 33), (8, 64, 12), (9, 2080, 40)]


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


def test_bad_shapes_are_refused_by_name():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x has 32 columns, the weight 64"):
        torch.ops.zoo.gemv_bf16(torch.zeros(1, 32, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="bf16 weights"):
        torch.ops.zoo.gemv_bf16(torch.zeros(1, 64), w.float())
    with pytest.raises(RuntimeError, match="one scale per output row"):
        torch.ops.zoo.gemv_int8(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(4))


@pytest.mark.compiled
def test_a_compiled_one_row_bf16_matmul_calls_the_kernel():
    w = torch.randn(48, 64).to(torch.bfloat16)
    fn = torch.compile(lambda x: linear(x, w), fullgraph=True)
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    y, code = run_and_get_code(fn, x)
    assert "gemv_bf16" in "\n".join(code)
    assert torch.equal(y, torch.ops.zoo.gemv_bf16(x.reshape(1, 64), w).reshape(1, 1, 48))


@pytest.mark.compiled
def test_compiled_bf16_model_matches_eager(checkpoint, tmp_path):
    """The tiny Llama in bf16: the compiled decode (one-row matmuls in zoo's kernel) gives eager's
    logits up to bf16 rounding, and a graph cache built with the kernels records them in its key."""
    path = checkpoint("llama3_gqa")
    eager = zoo.load(path, dtype="bfloat16", max_batch_size=1, max_seq_len=64)
    model = zoo.load(path, dtype="bfloat16", max_batch_size=1, max_seq_len=64, compiled=True, cache_dir=str(tmp_path))
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
