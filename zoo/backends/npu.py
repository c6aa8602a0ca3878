"""Ascend NPU backend: torchair compile backend, torchair compile cache, fused NPU kernels.

Nothing here imports torch_npu or torchair at module import time, so `import zoo.backends.npu`
works on any machine; the vendor packages are imported by the functions that need them.

What each piece is built on (documentation read, not code copied). "docs" = the hiascend.com
Ascend Extension for PyTorch API list / TorchAir user guide page ids; "op-plugin" =
gitcode.com/Ascend/op-plugin docs/context/*.md; "torchair src" = github.com/Ascend/torchair
python/torchair/...:

- import_npu: `import torch_npu`, then `import torchair`. docs torchair_00005 (7.3.0, "安装"):
  torchair ships with torch_npu and must be imported after it.
- compiler_config: torchair.CompilerConfig attributes. docs torchair_00080 (7.3.0, CompilerConfig);
  torchair src configs/{compiler,experimental,debug,npugraphex}_config.py. Per key: TORCHAIR_OPTIONS.
- npu_backend: torchair.get_npu_backend(*, compiler_config=None, custom_decompositions={}).
  docs torchair_0017 (6.0.RC2) usage; research notes torchair_reference.md §2.
- cache_compiled_methods: torchair.inference.cache_compile(func, *, config=None, backend=None,
  dynamic=True, cache_dir=None, global_rank=None, tp_rank=None, pp_rank=None,
  custom_decompositions=None, ge_cache=False, **kwargs) -> Callable. docs torchair_00099 (7.3.0,
  signature), torchair_00016 (7.1.0, constraints), torchair_0013 (6.0.RC2, one func per scenario),
  torchair_00092 (set_dim_gears); torchair src inference/_cache_compiler.py.
- NpuAttentionOps.attention, prefill: torch_npu.npu_prompt_flash_attention(query, key, value, *,
  atten_mask=None, actual_seq_lengths=None, num_heads=1, scale_value=1.0, pre_tokens=2147483647,
  next_tokens=0, input_layout="BSH", num_key_value_heads=0, actual_seq_lengths_kv=None,
  sparse_mode=0, ...) -> Tensor. op-plugin torch_npu-npu_prompt_flash_attention.md (7.3.0);
  docs ptaoplist_000171 (7.0.0).
- NpuAttentionOps.attention, decode: torch_npu.npu_incre_flash_attention(query, key, value, *,
  atten_mask=None, actual_seq_lengths=None, kv_padding_size=None, num_heads=1, scale_value=1.0,
  input_layout="BSH", num_key_value_heads=0, ...) -> Tensor. op-plugin
  torch_npu-npu_incre_flash_attention.md; docs ptaoplist_000839 (6.0.0).

None of this has run on Ascend hardware; see docs/npu.md for what was and was not verified.
"""
from __future__ import annotations

import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from zoo.device import import_npu, import_vendor
from zoo.layers.ops import AttentionOps

# --------------------------------------------------------------------------------------------
# imports
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# CompilerConfig from zoo's compile-config "torchair" section
# --------------------------------------------------------------------------------------------

MODES = ("max-autotune", "reduce-overhead", "npugraph_ex")
_GE_MODES = ("max-autotune",)
_ACLGRAPH_MODES = ("reduce-overhead", "npugraph_ex")


@dataclass(frozen=True)
class TorchairOption:
    path: str  # attribute path on a torchair.CompilerConfig
    kind: type  # bool or str; checked exactly (True is not accepted for a str, 1 not for a bool)
    default: object  # torchair's default, for the docs; zoo leaves unset keys at torchair's default
    choices: tuple = ()  # allowed values ((): any value of `kind`)
    modes: tuple = ()  # modes in which a truthy value takes effect ((): every mode)
    source: str = ""


