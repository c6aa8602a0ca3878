"""Ahead-of-time export of the prefill / decode graphs with AOTInductor.

`export_graphs` turns each bucket's entry point into a self-contained AOTInductor package (.pt2:
generated C++ compiled to a shared library) and writes a manifest.json next to them.
`ExportedGraphs.load` gives back callables with the signatures of `module.prefill` /
`module.decode`, without tracing or compiling anything.

Weights are not in the packages. They are exported with `aot_inductor.package_constants_in_so=False`
(and no on-disk copy), so a package holds only code; its runtime then allocates no constant blob.
At load time every bucket's runner is handed the tensors the module already holds, through
`load_constants(..., user_managed=True)`, which stores the tensor pointers as they are: all
buckets share the module's one copy of the weights, and in-place updates to them are seen.

The KV caches are graph inputs that the graphs write in place (index_put_), exactly as in eager.

Layout of an export folder:
  manifest.json             versions, config hash, dtype, cache geometry, buckets, graph files
  prefill_b{B}_s{S}.pt2     one per (batch bucket B, prompt-length bucket S) attending over the
  prefill_b{B}_s{S}_c{T}.pt2  whole block table, or, with context buckets, per context bucket T >= S
  decode_b{B}.pt2           one per batch bucket B (attending over the whole cache), or, with
  decode_b{B}_c{L}.pt2      context buckets, one per (B, context bucket L)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import torch
from torch import nn
from torch.utils import _pytree as pytree

import torch._inductor
from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default_cache_dir

from zoo.device import default_cache_dir, dtype_name
from zoo.layers import cpu_kernels
from zoo.graphs.kv_cache import KVCache
from zoo.log import log

FORMAT = "zoo-aoti"
FORMAT_VERSION = 2  # 2: the paged KV cache (block tables in, per-context prefill graphs)
MANIFEST = "manifest.json"

# Weights stay out of the shared library; freezing is off because it would fold weights into new
# constants the module does not have (so they could not be fed from the module at load time).
# always_keep_tensor_constants: a 0-d buffer (the int4 kernel's group size) stays a buffer fed
# from the module, instead of being inlined as a number that the kernel call re-wraps in a tensor
# constant of its own.
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False, "freezing": False,
                    "always_keep_tensor_constants": True}


@contextlib.contextmanager
def _zoo_inductor_cache_dir():
    """Inductor's builds (export) and CPU ISA probes (load, ~5 s when cold) go to zoo's cache dir,
    outside any clone, so re-runs start warm (as in tests/conftest.py). A TORCHINDUCTOR_CACHE_DIR the
    user chose is kept; torch's own /tmp default is not a choice (importing torch._inductor sets it)."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if previous is not None and os.path.abspath(previous) != os.path.abspath(torch_default_cache_dir()):
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), "inductor")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


# ---- the modules torch.export traces --------------------------------------------------------
class _PrefillGraph(nn.Module):
    def __init__(self, lm: nn.Module, context_len: int | None = None):
        super().__init__()
        self.lm = lm
        self.context_len = context_len  # a constant of this graph (None: the whole block table)

    def forward(self, input_ids, start_pos, lengths, block_tables, k_caches, v_caches):
        return self.lm.prefill(input_ids, start_pos, lengths, block_tables, k_caches, v_caches,
                               context_len=self.context_len)


