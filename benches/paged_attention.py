"""Decode attention over a paged KV cache vs the contiguous slot layout, compiled (inductor, CPU).

One layer of a Llama-3.2-1B-shaped attention (32 heads, 8 kv heads, head_dim 64, bf16), one query
per row over 512 positions, batch 1 and 8: the contiguous cache's view (slots x 2049 positions),
the paged pool read by a block gather (index_select), by zoo's per-position index (what
zoo.layers.ops.read_kv does), and a fused-reduction variant. Run: .venv/bin/python benches/paged_attention.py
"""
import time, torch
import torch.nn.functional as F
torch.manual_seed(0)
dt = torch.bfloat16
H, KV, hd, T, bs = 32, 8, 64, 512, 32
G = H // KV
NBLK = 16384 // bs
def decode_attention(q, k, v, mask):
    B, H, S, hd = q.shape; KV = k.shape[1]; G = H // KV
    scores = torch.matmul(q.reshape(B, KV, G * S, hd), k.transpose(-1, -2)).float()
    scores = scores.view(B, KV, G, S, -1) * hd ** -0.5
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(B, KV, G * S, -1)
    return torch.matmul(probs, v).view(B, H, S, hd)
def contiguous(q, kc, vc, bt, mask):
    B = q.shape[0]
    return decode_attention(q, kc[:B, :, :T], vc[:B, :, :T], mask)
def gather(q, kp, vp, bt, mask):
    B = q.shape[0]; nb = bt.shape[1]
    k = kp[bt].permute(0, 2, 1, 3, 4).reshape(B, KV, nb * bs, hd)
    v = vp[bt].permute(0, 2, 1, 3, 4).reshape(B, KV, nb * bs, hd)
    return decode_attention(q, k, v, mask)
def index3(q, kp, vp, bt, mask):
    B = q.shape[0]
    t = torch.arange(T)
    blk = bt.index_select(1, t // bs)
    idx = (blk[:, None, :], torch.arange(KV)[None, :, None], (t % bs)[None, None, :])
    return decode_attention(q, kp[idx], vp[idx], mask)
def fused(q, kp, vp, bt, mask):
    B = q.shape[0]; nb = bt.shape[1]
    k = kp[bt].permute(0, 2, 1, 3, 4).reshape(B, KV, 1, nb * bs, hd)  # lazy under inductor
    v = vp[bt].permute(0, 2, 1, 3, 4).reshape(B, KV, 1, nb * bs, hd)
    qq = q.view(B, KV, G, 1, hd).float()
    s = (qq * k.float()).sum(-1) * hd ** -0.5  # [B, KV, G, T]
    s = s.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    p = s.softmax(-1)
    o = (p[..., None] * v.float()).sum(-2)  # [B, KV, G, hd]
    return o.to(q.dtype).view(B, H, 1, hd)
def bench(fn, args, n=50):
    for _ in range(5): fn(*args)
    t = time.perf_counter()
    for _ in range(n): fn(*args)
    return (time.perf_counter() - t) / n * 1e3
opts = {"cpp_wrapper": True}
for B in (1, 8):
    q = torch.randn(B, H, 1, hd, dtype=dt)
    kc = torch.randn(9, KV, 2049, hd, dtype=dt); vc = torch.randn_like(kc)
    kp = torch.randn(NBLK + 1, KV, bs, hd, dtype=dt); vp = torch.randn_like(kp)
    perm = torch.randperm(NBLK)[: B * (T // bs)].view(B, T // bs)
    # same data for correctness check
    for b in range(B):
        for j in range(T // bs):
            kp[perm[b, j]] = kc[b, :, j*bs:(j+1)*bs]; vp[perm[b, j]] = vc[b, :, j*bs:(j+1)*bs]
    mask = (torch.arange(T)[None] <= torch.full((B,), T - 3)[:, None]).view(B, 1, 1, T)
    res = {}
    ref = None
    for name, fn, a in (("contiguous", contiguous, (q, kc, vc, perm, mask)), ("gather", gather, (q, kp, vp, perm, mask)),
                        ("index3", index3, (q, kp, vp, perm, mask)), ("gather2", gather, (q, kp, vp, perm, mask)), ("contiguous2", contiguous, (q, kc, vc, perm, mask))):
        c = torch.compile(fn, fullgraph=True, dynamic=False, options=opts)
        with torch.no_grad():
            out = c(*a)
            if ref is None: ref = out
            err = (out.float() - ref.float()).abs().max().item()
            res[name] = (bench(c, a), err)
    # interleave again
    print(B, {k: f"{v[0]:.3f}ms err {v[1]:.3g}" for k, v in res.items()}, flush=True)
