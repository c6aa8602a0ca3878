"""build_runner: the one place that decides how prefill / decode run.

  compiled=False          eager: the module's own methods
  compiled=True           the compile config's backend, one graph per shape bucket:
                            inductor  torch.compile (cpu, cuda; mode "reduce-overhead" = CUDA graphs)
                            torchair  the Ascend backend (npu), through torchair's cache_compile when
                                      the graph cache is on
  compiled="DIR"          the AOTInductor graphs `python -m zoo.export` wrote to DIR

Compiled graphs live in the on-disk graph cache (zoo.graphs.cache) under a key that covers every
source file traced into them (the model registry's list for this model and backend).
"""
from __future__ import annotations

import os

import torch
import torch._dynamo

from zoo.distributed.comm import TPContext
from zoo.errors import CompileConfigError
from zoo.graphs.buckets import Buckets
from zoo.graphs.cache import GraphCache, cache_key_fields
from zoo.graphs.compile_config import CompileConfig
from zoo.graphs.kv_cache import KVCache
from zoo.graphs.runner import GraphRunner
from zoo.layers import cpu_kernels
from zoo.models.registry import ModelSpec


def build_runner(module: torch.nn.Module, cache: KVCache, buckets: Buckets, *, spec: ModelSpec,
                 compiled: bool | str, compile_config: CompileConfig, inductor_options: dict | None,
                 dtype: torch.dtype, device: torch.device, cache_dir: str, tp: TPContext) -> GraphRunner:
    if compiled and device.type == "cpu":
        cpu_kernels.load(cache_dir)  # before tracing, or loading graphs that call them
    if isinstance(compiled, str):
        from zoo.graphs.aoti import ExportedGraphs  # imports torch._inductor's AOTI loader: only when used

        graphs = ExportedGraphs.load(compiled, module, cache)  # checks dtype, config and cache geometry
        return GraphRunner(graphs.prefill, graphs.decode, cache, buckets, compiled=False,
                           description=f"AOTInductor graphs from {compiled}", module=module)
    if not compiled:
        return GraphRunner(module.prefill, module.decode, cache, buckets, compiled=False, module=module,
                           mixed_fn=module.prefill_and_decode)

    backend = compile_config.backend
    if (backend == "torchair") != (device.type == "npu"):
        raise ValueError(f"{compile_config.source}: backend {backend!r} does not run on device {device.type!r} "
                         "(torchair is for npu, inductor for cpu/cuda)")
    if backend == "inductor":
        options = {**compile_config.inductor_options(dtype), **(inductor_options or {})}
        if compile_config.regional and options.get("cpp_wrapper"):
            raise CompileConfigError(f"{compile_config.source}: regional = true cannot run with cpp_wrapper "
                                     "(inductor has no C++ wrapper code for nested compile regions); drop the "
                                     "cpp_wrapper inductor option")
        fingerprint = {"backend": "inductor", "options": options, "regional": compile_config.regional}
        module.use_regional_compile(compile_config.regional)
    else:
        from zoo.backends import npu

        torch_npu, _ = npu.import_npu()
        options = compile_config.torchair
        module.set_attention_ops(npu.NpuAttentionOps(torch_npu))  # fused FA / IFA and scatter_update_
        fingerprint = {"backend": "torchair", "options": options, "torch_npu": torch_npu.__version__}
    if buckets.dynamic_lengths and (backend != "inductor" or options.get("triton.cudagraphs")):
        raise CompileConfigError(f"{compile_config.source}: dynamic lengths need the inductor backend without CUDA "
                                 "graphs (torchair graphs are static-shaped; CUDA graphs record one graph per length)")
    if device.type == "cpu":
        fingerprint["cpu_kernels"] = cpu_kernels.fingerprint()  # graphs call them when they are built
    if module.config.quantization is not None:  # also when quantized while loading (not in config.json)
        fingerprint["quantization"] = module.config.quantization.to_hf()
    if tp.enabled:
        fingerprint["tp"] = tp.fingerprint()  # each rank compiles (and caches) its own shard's graphs
    description = f"{backend}, options {options}" + (", regional (one layer compiled)" if compile_config.regional else "")
    description += ", dynamic lengths" if buckets.dynamic_lengths else ""

    graph_cache = None
    if compile_config.graph_cache:
        fields = cache_key_fields(spec.traced_files(backend), module.config.raw, fingerprint, dtype, buckets,
                                  tuple(cache.k[0].shape), device)
        graph_cache = GraphCache(cache_dir, fields)
    _allow_one_graph_per_bucket(buckets)
    mixed = None  # a prefill-and-decode graph: dynamic lengths only (Buckets.mixed_graphs)
    if backend == "torchair" and graph_cache is not None:
        # torchair.inference.cache_compile keeps its own files, inside zoo's keyed directory
        prefill, decode = npu.cache_compiled_methods(module, options, os.path.join(graph_cache.dir, "torchair"))
    elif backend == "torchair":
        compiler = npu.npu_backend(options)  # torchair.get_npu_backend(compiler_config=...)
        prefill, decode = (torch.compile(fn, fullgraph=True, dynamic=False, backend=compiler)
                           for fn in (module.prefill, module.decode))
    elif buckets.dynamic_lengths:
        prefill, decode, mixed = _dynamic_length_graphs(module, options, buckets)
    else:
        # fullgraph: a graph break is an error, so no host sync can hide inside; static shapes:
        # one graph per bucket
        prefill, decode = (torch.compile(fn, fullgraph=True, dynamic=False, options=options)
                           for fn in (module.prefill, module.decode))
    return GraphRunner(prefill, decode, cache, buckets, True, description, graph_cache, module=module,
                       mixed_fn=mixed)