class _DecodeGraph(nn.Module):
    def __init__(self, lm: nn.Module, context_len: int | None = None):
        super().__init__()
        self.lm = lm
        self.context_len = context_len  # a constant of this graph (None: the whole cache)

    def forward(self, input_ids, positions, block_tables, k_caches, v_caches):
        return self.lm.decode(input_ids, positions, block_tables, k_caches, v_caches, context_len=self.context_len)


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under the FQN the exported graphs know it by ("lm." + name).
    Tied weights appear under each of their names (export keeps only one of them)."""
    wrapper = _DecodeGraph(module)  # both wrappers name the module "lm"
    tensors = dict(wrapper.named_parameters(remove_duplicate=False))
    tensors.update(wrapper.named_buffers(remove_duplicate=False))
    return {name: t.detach() for name, t in tensors.items()}


# ---- what a manifest must agree with --------------------------------------------------------
def config_hash(raw_config: dict) -> str:
    """sha256 of config.json's contents in canonical JSON (key order and whitespace ignored)."""
    canonical = json.dumps(raw_config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def cache_geometry(cache: KVCache) -> dict[str, int]:
    _, kv_heads, _, head_dim = cache.k[0].shape  # [num_blocks + 1, KV, block_size, hd]
    return {"num_slots": cache.num_slots, "max_seq_len": cache.max_seq_len, "num_tokens": cache.num_tokens,
            "block_size": cache.block_size, "num_layers": len(cache.k), "num_kv_heads": kv_heads,
            "head_dim": head_dim}


def _identity(module: nn.Module, cache: KVCache) -> dict:
    """The manifest fields a module + cache must match for the graphs to be valid for them."""
    config = module.config
    return {
        "torch_version": torch.__version__,
        "family": config.family,
        "architecture": config.architecture,
        "config_sha256": config_hash(config.raw),
        "dtype": dtype_name(_module_dtype(module)),
        "quantization": None if config.quantization is None else config.quantization.to_hf(),
        "device": cache.k[0].device.type,
        "cache": cache_geometry(cache),
    }


# ---- export -----------------------------------------------------------------------------------
def _check_buckets(name: str, values, limit: int, limit_name: str) -> tuple[int, ...]:
    values = tuple(sorted(set(int(v) for v in values)))
    if not values or values[0] < 1:
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {list(values)}")
    if values[-1] > limit:
        raise ValueError(f"{name} {list(values)} go past {limit_name}={limit} of the model's KV cache")
    return values


def _export_one(wrapper: nn.Module, args: tuple, package_path: str, tensors: dict[str, torch.Tensor]) -> dict:
    """torch.export + AOTInductor for one bucket -> {constant FQN: {shape, dtype}} it reads."""
    with torch.no_grad():
        ep = torch.export.export(wrapper, args, strict=False)
    sig = ep.graph_signature
    if sig.lifted_tensor_constants or sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        # Only the module's own parameters/buffers can be fed at load time, and the caches must
        # stay in-place writes (export keeps index_put_ on an input in place; check it did).
        raise RuntimeError(f"unexpected exported signature for {package_path}: lifted constants "
                           f"{sig.lifted_tensor_constants}, mutated buffers {sig.buffers_to_mutate}, "
                           f"mutated inputs returned as outputs {sig.user_inputs_to_mutate}")
    constants = {}
    for fqn in list(sig.parameters) + list(sig.buffers):
        if fqn not in tensors:
            raise RuntimeError(f"exported graph reads {fqn!r}, which is not a parameter or buffer of the module")
        t = tensors[fqn]
        constants[fqn] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
    torch._inductor.aoti_compile_and_package(ep, package_path=package_path, inductor_configs=INDUCTOR_CONFIGS)
    return constants


def export_graphs(module: nn.Module, cache: KVCache, out_dir: str, batch_sizes: list[int], prefill_lens: list[int],
                  context_lens: list[int] = ()) -> str:
    """Export the module's prefill graph for every (B in batch_sizes, S in prefill_lens) and its decode
    graph for every B, each for every context bucket in context_lens (which must end at
    max_seq_len; a prefill's only those >= S; none: the whole block table), as AOTInductor packages
    under out_dir, plus out_dir/manifest.json. Returns out_dir."""
    batch_sizes = _check_buckets("batch_sizes", batch_sizes, cache.num_slots, "max_batch_size")
    prefill_lens = _check_buckets("prefill_lens", prefill_lens, cache.max_seq_len, "max_seq_len")
    if context_lens:
        context_lens = _check_buckets("context_lens", context_lens, cache.max_seq_len, "max_seq_len")
        if context_lens[-1] != cache.max_seq_len:
            raise ValueError(f"context_lens {list(context_lens)} must end at max_seq_len={cache.max_seq_len}")
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # a half-rewritten folder must not look like a finished export

    module.eval()
    if cache.k[0].device.type == "cpu":
        cpu_kernels.load(default_cache_dir())  # the exported graphs call them when they are built
    tensors = _module_tensors(module)
    contexts = list(context_lens) or [None]
    jobs = [("prefill", B, S, T) for B in batch_sizes for S in prefill_lens for T in contexts if T is None or T >= S]
    jobs += [("decode", B, None, L) for B in batch_sizes for L in contexts]
    graphs = {"prefill": [], "decode": []}
    constants: dict[str, dict] = {}
    start = time.perf_counter()
    for i, (kind, B, S, T) in enumerate(jobs, start=1):
        context = "" if T is None else f"_c{T}"
        if kind == "prefill":
            file = f"prefill_b{B}_s{S}{context}.pt2"
            wrapper, args = _PrefillGraph(module, T), cache.scratch_prefill_inputs(B, S)
        else:
            file = f"decode_b{B}{context}.pt2"
            wrapper, args = _DecodeGraph(module, T), cache.scratch_decode_inputs(B)
        what = f"{kind} graph for batch {B}" + (f", length {S}" if S else "") + (f", context {T}" if T else "")
        log(f"[{i}/{len(jobs)}] exporting {what} with AOTInductor -> {file}")
        t0 = time.perf_counter()
        with _zoo_inductor_cache_dir():
            constants.update(_export_one(wrapper, args, os.path.join(out_dir, file), tensors))
        size = os.path.getsize(os.path.join(out_dir, file))
        log(f"  ... {time.perf_counter() - t0:.1f} s, {size / 2**20:.1f} MiB")
        shape = {"batch_size": B, **({} if S is None else {"prefill_len": S}),
                 **({} if T is None else {"context_len": T})}
        graphs[kind].append({**shape, "file": file, "bytes": size})

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **_identity(module, cache),
        "buckets": {"batch_sizes": list(batch_sizes), "prefill_lens": list(prefill_lens),
                    "context_lens": list(context_lens)},
        "graphs": graphs,
        "constants": constants,  # what load feeds from the module: FQN -> shape, dtype
        "inductor_configs": INDUCTOR_CONFIGS,
    }
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, manifest_path)  # written last: its presence means every package is there
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors.values()}.values())
    pkg_bytes = sum(g["bytes"] for kind in graphs.values() for g in kind)
    log(f"exported {len(jobs)} graphs to {out_dir} in {time.perf_counter() - start:.1f} s: "
         f"{pkg_bytes / 2**20:.1f} MiB of packages; the {weight_bytes / 2**20:.1f} MiB of weights are not in them")
    return out_dir