# The one table: zoo key -> CompilerConfig attribute. Keys not listed here are rejected.
TORCHAIR_OPTIONS: dict[str, TorchairOption] = {
    "mode": TorchairOption(
        "mode", str, "max-autotune", MODES,
        source="CompilerConfig.mode = OptionValue('max-autotune', [...]): max-autotune = GE graph (default), "
               "reduce-overhead = aclgraph (no longer developed after torch_npu 7.3.0), npugraph_ex = aclgraph's "
               "new entry (docs torchair_00080; torchair src configs/compiler_config.py)"),
    "frozen_parameter": TorchairOption(
        "experimental_config.frozen_parameter", bool, False,
        source="固定权重类输入地址功能: treat inputs whose address never changes (nn.Parameter on the NPU) "
               "as fixed, shortening graph dispatch (docs torchair_0017); also an npugraph_ex option "
               "(torchair src configs/npugraphex_config.py)"),
    "tiling_schedule_optimize": TorchairOption(
        "experimental_config.tiling_schedule_optimize", bool, False, modes=_GE_MODES,
        source="Tiling调度优化: tiling of fused ops (IncreFlashAttention, FusedInferAttentionScore) runs on the "
               "device AI CPU; max-autotune only, static shapes only (docs torchair_00040, 7.2.0)"),
    "keep_inference_input_mutations": TorchairOption(
        "experimental_config.keep_inference_input_mutations", bool, True,
        source="in-place writes to graph inputs (zoo's KV cache) stay inside the graph; default True "
               "(torchair src configs/experimental_config.py). Leave it True for zoo."),
    "static_kernel_compile": TorchairOption(
        "experimental_config.aclgraph._aclnn_static_shape_kernel", bool, False, modes=_ACLGRAPH_MODES,
        source="静态Kernel编译, aclgraph modes only: npugraph_ex option static_kernel_compile maps to "
               "experimental_config.aclgraph._aclnn_static_shape_kernel (torchair src configs/npugraphex_config.py "
               "OPTIONS_TO_CONFIG_MAP; torchair docs 'reduce-overhead' page)"),
    "static_kernel_build_dir": TorchairOption(
        "experimental_config.aclgraph._aclnn_static_shape_kernel_build_dir", str, None, modes=_ACLGRAPH_MODES,
        source="where static kernels are built (same torchair docs page as static_kernel_compile)"),
    "run_eagerly": TorchairOption(
        "debug.run_eagerly", bool, False,
        source="debug: run the FX graph eagerly instead of compiling it (torchair docs 'reduce-overhead' page; "
               "npugraph_ex option force_eager maps here)"),
    "graph_dump_type": TorchairOption(
        "debug.graph_dump.type", str, None, ("txt", "pbtxt", "py"),
        source="debug: dump the Ascend IR graph (torchair src configs/debug_config.py _Dump; op-plugin PFA "
               "graph-mode example sets config.debug.graph_dump.type = 'pbtxt')"),
    "graph_dump_path": TorchairOption(
        "debug.graph_dump.path", str, None,
        source="debug: folder for graph_dump_type files (torchair src configs/debug_config.py)"),
}