def _dynamic_length_graphs(module: torch.nn.Module, options: dict, buckets: Buckets):
    """prefill / decode / prefill_and_decode with the signatures of the module's, compiled with
    dynamic dimensions: the prompt length (input_ids' dim 1) and the contexts attended. Everything
    else stays static. A prefill call computes at most one chunk (buckets.chunk_tokens), so that
    is the prompt length's upper bound: kernels picked by a length bound see it when tracing
    (zoo.layers.ops.SHORT_QUERIES); with chunks of one length multiple the length is static."""
    lo, hi = buckets.length_multiple, buckets.max_len
    chunk = buckets.chunk_tokens  # lo <= chunk <= hi

    # the context length reaches the graph as the size of `span` (a graph's ints are constants)
    def prefill_over(input_ids, start_pos, lengths, block_tables, k_caches, v_caches, span):
        return module.prefill(input_ids, start_pos, lengths, block_tables, k_caches, v_caches,
                              context_len=span.shape[0])

    def decode_over(input_ids, positions, block_tables, k_caches, v_caches, span):
        return module.decode(input_ids, positions, block_tables, k_caches, v_caches, context_len=span.shape[0])

    def mixed_over(prefill_ids, start_pos, lengths, prefill_tables, decode_ids, positions, decode_tables,
                   k_caches, v_caches, prefill_span, decode_span):
        return module.prefill_and_decode(prefill_ids, start_pos, lengths, prefill_tables, decode_ids, positions,
                                         decode_tables, k_caches, v_caches, prefill_context=prefill_span.shape[0],
                                         decode_context=decode_span.shape[0])

    prefill_graph, decode_graph, mixed_graph = (torch.compile(fn, fullgraph=True, dynamic=False, options=options)
                                                for fn in (prefill_over, decode_over, mixed_over))

    def span_of(context_len: int, device) -> torch.Tensor:
        span = torch.empty(context_len, dtype=torch.int8, device=device)  # [T], never read
        torch._dynamo.mark_dynamic(span, 0, min=lo, max=hi)
        return span

    def mark_prompt_length(input_ids: torch.Tensor) -> None:  # input_ids [B, S], lo <= S <= chunk
        if chunk > lo:  # (a dimension needs a range; with chunk == lo every call pads S to lo)
            torch._dynamo.mark_dynamic(input_ids, 1, min=lo, max=chunk)

    def prefill(input_ids, start_pos, lengths, block_tables, k_caches, v_caches, context_len: int):
        mark_prompt_length(input_ids)
        return prefill_graph(input_ids, start_pos, lengths, block_tables, k_caches, v_caches,
                             span_of(context_len, input_ids.device))

    def decode(input_ids, positions, block_tables, k_caches, v_caches, context_len: int):  # lo <= context_len <= hi
        return decode_graph(input_ids, positions, block_tables, k_caches, v_caches, span_of(context_len, input_ids.device))

    def mixed(prefill_ids, start_pos, lengths, prefill_tables, decode_ids, positions, decode_tables, k_caches,
              v_caches, prefill_context: int, decode_context: int):
        mark_prompt_length(prefill_ids)
        dev = prefill_ids.device
        return mixed_graph(prefill_ids, start_pos, lengths, prefill_tables, decode_ids, positions, decode_tables,
                           k_caches, v_caches, span_of(prefill_context, dev), span_of(decode_context, dev))

    return prefill, decode, mixed


def _allow_one_graph_per_bucket(buckets: Buckets) -> None:
    """Every bucket is one more cache entry on the same code object (LlamaForCausalLM.prefill /
    decode, shared by every model of the family in this process); allow this model's on top of
    what the models built before it hold."""
    config = torch._dynamo.config
    config.recompile_limit += buckets.num_graphs
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, config.recompile_limit)