# ---- load ---------------------------------------------------------------------------------------
def read_manifest(export_dir: str) -> dict:
    """The checked manifest of an export folder (e.g. to size the KV cache before loading)."""
    if not os.path.isdir(export_dir):
        raise FileNotFoundError(f"AOTInductor export folder not found: {export_dir!r}")
    path = os.path.join(export_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: {export_dir!r} is not a finished export "
                                f"(write one with python -m zoo.export)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a zoo AOTInductor manifest (format {FORMAT!r} expected)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path!r}: format_version is {manifest.get('format_version')!r}, this zoo reads "
                         f"{FORMAT_VERSION}; re-export with python -m zoo.export")
    missing = [k for k in ("torch_version", "architecture", "config_sha256", "dtype", "device", "cache",
                           "buckets", "graphs", "constants") if k not in manifest]
    if missing:
        raise ValueError(f"{path!r} is corrupt: missing field(s) {missing}")
    return manifest


def _check_matches(export_dir: str, manifest: dict, actual: dict) -> None:
    """ValueError naming the first field where the export and the given module/cache disagree."""
    for key in ("torch_version", "architecture", "config_sha256", "dtype", "quantization", "device"):
        if manifest.get(key) != actual[key]:
            raise ValueError(f"{export_dir!r} was exported with {key}={manifest.get(key)!r}, but the given "
                             f"model/cache has {key}={actual[key]!r}; re-export with python -m zoo.export")
    for key, value in actual["cache"].items():
        if manifest["cache"].get(key) != value:
            raise ValueError(f"{export_dir!r} was exported for a KV cache with {key}={manifest['cache'].get(key)!r}, "
                             f"but the given cache has {key}={value!r}; re-export with python -m zoo.export")


def _check_constants(export_dir: str, wanted: dict, tensors: dict[str, torch.Tensor], device: str) -> None:
    # The runners read these through raw pointers (user_managed), so a wrong shape or dtype would
    # be silent memory corruption: check every one.
    for fqn, spec in wanted.items():
        t = tensors.get(fqn)
        if t is None:
            raise ValueError(f"{export_dir!r}: the graphs read {fqn!r}, which the given module does not have")
        if list(t.shape) != spec["shape"] or dtype_name(t.dtype) != spec["dtype"] or t.device.type != device:
            raise ValueError(f"{export_dir!r}: the graphs read {fqn!r} as {spec['shape']} {spec['dtype']} on "
                             f"{device}, but the given module's is {list(t.shape)} {dtype_name(t.dtype)} "
                             f"on {t.device.type}")
        if not t.is_contiguous():
            raise ValueError(f"{export_dir!r}: the module's {fqn!r} is not contiguous")


