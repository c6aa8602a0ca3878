"""zoo.backends.npu against FAKE torch_npu / torchair modules (no Ascend NPU exists here).

What these tests verify:
- the import guard: which errors become a DeviceError, and that its message names what to install;
- that zoo's "torchair" options land on the CompilerConfig attributes the torchair docs/source
  name, on a fake CompilerConfig built to mirror that documented structure, and that bad options
  are refused naming the key;
- that npu_backend / cache_compiled_methods call get_npu_backend / cache_compile with the
  documented keyword arguments, once per method and bucket;
- zoo's ARGUMENT MAPPING onto the NPU kernels (BNSD layout, mask inversion, num_heads /
  num_key_value_heads for GQA, scale_value, scatter_update_ axis and index form): fake kernels
  written in plain torch from the documented semantics must give the same results as zoo's
  generic AttentionOps, op by op and through a whole tiny Llama (prefill + decode steps).

What they do NOT verify: that the real kernels behave as their documentation says (precision,
unsupported corner cases, the undocumented 2-D scatter_update_ index form), that torchair can
trace/compile zoo's graphs (GE conversion of index_put / scatter_update_ on a graph input, input
mutation handling, frozen_parameter), that cache_compile's saved graphs load back and replay, or
any performance. A fake written from a misread doc would hide the same misreading in zoo's code;
the fakes are kept to what the docs state, and each states its source.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from zoo.models import config_from_dict
from zoo.device import DeviceError
from zoo.graphs.kv_cache import KVCache
from zoo.layers.ops import AttentionOps
from zoo.models.llama import LlamaForCausalLM

import zoo.backends.npu as npu

# ============================================================================================
# fake torch_npu: kernels from their documented semantics, recording each call
# ============================================================================================


def _fake_scatter_update_(data, indices, updates, axis):
    """torch_npu.scatter_update_(data, indices, updates, axis) -> data, in place.
    Semantics from CANN aclnnInplaceScatterUpdate.md (1-D indices): data (a,b,c,d), updates (a,b,e,d),
    indices (a,): data[i][j][indices[i]+k][l] = updates[i][j][k][l] for axis=-2; ranks equal, the other
    dims equal, indices int32/int64. Only the documented 1-D form is implemented."""
    assert 2 <= data.dim() <= 8 and data.dim() == updates.dim(), "data and updates must have the same rank (2-8)"
    assert indices.dtype in (torch.int32, torch.int64), indices.dtype
    if indices.dim() != 1:
        raise NotImplementedError("the 2-D index form of scatter_update_ is undocumented")
    ax = axis % data.dim()
    assert ax != 0, "axis 0 is the batch dim that pairs data row i with updates row i"
    assert data.shape[0] == updates.shape[0] == indices.shape[0], (data.shape, updates.shape, indices.shape)
    for d in range(data.dim()):
        assert d == ax or data.shape[d] == updates.shape[d], f"dim {d}: {data.shape} vs {updates.shape}"
    e = updates.shape[ax]
    for i in range(data.shape[0]):
        off = int(indices[i])
        assert 0 <= off and off + e <= data.shape[ax], f"row {i}: offset {off} + {e} > {data.shape[ax]}"
        data[i].narrow(ax - 1, off, e).copy_(updates[i])
    return data


def _attend(query, key, value, excluded, num_heads, num_key_value_heads, scale_value):
    """softmax(scale * Q K^T + mask) V, BNSD, mask True = excluded; GQA: query head n uses kv head
    n // (N / KVN) (the grouping HF's repeat_kv and SDPA's enable_gqa use)."""
    B, N, S1, D = query.shape
    kvn = num_key_value_heads or N
    assert num_heads == N, f"num_heads={num_heads} but query has N={N}"
    assert key.shape[1] == kvn and value.shape == key.shape, (key.shape, value.shape, kvn)
    assert N % kvn == 0 and N // kvn <= 64
    k = key.float().repeat_interleave(N // kvn, dim=1)
    v = value.float().repeat_interleave(N // kvn, dim=1)
    scores = scale_value * (query.float() @ k.transpose(-1, -2))  # [B, N, S1, S2]
    if excluded is not None:
        if excluded.all(-1).any():
            raise RuntimeError("a fully masked row is not supported (sparse_mode 0)")
        scores = scores.masked_fill(excluded, float("-inf"))
    return (scores.softmax(-1) @ v).to(query.dtype)


def _as_bool_mask(atten_mask):
    assert atten_mask.dtype in (torch.bool, torch.int8, torch.uint8), atten_mask.dtype
    return atten_mask.bool()


class FakeTorchNpu(types.ModuleType):
    def __init__(self):
        super().__init__("torch_npu")
        self.calls: list[tuple[str, dict]] = []

    def scatter_update_(self, data, indices, updates, axis):
        self.calls.append(("scatter_update_", dict(shape=tuple(updates.shape), axis=axis)))
        return _fake_scatter_update_(data, indices, updates, axis)

    def npu_prompt_flash_attention(self, query, key, value, *, pse_shift=None, padding_mask=None, atten_mask=None,
                                   actual_seq_lengths=None, deq_scale1=None, quant_scale1=None, deq_scale2=None,
                                   quant_scale2=None, quant_offset2=None, num_heads=1, scale_value=1.0,
                                   pre_tokens=2147483647, next_tokens=0, input_layout="BSH", num_key_value_heads=0,
                                   actual_seq_lengths_kv=None, sparse_mode=0):
        """op-plugin torch_npu-npu_prompt_flash_attention.md: BNSD in -> BNSD out (shape of query);
        atten_mask bool/int8/uint8, 1 = masked out, shapes (S1,S2) (B,S1,S2) (1,S1,S2) (B,1,S1,S2)
        (1,1,S1,S2); sparse_mode 0 with a mask also keeps only keys in [i - pre_tokens, i + next_tokens];
        q/k/v/mask must be contiguous."""
        self.calls.append(("npu_prompt_flash_attention", dict(
            atten_mask=atten_mask, num_heads=num_heads, num_key_value_heads=num_key_value_heads,
            scale_value=scale_value, input_layout=input_layout, pre_tokens=pre_tokens, next_tokens=next_tokens,
            sparse_mode=sparse_mode, actual_seq_lengths=actual_seq_lengths)))
        assert input_layout == "BNSD", "this fake implements the BNSD layout only"
        assert sparse_mode == 0 and actual_seq_lengths is None and actual_seq_lengths_kv is None
        for t in (query, key, value) + ((atten_mask,) if atten_mask is not None else ()):
            assert t.is_contiguous(), "non-contiguous inputs are not supported"
        B, N, S1, D = query.shape
        S2 = key.shape[2]
        excluded = None
        if atten_mask is not None:
            m = _as_bool_mask(atten_mask)
            assert tuple(m.shape) in {(S1, S2), (B, S1, S2), (1, S1, S2), (B, 1, S1, S2), (1, 1, S1, S2)}, m.shape
            excluded = m.reshape(m.shape[0] if m.dim() >= 3 else 1, 1, S1, S2)
            i = torch.arange(S1)[:, None]
            j = torch.arange(S2)[None, :]
            band = (j >= i - pre_tokens) & (j <= i + next_tokens)
            excluded = excluded | ~band
        return _attend(query, key, value, excluded, num_heads, num_key_value_heads, scale_value)

    def npu_incre_flash_attention(self, query, key, value, *, padding_mask=None, pse_shift=None, atten_mask=None,
                                  actual_seq_lengths=None, dequant_scale1=None, quant_scale1=None,
                                  dequant_scale2=None, quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                  antiquant_offset=None, block_table=None, kv_padding_size=None, num_heads=1,
                                  scale_value=1.0, input_layout="BSH", num_key_value_heads=0, block_size=0,
                                  inner_precise=1):
        """op-plugin torch_npu-npu_incre_flash_attention.md: one query position; BNSD [B,N,1,D] with
        key/value [B,KVN,S,D]; output shape == query shape; atten_mask 1 = masked out (graph example
        uses a (B,1,1,S) bool mask); actual_seq_lengths (host list) would also cut keys at S_b."""
        self.calls.append(("npu_incre_flash_attention", dict(
            atten_mask=atten_mask, num_heads=num_heads, num_key_value_heads=num_key_value_heads,
            scale_value=scale_value, input_layout=input_layout, actual_seq_lengths=actual_seq_lengths)))
        assert input_layout == "BNSD", "this fake implements the BNSD layout only"
        assert block_table is None and kv_padding_size is None
        B, N, S1, D = query.shape
        assert S1 == 1, "incremental attention takes one query position"
        S2 = key.shape[2]
        excluded = None
        if atten_mask is not None:
            m = _as_bool_mask(atten_mask)
            assert tuple(m.shape) in {(B, 1, 1, S2), (B, S2)}, m.shape
            excluded = m.reshape(B, 1, 1, S2)
        if actual_seq_lengths is not None:
            cut = torch.arange(S2)[None, :] >= torch.tensor(actual_seq_lengths)[:, None]
            excluded = cut.reshape(B, 1, 1, S2) if excluded is None else excluded | cut.reshape(B, 1, 1, S2)
        return _attend(query, key, value, excluded, num_heads, num_key_value_heads, scale_value)

    def names(self):
        return [name for name, _ in self.calls]


# ============================================================================================
# fake torchair: CompilerConfig mirroring the documented structure, recording backends
# ============================================================================================


class _Cfg:
    """A config node that, like torchair's NpuBaseConfig, only accepts the attributes it defines;
    `choices` mirrors OptionValue's allowed values (ValueError otherwise)."""

    def __init__(self, choices=None, **fields):
        object.__setattr__(self, "_choices", choices or {})
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, key, value):
        if key not in self.__dict__:
            raise AttributeError(f"unsupported config option {key!r}")
        allowed = self._choices.get(key)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        object.__setattr__(self, key, value)


def _make_compiler_config_class(*, modes=("max-autotune", "reduce-overhead", "npugraph_ex"), aclgraph=True):
    class CompilerConfig(_Cfg):
        """torchair docs torchair_00080 (7.3.0) + src configs/*.py: debug, export, dump_config,
        fusion_config, experimental_config, inference_config, ge_config, aclgraph_config, mode."""

        def __init__(self):
            exp = dict(frozen_parameter=False, tiling_schedule_optimize=False, keep_inference_input_mutations=True,
                       cc_parallel_enable=False, memory_efficiency=False, static_model_ops_lower_limit=None,
                       topology_sorting_strategy="DFS", enable_ref_data=False, enable_view_optimize=True)
            if aclgraph:
                exp["aclgraph"] = _Cfg(_aclnn_static_shape_kernel=False, _aclnn_static_shape_kernel_build_dir=None)
            super().__init__(
                choices={"mode": list(modes)},
                debug=_Cfg(choices=None, run_eagerly=False,
                           graph_dump=_Cfg(choices={"type": [None, "txt", "pbtxt", "py"]}, type=None, path=None),
                           aclgraph=_Cfg(clone_input=True, static_capture_size_limit=64,
                                         disable_reinplace_inplaceable_ops_pass=False)),
                export=_Cfg(), dump_config=_Cfg(), fusion_config=_Cfg(),
                experimental_config=_Cfg(**exp),
                inference_config=_Cfg(dynamic_gears_merge_policy="zip"),
                ge_config=_Cfg(), aclgraph_config=_Cfg(use_custom_pool=None),
                mode="max-autotune")

    return CompilerConfig


class FakeTorchair(types.ModuleType):
    def __init__(self, **config_kwargs):
        super().__init__("torchair")
        self.CompilerConfig = _make_compiler_config_class(**config_kwargs)
        self.backend_calls: list[dict] = []
        self.cache_calls: list[dict] = []
        self.inference = types.ModuleType("torchair.inference")
        self.inference.cache_compile = self._cache_compile

    def get_npu_backend(self, *, compiler_config=None, custom_decompositions={}):  # noqa: B006 (documented default)
        backend = object()
        self.backend_calls.append(dict(compiler_config=compiler_config, backend=backend))
        return backend

    def _cache_compile(self, func, *, config=None, backend=None, dynamic=True, cache_dir=None, global_rank=None,
                       tp_rank=None, pp_rank=None, custom_decompositions=None, ge_cache=False, **kwargs):
        # the documented preconditions (torchair_00099; src inference/_cache_compiler.py)
        if not isinstance(func, types.MethodType) or not isinstance(func.__self__, torch.nn.Module):
            raise ValueError(f"Only torch.nn.Module method can be cached now, got {func}")
        self.cache_calls.append(dict(func=func, config=config, dynamic=dynamic, cache_dir=cache_dir, ge_cache=ge_cache))
        return lambda *args, **kw: func(*args, **kw)  # the fake runs the method eagerly


@pytest.fixture
def fakes(monkeypatch):
    """Installs fake torch_npu / torchair / torchair.inference into sys.modules."""
    torch_npu, torchair = FakeTorchNpu(), FakeTorchair()
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.setitem(sys.modules, "torchair", torchair)
    monkeypatch.setitem(sys.modules, "torchair.inference", torchair.inference)
    return types.SimpleNamespace(torch_npu=torch_npu, torchair=torchair)


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# ============================================================================================
# (a) imports
# ============================================================================================


def test_module_import_does_not_import_vendor_packages():
    code = ("import sys, zoo.backends.npu; "
            "bad = [m for m in ('torch_npu', 'torchair') if m in sys.modules]; assert not bad, bad")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(npu.__file__))))  # zoo/backends/npu.py
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


