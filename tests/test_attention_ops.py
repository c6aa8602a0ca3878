"""zoo.layers.ops' generic attention: which kernel a CPU call takes, and that both agree."""
import pytest
import torch
import torch.nn.functional as F

from zoo.layers.ops import SHORT_QUERIES, AttentionOps


def _inputs(S: int, T: int, H: int = 8, KV: int = 2, hd: int = 16, B: int = 2, seed: int = 0):
    """q [B, H, S, hd] for the last S of T positions (a chunk after T - S cached ones), k / v
    [B, KV, T, hd], and the causal mask [B, 1, S, T]."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, L, hd, generator=g) for n, L in ((H, S), (KV, T), (KV, T)))
    positions = torch.arange(T - S, T)  # [S]
    mask = (torch.arange(T)[None, :] <= positions[:, None]).expand(B, 1, S, T)
    return q, k, v, mask


@pytest.mark.parametrize("S,T", [(1, 40), (16, 16), (16, 100), (SHORT_QUERIES, 150)])
def test_short_queries_take_the_gemv_form_and_match_sdpa(S, T):
    q, k, v, mask = _inputs(S, T)
    out = AttentionOps().attention(q, k, v, mask, is_decode=S == 1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def _attention_kernels(max_queries: int) -> set[str]:
    """The attention ops in the graph torch.compile traces for a prompt length that is dynamic up
    to max_queries (as zoo.graphs.build marks prefill chunks)."""
    seen: set[str] = set()

    def record(gm: torch.fx.GraphModule, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    ops = AttentionOps()
    fn = torch.compile(lambda q, k, v, mask: ops.attention(q, k, v, mask, is_decode=False), backend=record,
                       fullgraph=True, dynamic=False)
    q, k, v, mask = _inputs(16, 64)
    torch._dynamo.mark_dynamic(q, 2, min=8, max=max_queries)
    torch._dynamo.mark_dynamic(mask, 2, min=8, max=max_queries)
    torch._dynamo.reset()
    fn(q, k, v, mask)
    return {name for name in seen if "scaled_dot_product" in name or "matmul" in name}


def test_a_bounded_prompt_length_decides_the_kernel_while_tracing():
    """A chunk known to hold at most SHORT_QUERIES queries compiles to the GEMV form; one whose
    length may be longer keeps SDPA (the graph serves every length up to its bound)."""
    short = _attention_kernels(SHORT_QUERIES)
    assert short and not any("scaled_dot_product" in name for name in short), short
    long = _attention_kernels(2 * SHORT_QUERIES)
    assert any("scaled_dot_product" in name for name in long), long


def test_gather_kv_reads_each_rows_positions_from_its_blocks():
    """zoo::gather_kv (the CPU read of the paged cache when zoo's kernels are built) equals the
    generic gather, for contexts that end inside a block and rows whose blocks are scattered."""
    from zoo.device import default_cache_dir
    from zoo.layers import cpu_kernels

    assert cpu_kernels.load(default_cache_dir()), cpu_kernels.load_error()
    g = torch.Generator().manual_seed(1)
    N, KV, bs, hd, B = 13, 2, 4, 8, 3
    cache = torch.randn(N, KV, bs, hd, generator=g).to(torch.bfloat16)
    tables = torch.randperm(N - 1, generator=g)[:B * 4].view(B, 4)  # [B, 4 blocks]
    for T in (1, 4, 7, 16):
        k_pos = torch.arange(T)
        index = (tables.index_select(1, k_pos // bs)[:, None, :], torch.arange(KV)[None, :, None],
                 (k_pos % bs)[None, None, :])
        assert torch.equal(AttentionOps().read_kv(cache, index, tables), cache[index])  # [B, KV, T, hd]
    with pytest.raises(RuntimeError, match="block 13 is outside the pool of 13"):
        torch.ops.zoo.gather_kv(cache, torch.full((1, 3), N), 9)
    with pytest.raises(RuntimeError, match="17 positions do not fit tables of 4 blocks of 4"):
        torch.ops.zoo.gather_kv(cache, tables, 17)
