"""Graphs: the static KV cache, shape buckets, compile configs, the on-disk graph cache, AOTInductor
exports, and build_runner — the one place that picks how prefill / decode run (eager, inductor,
inductor + CUDA graphs, torchair, or exported graphs)."""
from zoo.graphs.buckets import Buckets
from zoo.graphs.build import build_runner
from zoo.graphs.kv_cache import KVCache
from zoo.graphs.runner import GraphRunner

__all__ = ["Buckets", "GraphRunner", "KVCache", "build_runner"]