def test_missing_torch_npu_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` raise ImportError
    release = torch.__version__.split("+")[0]
    with pytest.raises(DeviceError) as info:
        npu.import_npu()
    msg = str(info.value)
    for needed in (f"torch-npu=={release}", "torchair", "CANN", "set_env.sh", "importing torch_npu failed"):
        assert needed in msg, (needed, msg)
    with pytest.raises(DeviceError, match="torch-npu=="):
        npu.NpuAttentionOps()
    with pytest.raises(DeviceError, match="torch-npu=="):
        npu.npu_backend({})


def test_missing_torchair_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", FakeTorchNpu())
    monkeypatch.setitem(sys.modules, "torchair", None)
    with pytest.raises(DeviceError, match=r"importing torchair failed.*ships inside torch-npu"):
        npu.import_npu()


class _Raising:
    """A meta-path finder whose torch_npu import raises `error` (as a broken install would)."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "torch_npu":
            raise self.error
        return None


@pytest.mark.parametrize("error, extra", [
    (RuntimeError("Failed to load the backend extension: torch_npu. You can disable extension auto-loading "
                  "with TORCH_DEVICE_BACKEND_AUTOLOAD=0."), "TORCH_DEVICE_BACKEND_AUTOLOAD=0"),
    (ImportError("libhccl.so: cannot open shared object file: No such file or directory"), "set_env.sh"),
])
def test_broken_install_becomes_device_error(monkeypatch, error, extra):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Raising(error)] + sys.meta_path)
    with pytest.raises(DeviceError) as info:
        npu.import_npu()
    assert extra in str(info.value) and "torch-npu==" in str(info.value)


def test_bad_options_are_refused_before_any_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # would be a DeviceError if imported
    with pytest.raises(ValueError, match="'frozen_paramter'"):
        npu.compiler_config({"frozen_paramter": True})


# ============================================================================================
# (b) compiler_config, (c) npu_backend
# ============================================================================================


def test_option_table_paths_exist_on_the_documented_config(fakes):
    config = fakes.torchair.CompilerConfig()
    for key, spec in npu.TORCHAIR_OPTIONS.items():
        _get(config, spec.path)  # AttributeError if the table names an attribute torchair does not have


def test_compiler_config_maps_each_key(fakes):
    ge = {"mode": "max-autotune", "frozen_parameter": True, "tiling_schedule_optimize": True,
          "keep_inference_input_mutations": False, "run_eagerly": True, "graph_dump_type": "pbtxt",
          "graph_dump_path": "/tmp/dump"}
    aclgraph = {"mode": "npugraph_ex", "frozen_parameter": True, "static_kernel_compile": True,
                "static_kernel_build_dir": "/tmp/kernels"}
    expected_paths = {
        "mode": "mode", "frozen_parameter": "experimental_config.frozen_parameter",
        "tiling_schedule_optimize": "experimental_config.tiling_schedule_optimize",
        "keep_inference_input_mutations": "experimental_config.keep_inference_input_mutations",
        "static_kernel_compile": "experimental_config.aclgraph._aclnn_static_shape_kernel",
        "static_kernel_build_dir": "experimental_config.aclgraph._aclnn_static_shape_kernel_build_dir",
        "run_eagerly": "debug.run_eagerly", "graph_dump_type": "debug.graph_dump.type",
        "graph_dump_path": "debug.graph_dump.path",
    }
    assert set(expected_paths) == set(npu.TORCHAIR_OPTIONS)
    for options in (ge, aclgraph):
        config = npu.compiler_config(options)
        assert isinstance(config, fakes.torchair.CompilerConfig)
        for key, value in options.items():
            assert _get(config, expected_paths[key]) == value, key
        untouched = fakes.torchair.CompilerConfig()
        for key in set(expected_paths) - set(options):
            assert _get(config, expected_paths[key]) == _get(untouched, expected_paths[key]), key
    default = npu.compiler_config(None)
    assert default.mode == "max-autotune" and default.experimental_config.frozen_parameter is False


@pytest.mark.parametrize("options, key", [
    ({"frozen_paramter": True}, "frozen_paramter"),
    ({"frozen_parameter": 1}, "frozen_parameter"),
    ({"frozen_parameter": "true"}, "frozen_parameter"),
    ({"tiling_schedule_optimize": None}, "tiling_schedule_optimize"),
    ({"mode": "default"}, "mode"),
    ({"mode": True}, "mode"),
    ({"graph_dump_type": "csv"}, "graph_dump_type"),
    ({"graph_dump_path": 3}, "graph_dump_path"),
    ({"mode": "reduce-overhead", "tiling_schedule_optimize": True}, "tiling_schedule_optimize"),
    ({"static_kernel_compile": True}, "static_kernel_compile"),  # default mode is max-autotune (GE)
    ({"mode": "npugraph_ex", "static_kernel_build_dir": "/tmp"}, "static_kernel_build_dir"),
])
def test_compiler_config_rejects_bad_options_naming_the_key(fakes, options, key):
    with pytest.raises(ValueError, match=repr(key)):
        npu.compiler_config(options)


def test_compiler_config_on_an_older_torchair_names_the_key(monkeypatch, fakes):
    old = FakeTorchair(modes=("max-autotune", "reduce-overhead"), aclgraph=False)
    monkeypatch.setitem(sys.modules, "torchair", old)
    with pytest.raises(ValueError, match=r"'mode'.*refused by torchair"):
        npu.compiler_config({"mode": "npugraph_ex"})
    with pytest.raises(ValueError, match=r"'static_kernel_compile'.*no CompilerConfig.experimental_config.aclgraph"):
        npu.compiler_config({"mode": "reduce-overhead", "static_kernel_compile": True})


def test_compiler_config_rejects_non_dict(fakes):
    with pytest.raises(ValueError, match="must be a dict"):
        npu.compiler_config([("mode", "max-autotune")])


def test_npu_backend_passes_the_config_to_get_npu_backend(fakes):
    backend = npu.npu_backend({"frozen_parameter": True, "tiling_schedule_optimize": True})
    (call,) = fakes.torchair.backend_calls
    assert call["backend"] is backend
    config = call["compiler_config"]
    assert isinstance(config, fakes.torchair.CompilerConfig)
    assert config.experimental_config.frozen_parameter is True
    assert config.experimental_config.tiling_schedule_optimize is True


# ============================================================================================
# a tiny Llama for (d) and (e)
# ============================================================================================


def _tiny_llama(dtype=torch.float32, heads=4, kv_heads=2, seed=0) -> LlamaForCausalLM:
    config = config_from_dict(dict(
        architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
        max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.to(dtype)


def _cache(model, dtype, num_slots=4, max_seq_len=24) -> KVCache:
    """A paged cache (blocks of 8) whose slots all hold blocks for max_seq_len positions, taken in
    the same order in every cache built here, so two caches have the same block tables."""
    c = model.config
    cache = KVCache(c.num_layers, num_slots, c.num_kv_heads, max_seq_len, c.head_dim, dtype, torch.device("cpu"),
                    block_size=8)
    for slot in range(num_slots):
        cache.alloc(slot)
        cache.reserve(slot, max_seq_len)
    return cache


def _prefill_inputs(cache: KVCache, B=4, S=8, seed=1):
    """Two prompts into slots 2 and 0 (lengths 5 and 8); rows 2..B-1 are padding -> scratch slot."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 128, (B, S), generator=g)
    lengths = torch.ones(B, dtype=torch.long)
    slot_ids = torch.full((B,), cache.scratch_slot, dtype=torch.long)
    lengths[0], slot_ids[0] = 5, 2
    lengths[1], slot_ids[1] = 8, 0
    return input_ids, torch.zeros(B, dtype=torch.long), lengths, cache.block_tables[slot_ids]


# ============================================================================================
# (d) cache_compiled_methods
# ============================================================================================


def test_cache_compiled_methods_one_cache_compile_per_method_and_bucket(fakes, tmp_path):
    model = _tiny_llama()
    cache = _cache(model, torch.float32)
    cache_dir = str(tmp_path / "torchair" / "zoo-key")
    prefill_fn, decode_fn = npu.cache_compiled_methods(model, {"frozen_parameter": True}, cache_dir)
    assert (tmp_path / "torchair" / "zoo-key").is_dir()
    assert fakes.torchair.cache_calls == []  # lazily, on each bucket's first call

    reference = copy.deepcopy(model)
    ref_cache = _cache(reference, torch.float32)
    with torch.no_grad():
        for B, S in ((4, 8), (4, 8), (2, 8)):
            args = _prefill_inputs(cache, B=B, S=S)
            out = prefill_fn(*args, cache.k, cache.v)
            torch.testing.assert_close(out, reference.prefill(*args, ref_cache.k, ref_cache.v))
        idle = cache.scratch_position
        ids, pos = torch.zeros(4, 1, dtype=torch.long), torch.tensor([8, idle, 5, idle])
        for _ in range(2):
            torch.testing.assert_close(decode_fn(ids, pos, cache.block_tables[:4], cache.k, cache.v),
                                       reference.decode(ids, pos, ref_cache.block_tables[:4], ref_cache.k, ref_cache.v))

    calls = fakes.torchair.cache_calls
    geometry = "kv13x2x8x16_float32"  # 12 blocks of 8 positions (4 slots x 24) + the scratch block
    assert [c["func"].__name__ for c in calls] == [
        f"prefill_b4_s8__{geometry}", f"prefill_b2_s8__{geometry}", f"decode_b4__{geometry}"]
    for c in calls:
        assert c["func"].__self__ is model
        assert c["cache_dir"] == cache_dir and c["dynamic"] is False and c["ge_cache"] is False
        assert isinstance(c["config"], fakes.torchair.CompilerConfig)
        assert c["config"].experimental_config.frozen_parameter is True
    assert calls[0]["config"] is calls[2]["config"]  # one config for both methods
    # torchair tells cached functions apart by code object value (co_name included)
    codes = [c["func"].__func__.__code__ for c in calls]
    assert len({id(code) for code in codes}) == 3 and codes[0] != codes[1] != codes[2]
    assert set(prefill_fn.compiled) == {f"prefill_b4_s8__{geometry}", f"prefill_b2_s8__{geometry}"}


def test_cache_compiled_methods_needs_a_cache_dir(fakes):
    with pytest.raises(ValueError, match="cache_dir"):
        npu.cache_compiled_methods(_tiny_llama(), {}, "")


# ============================================================================================
# (e) NpuAttentionOps against the generic ops
# ============================================================================================

F32 = (torch.float32, torch.float16, torch.bfloat16)  # lets the fp32 tests drive the kernel path


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _prefill_mask(lengths, S):
    pos = torch.arange(S).expand(len(lengths), S)
    q, k = pos[:, :, None], pos[:, None, :]
    return ((k <= q) & (k < lengths[:, None, None]))[:, None]  # [B, 1, S, S], True = attend


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_matches_generic(fakes, heads, kv_heads, dtype):
    """npu_prompt_flash_attention with zoo's mapping == SDPA, causal + padding mask, MHA and GQA."""
    torch.manual_seed(0)
    B, S, hd = 3, 16, 16
    q = torch.randn(B, S, heads, hd, dtype=dtype).transpose(1, 2)  # non-contiguous, like zoo's
    k = torch.randn(B, S, kv_heads, hd, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, S, kv_heads, hd, dtype=dtype).transpose(1, 2)
    mask = _prefill_mask(torch.tensor([16, 5, 1]), S)
    ops = npu.NpuAttentionOps(fakes.torch_npu, kernel_dtypes=F32)
    out = ops.attention(q, k, v, mask, is_decode=False)
    assert out.shape == (B, heads, S, hd) and out.dtype == dtype
    torch.testing.assert_close(out, AttentionOps().attention(q, k, v, mask, is_decode=False), **_tol(dtype))
    (name, kw), = fakes.torch_npu.calls
    assert name == "npu_prompt_flash_attention"
    assert kw["input_layout"] == "BNSD" and kw["num_heads"] == heads and kw["num_key_value_heads"] == kv_heads
    assert kw["scale_value"] == pytest.approx(1 / math.sqrt(hd)) and kw["sparse_mode"] == 0
    assert torch.equal(kw["atten_mask"], ~mask)  # Ascend convention: True = masked out


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_matches_generic(fakes, heads, kv_heads, dtype):
    """npu_incre_flash_attention with zoo's mapping == SDPA over the cache view [B, KV, T, hd]."""
    torch.manual_seed(0)
    B, T, hd, N = 3, 25, 16, 5
    k_cache = torch.randn(N, kv_heads, T, hd, dtype=dtype)
    v_cache = torch.randn(N, kv_heads, T, hd, dtype=dtype)
    q = torch.randn(B, 1, heads, hd, dtype=dtype).transpose(1, 2)
    positions = torch.tensor([7, 24, 0])  # a live row, an idle row at the scratch position, a first token
    mask = (torch.arange(T)[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, T]
    k, v = k_cache[:B], v_cache[:B]
    ops = npu.NpuAttentionOps(fakes.torch_npu, kernel_dtypes=F32)
    out = ops.attention(q, k, v, mask, is_decode=True)
    assert out.shape == (B, heads, 1, hd)
    torch.testing.assert_close(out, AttentionOps().attention(q, k, v, mask, is_decode=True), **_tol(dtype))
    (name, kw), = fakes.torch_npu.calls
    assert name == "npu_incre_flash_attention" and kw["actual_seq_lengths"] is None
    assert kw["num_heads"] == heads and kw["num_key_value_heads"] == kv_heads and kw["input_layout"] == "BNSD"
    assert torch.equal(kw["atten_mask"], ~mask)


def test_fake_kernels_follow_the_documented_mask_convention(fakes):
    """Guards the fakes themselves: a True in atten_mask removes that key (doc: 1 = masked out)."""
    q = torch.ones(1, 1, 1, 4)
    k = torch.zeros(1, 1, 3, 4)
    v = torch.tensor([1.0, 2.0, 3.0])[None, None, :, None].expand(1, 1, 3, 4).contiguous()
    excluded = torch.tensor([False, True, True])[None, None, None, :]
    out = fakes.torch_npu.npu_incre_flash_attention(q, k, v, atten_mask=excluded, num_heads=1, input_layout="BNSD")
    assert torch.equal(out, torch.ones(1, 1, 1, 4))  # only key 0 (value 1) is attended


def test_float32_attention_falls_back_to_sdpa_by_default(fakes):
    """The NPU flash-attention kernels take float16/bfloat16 only (op-plugin docs)."""
    q = torch.randn(1, 4, 8, 16)
    k = v = torch.randn(1, 4, 8, 16)
    mask = _prefill_mask(torch.tensor([8]), 8)
    out = npu.NpuAttentionOps(fakes.torch_npu).attention(q, k, v, mask, is_decode=False)
    torch.testing.assert_close(out, AttentionOps().attention(q, k, v, mask, is_decode=False))
    assert fakes.torch_npu.calls == []


def test_kernel_limits_are_checked(fakes):
    q = torch.randn(1, 6, 1, 16, dtype=torch.float16)
    k = v = torch.randn(1, 4, 8, 16, dtype=torch.float16)  # 6 heads over 4 kv heads: not integral
    with pytest.raises(ValueError, match="heads=6, kv_heads=4"):
        npu.NpuAttentionOps(fakes.torch_npu).attention(q, k, v, torch.ones(1, 1, 1, 8, dtype=torch.bool), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_prefill_and_decode_match_generic(fakes, dtype):
    """A tiny GQA Llama through zoo's own prefill/decode (its real index and mask construction):
    NpuAttentionOps on the fake kernels == the generic ops. Prefill writes two prompts into slots 2
    and 0 plus padding rows into the scratch block; decode runs with idle rows at the scratch
    position, including a narrower batch bucket that leaves a live slot out of a step."""
    generic = _tiny_llama(dtype)
    on_npu = copy.deepcopy(generic)
    ops = npu.NpuAttentionOps(fakes.torch_npu, kernel_dtypes=F32)
    on_npu.set_attention_ops(ops)
    c_gen, c_npu = _cache(generic, dtype), _cache(on_npu, dtype)
    idle = c_gen.scratch_position
    tol = _tol(dtype) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    with torch.no_grad():
        args = _prefill_inputs(c_gen)
        torch.testing.assert_close(on_npu.prefill(*args, c_npu.k, c_npu.v), generic.prefill(*args, c_gen.k, c_gen.v),
                                   **tol)
        pos = {0: 8, 2: 5}  # slot -> next position; slots 1 and 3 idle
        g = torch.Generator().manual_seed(2)
        for B in (4, 4, 2, 4):
            ids = torch.randint(0, 128, (B, 1), generator=g)
            positions = torch.tensor([pos.get(s, idle) for s in range(B)])
            out_npu = on_npu.decode(ids, positions, c_npu.block_tables[:B], c_npu.k, c_npu.v)
            out_gen = generic.decode(ids, positions, c_gen.block_tables[:B], c_gen.k, c_gen.v)
            torch.testing.assert_close(out_npu, out_gen, **tol)
            pos = {s: p + 1 if s < B else p for s, p in pos.items()}
    names = fakes.torch_npu.names()
    layers = generic.config.num_layers
    assert names.count("npu_prompt_flash_attention") == layers
    assert names.count("npu_incre_flash_attention") == 4 * layers
    for k_n, k_g, v_n, v_g in zip(c_npu.k, c_gen.k, c_npu.v, c_gen.v):
        torch.testing.assert_close(k_n[:-1], k_g[:-1], **tol)  # every block but the scratch one
        torch.testing.assert_close(v_n[:-1], v_g[:-1], **tol)
