"""zoo's own CPU decode kernels. The matmuls (csrc/cpu_gemv.cpp): torch ops `zoo::gemv_bf16`,
`zoo::gemv_int8` and `zoo::gemv_int4`, y [M, N] = x [M, K] @ W^T for the few rows of a decode step, with the weight
held bf16, int8 (one scale per output row) or int4 (zoo's stored form: a scale and an offset per
group of columns; on AVX512_VNNI hosts, with x quantized to int8 per 64 columns for the call).

Why hand-written (benches/results/cpu_gemv-cpu-*.md has the numbers): in a compiled batch-1 step,
inductor fuses the producer of a matmul's input (the RMSNorm, the embedding lookup) into the
reduction it emits for a one-row matmul, and recomputes it for every output row; ATen's bf16 GEMV
reads its weights at half the memory's speed, and its int8 kernel reads them below it. These
kernels are extern calls for inductor (their input is computed once), read the weights once for
all rows of x, and multiply bf16 pairs with AVX512_BF16's dot-product instruction where the CPU
has it (fp32 FMAs on AVX2 / AVX-512 otherwise); int8 weights stream one row at a time. For int4,
ATen's kernel is bound by its unpacking and float multiplies; gemv_int4 takes AVX512_VNNI integer
dot products instead, which is why it quantizes the activations (docs/quantization.md).

The read of the paged KV cache (csrc/cpu_kv.cpp): `zoo::gather_kv`, each row's positions copied
from the blocks its block table lists, one copy per block and kv head, where inductor's gather read
at a fifth of a copy's speed (zoo.layers.ops.read_kv).

The sources are built on first use for the host's CPU (`-march=native`, about 10 s with the
compiler inductor already needs) into `<cache root>/kernels/<hash of sources, torch, flags, CPU>`,
and loaded from there afterwards. `load` never raises: when the build fails (no compiler, a CPU
without AVX2) it says why once and the layers keep their other paths.
"""
from __future__ import annotations

import hashlib
import os
import threading

import torch

from zoo.log import log

# Matmuls of up to this many rows call gemv_bf16 (decode steps; a prefill chunk of 16 with a decode
# step of 4-8). Past ~8 rows the kernel is bound by its bf16 dot products, not the weight read, yet
# still beat ATen's GEMM: 16 layers of the 1 B model's weights took 0.73-0.83x F.linear's time at
# 16-24 rows and 0.95-0.99x at 28-36 (1.3x at 68), interleaved on the 2-core EPYC host (2026-12-08).
MAX_ROWS = 24
_SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", name)
            for name in ("cpu_gemv.cpp", "cpu_kv.cpp")]
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
# build_dir: loaded from there; int4: whether the build has gemv_int4 (None: not asked yet)
_state: dict[str, object] = {"tried": False, "error": None, "build_dir": None, "int4": None}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _build_dir(cache_root: str) -> str:
    sources = []
    for path in _SOURCES:
        with open(path, "rb") as f:
            sources.append(f.read())
    key = hashlib.sha256(b"\0".join([*sources, torch.__version__.encode(), " ".join(_CFLAGS).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    return os.path.join(cache_root, "kernels", f"cpu_gemv-{key}")


def load(cache_root: str) -> bool:
    """Build (once per host and source) and load the kernels; True when the ops are usable."""
    with _lock:
        if _state["tried"]:
            return available()
        _state["tried"] = True
        try:
            from torch.utils.cpp_extension import load as build_extension

            build_dir = _build_dir(cache_root)
            os.makedirs(build_dir, exist_ok=True)
            build_extension(name="zoo_cpu_gemv", sources=_SOURCES, extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                            build_directory=build_dir, is_python_module=False, verbose=False)
            _register_fakes()
            _state["build_dir"] = build_dir
        except Exception as e:  # noqa: BLE001 - any build or load failure leaves the other paths in use
            _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            log(f"zoo's CPU decode kernels are not available ({_state['error']}); one-row matmuls use "
                "inductor's reduction / ATen's kernels")
        return available()


def fingerprint() -> str | None:
    """What a compiled graph that calls the kernels depends on (part of the graph-cache key): the
    build's key, or None when they are not loaded."""
    return os.path.basename(str(_state["build_dir"])) if available() else None


def load_error() -> str | None:
    """Why `load` failed in this process, or None."""
    return _state["error"]  # type: ignore[return-value]


def available() -> bool:
    """Whether `load` succeeded in this process (read while tracing: no side effects)."""
    return _state["build_dir"] is not None


def has_int4() -> bool:
    """Whether `zoo::gemv_int4` is usable: the kernels are loaded and were built for a CPU with
    AVX512_VNNI (its integer dot products)."""
    if _state.get("int4") is None and available():
        _state["int4"] = bool(torch.ops.zoo.has_gemv_int4())
    return bool(_state.get("int4"))


def _register_fakes() -> None:
    """Shapes for torch.compile's fake tensors: y [M, N] in x's dtype."""
    def fake(x, weight, *_):
        return x.new_empty(x.shape[0], weight.shape[0])

    for name in ("zoo::gemv_bf16", "zoo::gemv_int8", "zoo::gemv_int4"):
        torch.library.register_fake(name)(fake)

    @torch.library.register_fake("zoo::gather_kv")
    def gather_kv_fake(cache, block_tables, positions):  # [N, KV, bs, hd], [B, NB], T -> [B, KV, T, hd]
        return cache.new_empty(block_tables.shape[0], cache.shape[1], positions, cache.shape[3])