class ExportedGraphs:
    """The exported graphs of one model, bound to a module's weights. `prefill` / `decode` take
    and return what `module.prefill` / `module.decode` do, for the exported bucket shapes only."""

    def __init__(self, export_dir: str, manifest: dict, prefill_runners: dict, decode_runners: dict,
                 constants: dict[str, torch.Tensor], cache: KVCache, load_seconds: float):
        self.export_dir, self.manifest, self.load_seconds = export_dir, manifest, load_seconds
        self.batch_sizes: tuple[int, ...] = tuple(manifest["buckets"]["batch_sizes"])
        self.prefill_lens: tuple[int, ...] = tuple(manifest["buckets"]["prefill_lens"])
        self.context_lens: tuple[int, ...] = tuple(manifest["buckets"].get("context_lens", ()))
        self._prefill_runners = prefill_runners  # (B, S) -> AOTIModelPackageLoader
        self._decode_runners = decode_runners  # (B, context L or None) -> AOTIModelPackageLoader
        # The runners hold raw pointers to these tensors (user_managed): keep them alive with us.
        self._constants = constants
        self._cache_shape, self._device = tuple(cache.k[0].shape), cache.k[0].device
        self._cache_dtype = getattr(torch, manifest["dtype"])
        self._num_layers = manifest["cache"]["num_layers"]
        self._table_width = cache.block_tables.shape[1]
        self._cache_k = self._cache_v = None
        self._check_caches(cache.k, cache.v)  # every tensor, once ...
        self._cache_k, self._cache_v = cache.k, cache.v  # ... then calls passing these lists skip the checks

    @classmethod
    def load(cls, export_dir: str, module: nn.Module, cache: KVCache) -> "ExportedGraphs":
        start = time.perf_counter()
        manifest = read_manifest(export_dir)
        _check_matches(export_dir, manifest, _identity(module, cache))
        if dtype_name(cache.k[0].dtype) != manifest["dtype"]:
            raise ValueError(f"{export_dir!r} was exported with dtype={manifest['dtype']!r}, but the given cache "
                             f"has dtype={dtype_name(cache.k[0].dtype)!r}")
        if manifest["device"] == "cpu":
            cpu_kernels.load(default_cache_dir())  # graphs exported with zoo's CPU kernels call them
        tensors = _module_tensors(module)
        _check_constants(export_dir, manifest["constants"], tensors, manifest["device"])
        n_layers = len(cache.k)

        def open_graph(entry: dict, n_inputs: int):
            path = os.path.join(export_dir, entry["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"graph package {path!r} listed in the manifest is missing")
            try:
                with _zoo_inductor_cache_dir():
                    runner = torch._inductor.aoti_load_package(path)
            except RuntimeError as e:
                raise ValueError(f"cannot load AOTInductor package {path!r}: {e}") from None
            fqns = runner.get_constant_fqns()
            unknown = [f for f in fqns if f not in manifest["constants"]]
            if unknown:
                raise ValueError(f"{path!r} reads constants the manifest does not list: {unknown[:5]}")
            # No copy: the runner keeps pointers to the module's own tensors.
            runner.load_constants({f: tensors[f] for f in fqns}, check_full_update=True, user_managed=True)
            # We call the loader with a flat list (skipping the per-call pytree work of
            # AOTICompiledModel.__call__), so make sure the flat layout is the one we build.
            in_spec = pytree.treespec_loads(runner.loader.get_call_spec()[0])
            if in_spec.num_leaves != n_inputs:
                raise ValueError(f"{path!r} takes {in_spec.num_leaves} inputs, expected {n_inputs}")
            return runner.loader

        try:
            prefill = {(g["batch_size"], g["prefill_len"], g.get("context_len")): open_graph(g, 4 + 2 * n_layers)
                       for g in manifest["graphs"]["prefill"]}
            decode = {(g["batch_size"], g.get("context_len")): open_graph(g, 3 + 2 * n_layers)
                      for g in manifest["graphs"]["decode"]}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{os.path.join(export_dir, MANIFEST)!r} is corrupt: bad graphs entry ({e!r})") from None
        used = {fqn: tensors[fqn] for fqn in manifest["constants"]}
        return cls(export_dir, manifest, prefill, decode, used, cache, time.perf_counter() - start)

    # ---- the graph entry points -----------------------------------------------------------------
    def prefill(self, input_ids, start_pos, lengths, block_tables, k_caches, v_caches,
                context_len: int | None = None) -> torch.Tensor:
        """input_ids [B, S] long, start_pos [B], lengths [B], block_tables [B, NB] -> logits [B, V]
        float32; writes k/v in place. context_len: an exported context bucket >= S, or None without them."""
        runner = self._prefill_runners.get((*input_ids.shape, context_len)) if input_ids.dim() == 2 else None
        if runner is None:
            raise ValueError(f"no exported prefill graph for input_ids of shape {list(input_ids.shape)} and context "
                             f"{context_len}; exported buckets: batch sizes {list(self.batch_sizes)} x prompt "
                             f"lengths {list(self.prefill_lens)}, contexts {list(self.context_lens) or 'whole table'}")
        self._check_inputs(input_ids.shape[0], input_ids=input_ids, start_pos=start_pos, lengths=lengths)
        self._check_tables(input_ids.shape[0], block_tables)
        self._check_caches(k_caches, v_caches)
        return runner.run([input_ids, start_pos, lengths, block_tables, *k_caches, *v_caches])[0]

    def decode(self, input_ids, positions, block_tables, k_caches, v_caches,
               context_len: int | None = None) -> torch.Tensor:
        """input_ids [B, 1] long, positions [B], block_tables [B, NB] -> logits [B, V] float32; writes
        k/v in place. context_len: the context bucket (one of the exported context_lens, or None
        without them)."""
        shape = tuple(input_ids.shape)
        ok = len(shape) == 2 and shape[1] == 1
        runner = self._decode_runners.get((shape[0], context_len)) if ok else None
        if runner is None:
            raise ValueError(f"no exported decode graph for input_ids of shape {list(shape)} and context "
                             f"{context_len}; exported buckets: [B, 1] for batch sizes {list(self.batch_sizes)}"
                             f", contexts {list(self.context_lens) or 'whole cache'}")
        self._check_inputs(shape[0], input_ids=input_ids, positions=positions)
        self._check_tables(shape[0], block_tables)
        self._check_caches(k_caches, v_caches)
        return runner.run([input_ids, positions, block_tables, *k_caches, *v_caches])[0]

    # AOTInductor does not check its inputs (sizes, strides, dtypes and device are compiled in), so a
    # mismatch would read or write out of bounds: check the cheap ones on every call.
    def _check_inputs(self, B: int, **tensors: torch.Tensor) -> None:
        for name, t in tensors.items():
            shape_ok = name == "input_ids" or tuple(t.shape) == (B,)  # input_ids: checked by the dispatch
            if not shape_ok or t.dtype != torch.long or t.device != self._device or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous int64 tensor on {self._device}"
                                 + ("" if name == "input_ids" else f" of shape [{B}]")
                                 + f", got {t.dtype} of shape {list(t.shape)} on {t.device}")

    def _check_tables(self, B: int, block_tables: torch.Tensor) -> None:
        shape = (B, self._table_width)
        if (tuple(block_tables.shape) != shape or block_tables.dtype != torch.long
                or block_tables.device != self._device or not block_tables.is_contiguous()):
            raise ValueError(f"block_tables must be a contiguous int64 tensor of shape {list(shape)} on {self._device}, "
                             f"got {block_tables.dtype} of shape {list(block_tables.shape)} on {block_tables.device}")

    def _check_caches(self, k_caches, v_caches) -> None:
        if k_caches is self._cache_k and v_caches is self._cache_v:
            return  # the very lists of the cache validated at load
        if len(k_caches) != self._num_layers or len(v_caches) != self._num_layers:
            raise ValueError(f"expected {self._num_layers} layers of k and v caches, "
                             f"got {len(k_caches)} and {len(v_caches)}")
        for t in [*k_caches, *v_caches]:
            if (tuple(t.shape) != self._cache_shape or t.dtype != self._cache_dtype or t.device != self._device
                    or not t.is_contiguous()):
                raise ValueError(f"KV cache tensors must be contiguous {list(self._cache_shape)} {self._cache_dtype} "
                                 f"on {self._device}, got {list(t.shape)} {t.dtype} on {t.device}")

    def __repr__(self) -> str:
        return (f"ExportedGraphs({self.export_dir!r}, {self.manifest['architecture']} {self.manifest['dtype']}, "
                f"batch sizes {list(self.batch_sizes)}, prompt lengths {list(self.prefill_lens)})")