def validate_options(options: Mapping | None) -> dict:
    """Check zoo's "torchair" options without importing torchair: unknown key, wrong type, value
    outside the documented choices, or an option the chosen mode ignores -> ValueError naming the key."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"torchair options must be a dict, got {type(options).__name__}")
    out = {}
    for key, value in options.items():
        if key not in TORCHAIR_OPTIONS:
            raise ValueError(f"unknown torchair option {key!r}; supported: {', '.join(TORCHAIR_OPTIONS)}")
        spec = TORCHAIR_OPTIONS[key]
        if type(value) is not spec.kind:
            raise ValueError(f"torchair option {key!r} must be {spec.kind.__name__}, got {value!r}")
        if spec.choices and value not in spec.choices:
            allowed = ", ".join(map(repr, spec.choices))
            raise ValueError(f"torchair option {key!r} must be one of {allowed}, got {value!r}")
        out[key] = value
    mode = out.get("mode", TORCHAIR_OPTIONS["mode"].default)
    for key, value in out.items():
        spec = TORCHAIR_OPTIONS[key]
        if spec.modes and value and mode not in spec.modes:
            raise ValueError(f"torchair option {key!r} only takes effect with mode {' or '.join(spec.modes)}, "
                             f"not {mode!r}")
    if "static_kernel_build_dir" in out and not out.get("static_kernel_compile"):
        raise ValueError("torchair option 'static_kernel_build_dir' needs static_kernel_compile=True")
    return out


def compiler_config(options: Mapping | None = None):
    """A torchair.CompilerConfig with zoo's "torchair" options applied (TORCHAIR_OPTIONS maps each
    key to its attribute). Unset keys keep torchair's defaults. Raises ValueError naming the key for
    a bad option, or for one this torchair version does not have (older torchair lacks e.g. the
    npugraph_ex mode or experimental_config.aclgraph)."""
    values = validate_options(options)
    _, torchair = import_npu()
    config = torchair.CompilerConfig()
    for key in sorted(values, key=lambda k: k != "mode"):  # mode first
        parent_path, _, leaf = TORCHAIR_OPTIONS[key].path.rpartition(".")
        try:
            parent = config
            for part in filter(None, parent_path.split(".")):
                parent = getattr(parent, part)
            if not hasattr(parent, leaf):
                raise AttributeError(leaf)
            setattr(parent, leaf, values[key])
        except AttributeError:
            raise ValueError(f"torchair option {key!r}: this torchair has no CompilerConfig."
                             f"{TORCHAIR_OPTIONS[key].path} (a newer torch-npu/torchair is needed)") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"torchair option {key!r}={values[key]!r} refused by torchair: {e}") from None
    return config


def npu_backend(options: Mapping | None = None):
    """The torchair backend for `torch.compile(fn, backend=npu_backend(opts), fullgraph=True, dynamic=False)`.

    `torchair.get_npu_backend(*, compiler_config=None, custom_decompositions={})` (notes §2; usage as in
    docs torchair_0017 and the op-plugin PFA graph-mode example). With dynamic=False each of zoo's
    buckets is one static graph, which tiling_schedule_optimize requires (docs torchair_00040).
    """
    config = compiler_config(options)
    _, torchair = import_npu()
    return torchair.get_npu_backend(compiler_config=config)


# --------------------------------------------------------------------------------------------
# torchair.inference.cache_compile: one cache per (entry point, bucket)
# --------------------------------------------------------------------------------------------

# The entry points handed to cache_compile. Each bucket gets its own copy of one of these, under
# its own name, bound to the model. Dynamo traces through into the model's prefill/decode.


def _prefill_entry(self, input_ids, start_pos, lengths, block_tables, k_caches, v_caches, context_len=None):
    return self.prefill(input_ids, start_pos, lengths, block_tables, k_caches, v_caches, context_len)


def _decode_entry(self, input_ids, positions, block_tables, k_caches, v_caches, context_len=None):
    return self.decode(input_ids, positions, block_tables, k_caches, v_caches, context_len)


def _bound_copy(module: torch.nn.Module, template, name: str) -> types.MethodType:
    """`template` as a method of `module` with its own code object named `name`.

    Distinct names matter: cache_compile keeps at most one compiled graph per code object (a
    second compile of the same code deletes its cache), its cache path ends in func.__name__, and
    it finds its graph by comparing code objects by value (co_name included)."""
    code = template.__code__
    fields = {"co_name": name}
    if hasattr(code, "co_qualname"):  # Python >= 3.11
        fields["co_qualname"] = f"{type(module).__name__}.{name}"
    fn = types.FunctionType(code.replace(**fields), template.__globals__, name, template.__defaults__,
                            template.__closure__)
    return types.MethodType(fn, module)


def _geometry(k_caches) -> str:
    n, kv, t, hd = k_caches[0].shape
    return f"kv{n}x{kv}x{t}x{hd}_{str(k_caches[0].dtype).replace('torch.', '')}"


class CachedEntry:
    """prefill or decode through torchair's compile cache, one cached static graph per bucket.

    Called exactly like the model's method. The first call of a bucket wraps a fresh bound copy of
    the entry point with cache_compile; torchair then loads that bucket's graph from its cache
    folder, or compiles it (dynamo + GE) and saves it. Later calls of the bucket reuse it.
    """

    def __init__(self, module, kind: str, config, cache_dir: str, cache_compile):
        if kind not in ("prefill", "decode"):
            raise ValueError(f"kind must be 'prefill' or 'decode', got {kind!r}")
        self.module, self.kind, self.config, self.cache_dir = module, kind, config, cache_dir
        self._cache_compile = cache_compile
        self._template = _prefill_entry if kind == "prefill" else _decode_entry
        self.compiled: dict[str, object] = {}  # function name (bucket + cache geometry) -> cached callable

    def function_name(self, *args, context_len=None) -> str:
        input_ids, k_caches = args[0], args[-2]
        bucket = f"b{input_ids.shape[0]}" + (f"_s{input_ids.shape[1]}" if self.kind == "prefill" else "")
        bucket += "" if context_len is None else f"_c{context_len}"
        return f"{self.kind}_{bucket}__{_geometry(k_caches)}"

    def __call__(self, *args, context_len=None):
        name = self.function_name(*args, context_len=context_len)
        fn = self.compiled.get(name)
        if fn is None:
            method = _bound_copy(self.module, self._template, name)
            fn = self._cache_compile(method, config=self.config, dynamic=False, cache_dir=self.cache_dir)
            self.compiled[name] = fn
        # torchair rebases a loaded graph onto the globals of the frame that calls it; that frame is
        # this module, which is also where the entry points live.
        return fn(*args) if context_len is None else fn(*args, context_len)


def cache_compiled_methods(module: torch.nn.Module, options: Mapping | None, cache_dir: str):
    """(prefill_fn, decode_fn): the module's prefill/decode through torchair.inference.cache_compile.

    `module` is zoo's LlamaForCausalLM (or Qwen2), already on the NPU with its weights loaded;
    prefill_fn / decode_fn take the same arguments as module.prefill / module.decode.

    cache_dir: the caller's folder, ALREADY suffixed with zoo's own key. torchair's own key is
    md5(str(module) + compile options) plus the class name, `dynamic`, ranks and the func name
    (torchair src inference/_cache_compiler.py, get_cache_bin): it ignores edits to forward code,
    and the guide requires "生成模型的脚本和加载缓存的脚本一致" (docs torchair_00016). zoo's key
    must therefore cover the modeling source and zoo/torch/torch_npu versions; a CANN upgrade
    also needs a fresh folder ("CANN包跨版本缓存无法保证兼容性"). The folder is created if missing
    (the guide asks that cache_dir exist and be writable, docs torchair_00099).

    Documented constraints this relies on (docs torchair_00016 "使用约束", torchair_00099):
    - func must be a bound method of an nn.Module (cache_compile raises otherwise);
    - the whole function compiles as ONE full graph; no RNG ops inside (randn/dropout...). zoo's
      prefill/decode have none: sampling runs outside the graph;
    - "缓存要与执行计算图一一对应, 若重编译则缓存失效": one cache = one graph; a recompile of the
      same function drops its cache (torchair src: ModelCacheSaver.save_compiled_fn removes the cache dir);
    - guards are skipped when loading, so a cached graph must only ever see the shapes it was built for.

    Buckets. cache_compile does NOT hold several static shapes per function: a second shape
    recompiles and deletes the cache. The documented ways out are (a) one cached function per
    scenario - the guide wraps a new func per scenario that calls the shared forward (torchair_0013,
    6.0.RC2) - or (b) dynamic=True plus torchair.inference.set_dim_gears on the bucketed dims
    (torchair_00092: max-autotune only, at most 100 gears, gear values may not be 0 or 1, needs
    dynamic=True). zoo uses (a), one function per bucket, each traced with dynamic=False: every
    graph is static (what tiling_schedule_optimize needs), bucket size 1 works, and nothing about
    zoo's "one graph per bucket" contract changes. (b) cannot express zoo's default batch bucket 1.
    Each bucket's function is named `{prefill|decode}_b{B}[_s{S}]__kv{N}x{KV}x{T}x{hd}_{dtype}`, so
    a different KV-cache geometry or dtype (not part of str(module)) never loads a stale graph.
    """
    if not isinstance(cache_dir, str) or not cache_dir:
        raise ValueError(f"cache_dir must be a non-empty path, got {cache_dir!r}")
    config = compiler_config(options)  # imports torch_npu, then torchair
    cache_compile = import_vendor("torchair.inference").cache_compile
    os.makedirs(cache_dir, exist_ok=True)
    return (CachedEntry(module, "prefill", config, cache_dir, cache_compile),
            CachedEntry(module, "decode", config, cache_dir, cache_compile))


# --------------------------------------------------------------------------------------------
# fused kernels
# --------------------------------------------------------------------------------------------

_INT32_MAX = 2147483647  # npu_prompt_flash_attention's documented default for pre_tokens


class NpuAttentionOps(AttentionOps):
    """zoo's AttentionOps on Ascend kernels. Same shapes in and out as zoo.layers.ops documents:

      attention(q [B, H, S, hd], k [B, KV, T, hd], v [B, KV, T, hd], mask [B, 1, S, T] bool True=attend,
                is_decode) -> [B, H, S, hd]

    k / v arrive as each row's blocks of the paged cache gathered into one sequence (read_kv), a
    BNSD layout (batch=row, N=kv heads, S=positions, D=head dim).

    write_kv / read_kv are the generic index_put_ / gather. The earlier scatter_update_ decode write
    spread one update onto every row of a [slots, KV, T, hd] cache; a paged pool has no such rows,
    so it went with the contiguous layout. The fused paged path (torch_npu's reshape-and-cache
    write and the incre flash attention's block_table / block_size arguments reading the pool in
    place) is mapped in docs/npu.md and not implemented: no Ascend hardware here to verify it.

    attention
      Prefill: torch_npu.npu_prompt_flash_attention (op-plugin torch_npu-npu_prompt_flash_attention.md):
        input_layout="BNSD" (output shape == query shape, as the doc's example shows), num_heads=H,
        num_key_value_heads=KV (GQA; H % KV == 0, H/KV <= 64), scale_value=1/sqrt(hd) (SDPA's default),
        atten_mask = NOT mask, shape (B, 1, S, S) bool - on Ascend True/1 means "masked out" ("a value
        of 1 indicates that the position is masked out", the opposite of SDPA's bool mask);
        sparse_mode=0 with pre_tokens=next_tokens=2147483647, so the mask alone decides (in mode 0 the
        kernel also limits attention to the pre/next_tokens band; the default next_tokens=0 would add
        a causal band). Mode 0 does not support a fully masked row; zoo's masks never have one
        (position 0 is always attendable, lengths >= 1). q/k/v/mask are made contiguous (the doc:
        "Non-contiguous tensors are not supported"). actual_seq_lengths is not used: it is a host
        list, and reading lengths on the host would be a device->host sync per step.
      Decode: torch_npu.npu_incre_flash_attention (op-plugin torch_npu-npu_incre_flash_attention.md):
        same mapping, query [B, H, 1, hd] BNSD, key/value = the rows' gathered blocks [B, KV, T, hd], atten_mask
        (B, 1, 1, T) bool, 1 = excluded (the doc's graph-mode example uses a (B, 1, 1, S) bool mask).
        actual_seq_lengths is not passed (host list, see above), so every step attends over all T
        positions and the mask removes the unused tail; kv_padding_size is left out too.
      Dtypes: both kernels take float16/bfloat16 (int8 with quant params) only. For other dtypes
      (a float32 model) attention falls back to the generic SDPA; kernel_dtypes changes that set
      (the tests use it to drive the kernel path with fake kernels in float32).
    """

    name = "npu"
    KERNEL_DTYPES = (torch.float16, torch.bfloat16)

    def __init__(self, torch_npu: types.ModuleType | None = None, *, kernel_dtypes: tuple = KERNEL_DTYPES):
        self._npu = torch_npu if torch_npu is not None else import_vendor("torch_npu")
        self.kernel_dtypes = tuple(kernel_dtypes)

    # ---- attention ------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  is_decode: bool) -> torch.Tensor:
        if q.dtype not in self.kernel_dtypes:
            return super().attention(q, k, v, mask, is_decode)
        B, H, S, hd = q.shape
        KV, T = k.shape[1], k.shape[2]
        if H % KV or H // KV > 64 or H > 256 or hd > 512:
            raise ValueError(f"NPU flash attention supports heads <= 256, heads/kv_heads <= 64 and integral, "
                             f"head_dim <= 512; got heads={H}, kv_heads={KV}, head_dim={hd}")
        if tuple(mask.shape) != (B, 1, S, T):
            raise ValueError(f"mask shape {tuple(mask.shape)} is not [B, 1, S, T] = {[B, 1, S, T]}")
        masked_out = torch.logical_not(mask).contiguous()  # Ascend: True = excluded
        scale = 1.0 / math.sqrt(hd)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if is_decode:
            if S != 1:
                raise ValueError(f"decode attention takes one query position, got S={S}")
            return self._npu.npu_incre_flash_attention(
                q, k, v, atten_mask=masked_out, num_heads=H, num_key_value_heads=KV, scale_value=scale,
                input_layout="BNSD")
        return self._npu.npu_prompt_flash_attention(
            q, k, v, atten_mask=masked_out, num_heads=H, num_key_value_heads=KV, scale_value=scale,
            input_layout="BNSD", sparse_mode=0, pre_tokens=_INT32_MAX, next_tokens=_INT32_MAX)
